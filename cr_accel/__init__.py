"""cr_accel: a config-driven PyTorch trainer built on HuggingFace Accelerate."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"


def load_model(run_dir_or_checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model from a run folder or checkpoint, ready for inference (see cr_accel.checkpoint)."""
    from .checkpoint import load_model as load

    return load(run_dir_or_checkpoint, device)
