"""Which checkpoints a run writes, and when: `best/` when the monitored metric improves, a periodic
`step_NNNNNNNN/` every `checkpoint.save_every` epochs (and every `save_every_steps` optimizer steps), `last/`
with every periodic one and at the end.

A callback like any other, so a run can replace it: a callback given to the Trainer that is a `CheckpointPolicy`
(a subclass overriding `targets_after_epoch` / `targets_after_step`, say) takes the built-in one's place. The
trainer asks it for targets at fixed points -- after a step's record is logged and after every on_epoch_end
hook -- so a checkpoint always holds what the logs and the other callbacks have done by then. The checkpoint
written on preemption is the trainer's own, whatever the policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import Callback
from .monitoring import Monitor

if TYPE_CHECKING:
    from ..trainer import Trainer


class CheckpointPolicy(Callback):
    state_key = "checkpoint_policy"

    def __init__(self, monitor: str = "val_loss", mode: str = "min", save_every: int = 1,
                 save_every_steps: int | None = None) -> None:
        self.monitor = Monitor(monitor, mode)
        self.save_every, self.save_every_steps = save_every, save_every_steps
        self.improved = False  # since the trainer last asked for targets

    @classmethod
    def from_config(cls, cfg: Any) -> CheckpointPolicy:
        c = cfg.checkpoint
        return cls(c.monitor, c.mode, c.save_every, c.save_every_steps)

    @property
    def best(self) -> float | None:
        return self.monitor.best

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.monitor.update(metrics):
            self.improved = True

    def targets_after_step(self, trainer: Trainer) -> list[str]:
        """After an optimizer step (its record logged, a validation due at it done)."""
        targets = self._take_best()
        if self.save_every_steps and trainer.global_step % self.save_every_steps == 0:
            targets.append("periodic")
        return targets

    def targets_after_epoch(self, trainer: Trainer, epoch_number: int, finishing: bool) -> list[str]:
        """After epoch `epoch_number` (from 1) and its on_epoch_end hooks; `finishing`: no epoch follows."""
        targets = self._take_best()
        if epoch_number % self.save_every == 0:
            targets += ["periodic", "last"]
        elif finishing:
            targets.append("last")
        return targets

    def _take_best(self) -> list[str]:
        improved, self.improved = self.improved, False
        return ["best"] if improved else []

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.monitor.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.best = _optional_float(state, "best", "checkpoint policy")

    def load_legacy(self, trainer_state: dict[str, Any]) -> None:
        """Checkpoints from before the policy was a callback kept its best value in the trainer's part."""
        self.monitor.best = _optional_float(trainer_state, "best_value", "trainer")


class EarlyStopping(Callback):
    """Stops the run (status `stopped_early`) after `patience` validations in a row without an improvement of
    `monitor` by more than `min_delta`."""

    state_key = "early_stopping"

    def __init__(self, monitor: str, mode: str = "min", patience: int = 10, min_delta: float = 0.0) -> None:
        self.monitor = Monitor(monitor, mode, min_delta)
        self.patience = patience
        self.bad_validations = 0

    @classmethod
    def from_config(cls, cfg: Any) -> EarlyStopping:
        t, c = cfg.training, cfg.checkpoint
        return cls(c.monitor, c.mode, t.early_stopping_patience, t.early_stopping_min_delta)

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        improved = self.monitor.update(metrics)
        if improved is None:
            return
        self.bad_validations = 0 if improved else self.bad_validations + 1
        if self.bad_validations >= self.patience and not trainer.should_stop:
            trainer.should_stop, trainer.stop_reason = True, "stopped_early"
            trainer.text_log.info(f"early stopping: {self.monitor.metric} has not improved for {self.patience} "
                                  f"validations (best {self.monitor.best:.6g})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.monitor.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.best = _optional_float(state, "best", "early stopping")
        self.bad_validations = _count(state, "bad_validations", "early stopping")

    def load_legacy(self, trainer_state: dict[str, Any]) -> None:
        self.monitor.best = _optional_float(trainer_state, "best_value", "trainer")
        self.bad_validations = _count(trainer_state, "bad_validations", "trainer")


def _optional_float(state: dict[str, Any], key: str, part: str) -> float | None:
    from ..errors import CheckpointError

    value = state.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CheckpointError(f"the {part} state is not valid: `{key}` is {value!r}, not a number or null")
    return None if value is None else float(value)


def _count(state: dict[str, Any], key: str, part: str) -> int:
    from ..errors import CheckpointError

    value = state.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"the {part} state is not valid: `{key}` is {value!r}, not a count")
    return value
