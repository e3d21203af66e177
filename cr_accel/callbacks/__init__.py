"""Callbacks: hooks into the training loop, as named events with no-op defaults.

The loop, in the order the events fire:

    on_train_start(trainer)
    for each epoch:
        for each batch:
            ... forward, backward (accumulated until an optimizer step) ...
            on_before_optimizer_step(trainer, state)  # gradients all-reduced and clipped, not applied yet
            ... optimizer step ...
            on_step_end(trainer, state)               # after every optimizer step
        on_validation_start(trainer)                  # every training.eval_every epochs
        validate
        on_validation_end(trainer, metrics)           # the validation metrics, reduced over all processes
        on_epoch_end(trainer, state)                  # state.metrics: the epoch's record, as logged
        on_checkpoint(trainer, path)                  # after a checkpoint is written
    on_train_end(trainer, status)                     # "finished", "stopped_early", "failed", ...;
                                                      # the test split is scored here (final_score.py)

A plain function `fn(epoch, train_loss, val_loss, model, optimizer, **metrics)` is also accepted and
called at the end of every epoch. Callbacks run on every process; use `trainer.accelerator.is_main_process`
for work that should happen once. A callback with `state_dict()/load_state_dict()` has its state saved in
checkpoints (JSON values, or tensors), under its `state_key` (default: its class name). A callback adds its
own values to the logs with `trainer.log({...})`.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from ..trainer import Trainer


class Event(str, enum.Enum):
    ON_TRAIN_START = "on_train_start"
    ON_BEFORE_OPTIMIZER_STEP = "on_before_optimizer_step"
    ON_STEP_END = "on_step_end"
    ON_VALIDATION_START = "on_validation_start"
    ON_VALIDATION_END = "on_validation_end"
    ON_EPOCH_END = "on_epoch_end"
    ON_CHECKPOINT = "on_checkpoint"
    ON_TRAIN_END = "on_train_end"


@dataclass(slots=True)  # made every step there are listeners: slots and no frozen __setattr__ keep it ~0.5 us
class TrainingState:
    """Where the run is, as a step or epoch hook sees it.

    At a step end (and before the optimizer step) `loss`, `loss_terms` and `grad_norm` are tensors on the device:
    reading one (`.item()`, `float()`) makes the host wait for the device, so do it every so many steps, not every
    step. At an epoch end they are the epoch's means over every process, as floats, and `metrics` holds the
    epoch's record (the row of metrics.csv).
    """

    step: int  # optimizer steps done (at a step end: counting this one)
    epoch: int  # the epoch this belongs to, counted from 1 as in the logs
    batch_in_epoch: int  # micro-batches of this epoch trained on, per process
    loss: Any  # the last micro-batch's loss (tensor) at a step; the epoch's mean train_loss at an epoch end
    lr: float  # the learning rate of the step (of the epoch's last step at an epoch end)
    grad_norm: Any  # the pre-clip gradient norm (tensor, None with clipping off on some engines); epoch mean
    loss_terms: dict[str, Any]  # the loss's named terms, if it returns any (see "Loss terms" in the README)
    metrics: dict[str, Any] | None = None  # the epoch's record at an epoch end; None at a step


class Callback:
    """Subclass and override the events you need; every hook defaults to doing nothing."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_before_optimizer_step(self, trainer: Trainer, state: TrainingState) -> None:
        pass

    def on_step_end(self, trainer: Trainer, state: TrainingState) -> None:
        pass

    def on_validation_start(self, trainer: Trainer) -> None:
        pass

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, state: TrainingState) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EpochFunctionCallback(Callback):
    """Adapts `fn(epoch, train_loss, val_loss, model, optimizer, **metrics)` to on_epoch_end."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, state: TrainingState) -> None:
        metrics = state.metrics or {}
        rest = {k: v for k, v in metrics.items() if k not in ("epoch", "train_loss", "val_loss")}
        self.fn(metrics["epoch"], metrics.get("train_loss"), metrics.get("val_loss"), trainer.model,
                trainer.optimizer, **rest)

    def __repr__(self) -> str:
        return f"EpochFunctionCallback({getattr(self.fn, '__qualname__', self.fn)!r})"


def as_callback(cb: Callback | Callable[..., Any]) -> Callback:
    if isinstance(cb, Callback):
        return cb
    if callable(cb):
        return EpochFunctionCallback(cb)
    raise TypeError(f"a callback must be a Callback or a function, got {type(cb).__name__}")


class CallbackList:
    """Dispatches events; keeps, per event, only the callbacks that override it (a no-op costs nothing).

    A callback added as `builtin` (the checkpoint policy, early stopping, pictures, histograms) is replaced by
    a later one that is an instance of its class: a run's own `CheckpointPolicy` subclass takes the place of
    the built-in policy instead of saving beside it.
    """

    def __init__(self) -> None:
        self.callbacks: list[Callback] = []
        self._builtin: list[Callback] = []
        self._listeners: dict[Event, list[Callable[..., Any]]] = {event: [] for event in Event}

    def add(self, cb: Callback | Callable[..., Any], builtin: bool = False) -> Callback:
        cb = as_callback(cb)
        for event in Event:
            if getattr(type(cb), event.value) is not getattr(Callback, event.value):
                _check_signature(cb, event)
        replaced = [b for b in self._builtin if isinstance(cb, type(b))]
        self.callbacks = [c for c in self.callbacks if all(c is not b for b in replaced)]
        self._builtin = [b for b in self._builtin if all(b is not r for r in replaced)]
        self.callbacks.append(cb)
        if builtin:
            self._builtin.append(cb)
        self._listeners = {event: [getattr(c, event.value) for c in self.callbacks
                                   if getattr(type(c), event.value) is not getattr(Callback, event.value)]
                           for event in Event}
        return cb

    def of_type(self, kind: type) -> list[Any]:
        return [cb for cb in self.callbacks if isinstance(cb, kind)]

    def has(self, event: Event) -> bool:
        return bool(self._listeners[event])

    def fire(self, event: Event, *args: Any) -> None:
        for hook in self._listeners[event]:
            hook(*args)

    def state_dict(self) -> dict[str, Any]:
        return {key: cb.state_dict() for key, cb in self._keyed().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, cb in self._keyed().items():
            saved = state.get(key, state.get(self._legacy_key(cb)))
            if saved is not None:
                cb.load_state_dict(saved)

    def load_legacy(self, trainer_state: dict[str, Any], saved: dict[str, Any]) -> None:
        """Callbacks whose state a checkpoint from before they were callbacks kept in the trainer's part
        (the best value, the early-stopping count) take it from there."""
        for key, cb in self._keyed().items():
            if key not in saved and hasattr(cb, "load_legacy"):
                cb.load_legacy(trainer_state)

    def _keyed(self) -> dict[str, Callback]:
        """{state_key: callback}: a callback's `state_key` (default: its class name), numbered from the second
        callback of the same key on, so adding an unrelated callback does not move anyone's state."""
        keyed = {}
        for cb in self.callbacks:
            base = getattr(cb, "state_key", None) or type(cb).__qualname__
            key, n = base, 1
            while key in keyed:
                n += 1
                key = f"{base}#{n}"
            keyed[key] = cb
        return keyed

    def _legacy_key(self, cb: Callback) -> str:
        """Checkpoints before state keys named callbacks by position: `index:ClassName`."""
        return f"{self.callbacks.index(cb)}:{type(cb).__qualname__}"


