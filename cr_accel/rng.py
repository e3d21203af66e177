"""The random-number streams a run draws from (Python, NumPy, torch CPU and CUDA), kept unchanged around work that
must not move them: a resumed run depends on their exact state."""

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def rng_kept():
    """Every RNG stream a run draws from, as it was before the block (CUDA's only where it is initialised)."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
