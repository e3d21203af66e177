"""Learning-rate schedules as a factor of the peak LR per optimizer step.

The trainer steps the schedule itself, once per real optimizer step (not through accelerate's
AcceleratedScheduler, which steps `num_processes` times per call): the LR as a function of the
optimizer step is then the same for any number of processes and accumulation steps.

A schedule builder takes (num_training_steps, num_warmup_steps, min_lr_ratio, **kwargs) and returns
`factor(step) -> float`, the multiplier of the peak LR *for* optimizer step `step` (0-based):
step 0 is the first update. Warm-up is linear from 1/(warmup+1) to 1, reaching the peak at step
`num_warmup_steps`; the last step (num_training_steps - 1) is at `min_lr_ratio`.
"""

import math

import torch

from .registry import Registry

SCHEDULES = Registry("scheduler")
INJECTED = ("num_training_steps", "num_warmup_steps", "min_lr_ratio")


def _warmup(step, num_warmup_steps):
    return (step + 1) / (num_warmup_steps + 1)


def _progress(step, num_training_steps, num_warmup_steps):
    """0 at the end of warm-up, 1 at the last step."""
    span = max(1, num_training_steps - 1 - num_warmup_steps)
    return min(1.0, max(0.0, (step - num_warmup_steps) / span))


@SCHEDULES.register("cosine")
def cosine(num_training_steps, num_warmup_steps, min_lr_ratio=0.0):
    def factor(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        p = _progress(step, num_training_steps, num_warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


@SCHEDULES.register("linear")
def linear(num_training_steps, num_warmup_steps, min_lr_ratio=0.0):
    def factor(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        return 1 - (1 - min_lr_ratio) * _progress(step, num_training_steps, num_warmup_steps)

    return factor


@SCHEDULES.register("constant")
def constant(num_training_steps, num_warmup_steps, min_lr_ratio=0.0):
    def factor(step):
        return _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0

    return factor


def warmup_steps_for(scheduler_cfg, num_training_steps):
    if scheduler_cfg.warmup_steps is not None:
        return scheduler_cfg.warmup_steps
    return int(scheduler_cfg.warmup_ratio * num_training_steps)


class StepSchedule:
    """Sets the optimizer's LR for the coming optimizer step; its state is one integer, kept as JSON."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor):
        self.optimizer = optimizer
        self.factor = factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def step(self):
        self.step_count += 1
        self._apply()

    def _apply(self):
        f = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def lr_of_last_step(self):
        """The LR the most recent optimizer step used (the next one's before any step)."""
        step = max(self.step_count - 1, 0)
        return [base * self.factor(step) for base in self.base_lrs]

    def state_dict(self):
        return {"step_count": self.step_count, "base_lrs": self.base_lrs}

    def load_state_dict(self, state):
        self.step_count = int(state["step_count"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()
