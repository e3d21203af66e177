"""Histograms of every weight and gradient, every `output.histograms_every` epochs, to TensorBoard.

The gradients are counted at the first optimizer step of such an epoch (after clipping, before the update: the
next step's zero_grad would discard them), the weights at its end; both are logged at the epoch's last step as
`weights/<name>` and `gradients/<name>`. Nothing is read from the device in the other steps or epochs, and
nothing runs in them either: the count is a one-shot pre-hook on the optimizer's step, put in place only for a
histogram epoch (an `on_before_optimizer_step` would be a call and a TrainingState every step of the run). Under
FSDP a parameter is gathered from its shards first (every process takes part; the main one counts and logs).

The counting runs here, in the training thread (~1 ms a histogram epoch for the benchmark MLP's 6 weights and 6
gradients), not in the trackers' thread: there each of its ~10 torch calls a tensor handed the GIL to and from the
training thread, and the same work cost ~3 ms of CPU a histogram epoch (bench/thread_cpu.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..histogram import histogram_of
from . import Callback, TrainingState

if TYPE_CHECKING:
    from ..trainer import Trainer


class Histograms(Callback):
    state_key = "histograms"

    def __init__(self, every: int) -> None:
        self.every = every
        self._gradients: dict[str, Any] | None = None  # the histogram epoch's first step's, counted
        self._hook: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        self._arm_if_due(trainer, trainer.epoch + 1)  # also a resumed run's unfinished epoch

    def on_epoch_end(self, trainer: Trainer, state: TrainingState) -> None:
        if state.epoch % self.every == 0:
            self._disarm()  # an epoch whose every step was skipped (non-finite) has no gradients to show
            model = trainer.accelerator.unwrap_model(trainer.model)
            weights = _histograms(trainer, model.named_parameters())
            gradients, self._gradients = self._gradients or {}, None
            if trainer.accelerator.is_main_process:
                histograms = {f"weights/{name}": h for name, h in weights.items()}
                histograms.update({f"gradients/{name}": h for name, h in gradients.items()})
                trainer.sinks.log_histograms(histograms, step=state.step)
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
            self._gradients = _histograms(trainer, ((name, p.grad) for name, p in model.named_parameters()
                                                    if p.grad is not None))

        self._hook = optimizer.register_step_pre_hook(copy_gradients)

    def _disarm(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _histograms(trainer: Trainer, named: Any) -> dict[str, Any]:
    """{name: histogram} of the (name, tensor) pairs, on the main process (elsewhere {}): the tensors taken to
    the CPU in one copy each (counting on a GPU would read back each extreme and sum on its own); a DTensor's
    shards gathered first (a collective: every process calls this, in the same order)."""
    main = trainer.accelerator.is_main_process
    histograms = {}
    for name, tensor in named:
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if main:
            histogram = histogram_of(tensor.to("cpu", torch.float32))
            if histogram is not None:  # no finite value
                histograms[name] = histogram
    return histograms
