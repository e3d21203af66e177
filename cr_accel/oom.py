"""Out of memory: a `torch.OutOfMemoryError` turned into one message that says where it happened, at which batch
size, what the device has, and what to change.

    with oom.explained(oom.Phase("training", batch_size=32, accumulation=1), device):
        trainer.train_one_epoch(epoch)

raises `OutOfMemory` (the command line prints its message as one line and exits 1: the training failed, the config
was valid). Nothing is written on the way out: checkpoints are only ever saved at optimizer-step boundaries, so the
last one stays as it was (a save still in flight in the background is finished by the trainer's `_finish`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .memory import capacity_and_peak


class OutOfMemory(Exception):
    """The device ran out of memory; the message names the phase, the batch size and the fixes."""


@dataclass
class Phase:
    """Where the memory ran out, and the batch sizes that were in use there."""

    name: str  # training, validation, the preflight, auto_batch_size's search
    batch_size: int  # samples per process in one forward pass
    accumulation: int = 1  # micro-batches per optimizer step (training)
    validation: bool = False  # sized by data.val_batch_size, no gradients
    chosen: bool = False  # the micro-batch is training.auto_batch_size's choice, not data.batch_size


@contextlib.contextmanager
def explained(phase: Phase, device: Any) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(message(phase, device, exc)) from exc


def message(phase: Phase, device: Any, exc: BaseException | None = None) -> str:
    return (f"out of memory in {phase.name} at a micro-batch of {phase.batch_size} ({_source(phase)}){_torch_says(exc)}: "
            f"{capacity_and_peak(device)}. {fixes(phase)}")


def unexplained(exc: BaseException) -> str:
    """An out-of-memory outside the phases `explained` covers: placing the model, loading or saving a checkpoint."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else torch.device("cpu")
    return (f"out of memory outside training and validation (placing the model and optimizer on the device, or "
            f"loading or saving a checkpoint){_torch_says(exc)}: {capacity_and_peak(device)}. To fit: bf16 "
            "(`training.mixed_precision=bf16`), a sharded run (FSDP, DeepSpeed: ./launch.sh --accelerate-config fsdp), "
            "or a smaller model")


def fixes(phase: Phase) -> str:
    b, a = phase.batch_size, phase.accumulation
    if phase.validation:  # no gradients are kept: only the batch size and the precision count
        return (f"To fit: a smaller `data.val_batch_size` (e.g. {max(b // 2, 1)}; validation means are the same at any "
                "batch size), bf16 (`training.mixed_precision=bf16`), or activation checkpointing in the model")
    example = (f" (e.g. `data.batch_size={b // 2} training.gradient_accumulation_steps={a * 2}`)"
               if b > 1 and b % 2 == 0 and not phase.chosen else "")
    return ("To fit: a smaller `data.batch_size` with a larger `training.gradient_accumulation_steps`, which keeps "
            f"the global batch{example}; `training.auto_batch_size=true` (finds the largest micro-batch that fits and "
            "raises the accumulation by itself); bf16 (`training.mixed_precision=bf16`); or activation checkpointing "
            "in the model")


def _source(phase: Phase) -> str:
    if phase.validation:
        return "`data.val_batch_size`, or `data.batch_size` when it is unset"
    where = "chosen by `training.auto_batch_size`" if phase.chosen else f"`data.batch_size={phase.batch_size}`"
    return f"{where}, gradient accumulation {phase.accumulation}"


def _torch_says(exc: BaseException | None) -> str:
    """torch's own figure ("Tried to allocate 2.00 GiB"), without the rest of its long message."""
    found = re.search(r"Tried to allocate [\d.]+ ?\w+", str(exc)) if exc is not None else None
    return f"; torch: {found.group(0)}" if found else ""
