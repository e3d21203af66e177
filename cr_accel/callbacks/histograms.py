"""Histograms of every weight and gradient, every `output.histograms_every` epochs, to TensorBoard.

The gradients are copied at the first optimizer step of such an epoch (after clipping, before the update: the
next step's zero_grad would discard them), the weights at its end; both are logged at the epoch's last step as
`weights/<name>` and `gradients/<name>`. Nothing is read from the device in the other steps or epochs, and
nothing runs in them either: the copy is a one-shot pre-hook on the optimizer's step, put in place only for a
histogram epoch (an `on_before_optimizer_step` would be a call and a TrainingState every step of the run). Under
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
        self._hook: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        self._arm_if_due(trainer, trainer.epoch + 1)  # also a resumed run's unfinished epoch

    def on_epoch_end(self, trainer: Trainer, state: TrainingState) -> None:
        if state.epoch % self.every == 0:
            self._disarm()  # an epoch whose every step was skipped (non-finite) has no gradients to show
            model = trainer.accelerator.unwrap_model(trainer.model)
            tensors = {f"weights/{name}": _host(p) for name, p in model.named_parameters()}
            tensors.update({f"gradients/{name}": g for name, g in (self._gradients or {}).items()})
            self._gradients = None
            if trainer.accelerator.is_main_process:
                trainer.sinks.log_histograms(tensors, step=state.step)
        self._arm_if_due(trainer, state.epoch + 1)

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        self._disarm()

    def _arm_if_due(self, trainer: Trainer, epoch_number: int) -> None:
        if epoch_number % self.every or self._hook is not None:
            return
        optimizer = getattr(trainer.step_optimizer, "optimizer", trainer.step_optimizer)  # accelerate's wrapper

        def copy_gradients(*_: Any) -> None:
            self._disarm()
            model = trainer.accelerator.unwrap_model(trainer.model)
            self._gradients = {name: _host(p.grad) for name, p in model.named_parameters() if p.grad is not None}

        self._hook = optimizer.register_step_pre_hook(copy_gradients)

    def _disarm(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _host(tensor: Any) -> torch.Tensor:
    """A float32 CPU copy (always a copy: the trackers write it later, while training changes the original); a
    DTensor's shards gathered first (a collective: every process calls this)."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.to("cpu", torch.float32, copy=True)