def _check_signature(cb: Callback, event: Event) -> None:
    """A hook must take the arguments its event passes: an older `on_step_end(trainer, step, loss)` would
    otherwise fail at the first optimizer step, mid-run."""
    expected = inspect.signature(getattr(Callback, event.value))
    try:
        inspect.signature(getattr(cb, event.value)).bind(*[None] * (len(expected.parameters) - 1))
    except TypeError:
        names = ", ".join(list(expected.parameters)[1:])
        raise TypeError(f"{type(cb).__qualname__}.{event.value} must take ({names}): see the events in "
                        "cr_accel.callbacks (on_step_end and on_epoch_end receive a TrainingState)") from None


def hook_names() -> set[str]:
    """Every public hook a Callback defines (the contract test compares them with Event)."""
    return {name for name, _ in inspect.getmembers(Callback, inspect.isfunction) if name.startswith("on_")}


def builtin_callbacks(cfg: Any, accelerator: Any = None) -> list[Callback]:
    """The EMA of the weights (training.ema_decay), the LR schedule's events (plateau, torch schedulers), the
    checkpoint policy, early stopping (training.early_stopping_patience), the pictures of validation
    (output.samples_every), for TensorBoard the histograms of weights and gradients (output.histograms_every),
    and the test split's score at the end (where the data has a test split): callbacks like a user's, so each
    can be replaced (see CallbackList). `accelerator`: the run's, where EMA checks it can work."""
    from .checkpointing import CheckpointPolicy, EarlyStopping
    from .ema import EMA, check_engine
    from .final_score import FinalTestScore
    from .histograms import Histograms
    from .lr_schedule import ScheduleEvents, needs_events
    from .pictures import ValidationPictures

    callbacks: list[Callback] = []
    t = cfg.training
    if t.ema_decay is not None:
        if accelerator is not None:
            check_engine(accelerator)
        # First: its on_epoch_end puts the raw weights back before any other epoch-end hook runs (ema.py).
        callbacks.append(EMA(t.ema_decay, t.ema_start_step, t.ema_every))
    if needs_events(cfg):  # before the checkpoint policy: a checkpoint after an epoch holds the stepped schedule
        callbacks.append(ScheduleEvents())
    callbacks.append(CheckpointPolicy.from_config(cfg))
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStopping.from_config(cfg))
    if cfg.output.samples_every:
        callbacks.append(ValidationPictures(cfg.output.samples_every))
    if cfg.output.histograms_every and "tensorboard" in cfg.output.trackers:
        callbacks.append(Histograms(cfg.output.histograms_every))
    callbacks.append(FinalTestScore())  # does nothing where the data has no test split
    return callbacks
