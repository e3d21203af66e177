"""What an LR schedule follows besides the optimizer steps, told to it by a callback so the loop stays plain:
a validation's value of the monitored metric (`scheduler.name: plateau`) and the end of an epoch (a
`torch.optim.lr_scheduler` class stepped per epoch). The schedule keeps the state (it is checkpointed as the
`schedule` part); this callback only carries the events, and is built in only for those schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import Callback, TrainingState

if TYPE_CHECKING:
    from ..trainer import Trainer


class ScheduleEvents(Callback):
    state_key = "schedule_events"

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        monitor = trainer.schedule.monitor
        if monitor is None or metrics.get(monitor) is None:
            return
        factor = trainer.schedule.observe(metrics[monitor])
        if factor is not None:
            trainer.text_log.info(f"LR schedule: {monitor} has not improved for more than the scheduler's patience; "
                                  f"the LR is now {factor:.6g} of its peak from step {trainer.global_step + 1}")

    def on_epoch_end(self, trainer: Trainer, state: TrainingState) -> None:
        trainer.schedule.epoch_end()


def needs_events(cfg: Any) -> bool:
    """Whether the run's schedule follows validations or epochs (plateau, a torch scheduler class)."""
    from ..registry import names
    from ..schedule import SCHEDULES, is_torch_scheduler

    builder = SCHEDULES.resolve(cfg.scheduler.name)
    return is_torch_scheduler(builder) or names(builder, "monitor")  # a metric-driven builder takes `monitor`
