"""cr_accel: a config-driven PyTorch trainer built on HuggingFace Accelerate."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"


def load_model(run_dir_or_checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
               ema: bool = True) -> torch.nn.Module:
    """The trained model from a run folder or checkpoint, ready for inference (see cr_accel.checkpoint): its
    EMA weights where the run kept an EMA (training.ema_decay), unless `ema=False`."""
    from .checkpoint import load_model as load

    return load(run_dir_or_checkpoint, device, ema=ema)
