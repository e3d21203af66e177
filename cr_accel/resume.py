"""Choosing and loading the checkpoint a run continues from.

`--resume_from_checkpoint latest` starts from scratch only when the run has no checkpoint folder or it is
empty. Otherwise it takes the newest checkpoint that can be used -- verified, readable without unpickling
anything, fitting the model -- and, when none can, stops with every rejected checkpoint and its reason.
An explicit path is used or refused, never replaced.

Elastic resume: a checkpoint written by N processes with accumulation a continues on M processes with
accumulation a*N/M, so every optimizer step still sees the same N*a micro-batches of the epoch's shuffle
(accelerate deals batch k of the epoch to process k mod world size), the epoch has the same number of
steps and the LR schedule is unchanged. It is exact up to the order of floating-point reductions, not
bitwise; each process's RNG is re-derived from (seed, rank, step), since the saved streams belonged to
other ranks.
"""

import hashlib
import random

import numpy as np
import torch

from .checkpoint import CheckpointError, store
from .checkpoint.store import load_refusing_pickles


def elastic_accumulation(saved_world_size, saved_accumulation, world_size):
    """The accumulation that keeps the global batch of a checkpoint written by `saved_world_size` processes."""
    per_step = saved_world_size * saved_accumulation
    if per_step % world_size:
        workable = [n for n in range(1, per_step + 1) if per_step % n == 0]
        raise CheckpointError(
            f"the checkpoint was written by {saved_world_size} process(es) with gradient_accumulation_steps="
            f"{saved_accumulation} ({per_step} micro-batches per optimizer step), which {world_size} processes "
            f"cannot split evenly, so the global batch would change. Resume with {', '.join(map(str, workable))} "
            f"process(es) (e.g. ./launch.sh --num-processes {workable[-1] if workable[-1] <= 8 else workable[0]})")
    return per_step // world_size


def reseed(seed, rank, step):
    """A process's RNG streams as a function of (seed, rank, step), for a resume on another world size."""
    digest = hashlib.sha256(f"cr_accel:{seed}:{rank}:{step}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") % (2**63)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def agree(accelerator, problem):
    """Every process's problem with a checkpoint (None where it had none): a checkpoint one process cannot
    use is used by none of them."""
    if accelerator.num_processes == 1:
        return [problem] if problem else []
    from accelerate.utils import gather_object

    return [p for p in gather_object([problem]) if p]


def candidates(checkpoints, where):
    """(path, problem) pairs to try in order: the explicit path, or every entry of the run, newest first."""
    from pathlib import Path

    if where != "latest":
        return [(Path(where), None)]
    return checkpoints.newest_first()


def load_accelerate_state(accelerator, path):
    """accelerator.load_state, with every weights-only refusal or damaged file turned into CheckpointError."""
    load_refusing_pickles(accelerator.load_state, str(path))


def verify_and_read(path):
    store.verify(path)
    return store.read_state(path), store.read_tensors(path)
