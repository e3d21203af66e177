"""Histograms of every weight and gradient, every `output.histograms_every` epochs, to TensorBoard.

The gradients are copied at the first optimizer step of such an epoch (after clipping, before the update: the
next step's zero_grad would discard them), the weights at its end; both are logged at the epoch's last step as
`weights/<name>` and `gradients/<name>`. Nothing is read from the device in the other steps or epochs. Under
FSDP a parameter is gathered from its shards first (every process takes part; the main one logs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import Callback, TrainingState

if TYPE_CHECKING:
    from ..trainer import Trainer


class Histograms(Callback):
    state_key = "histograms"

    def __init__(self, every: int) -> None:
        self.every = every
        self._gradients: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: Trainer, state: TrainingState) -> None:
        if state.epoch % self.every or self._gradients is not None:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        self._gradients = {name: _host(p.grad) for name, p in model.named_parameters() if p.grad is not None}

    def on_epoch_end(self, trainer: Trainer, state: TrainingState) -> None:
        if state.epoch % self.every:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        tensors = {f"weights/{name}": _host(p) for name, p in model.named_parameters()}
        tensors.update({f"gradients/{name}": g for name, g in (self._gradients or {}).items()})
        self._gradients = None
        if trainer.accelerator.is_main_process:
            trainer.sinks.log_histograms(tensors, step=state.step)


def _host(tensor: Any) -> torch.Tensor:
    """A float32 CPU copy (always a copy: the trackers write it later, while training changes the original); a
    DTensor's shards gathered first (a collective: every process calls this)."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.to("cpu", torch.float32, copy=True)
