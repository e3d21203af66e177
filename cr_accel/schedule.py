"""Learning-rate schedules as a factor of the peak LR per optimizer step.

The trainer steps the schedule itself, once per real optimizer step (not through accelerate's
AcceleratedScheduler, which steps `num_processes` times per call): the LR as a function of the
optimizer step is then the same for any number of processes and accumulation steps.

A schedule builder takes (num_training_steps, num_warmup_steps, min_lr_ratio, **kwargs) and returns
`factor(step) -> float`, the multiplier of the peak LR *for* optimizer step `step` (0-based):
step 0 is the first update. Warm-up is linear from 1/(warmup+1) to 1, reaching the peak at step
`num_warmup_steps`; the last step (num_training_steps - 1) is at `min_lr_ratio`.
"""

import bisect
import math

import torch

from .errors import CheckpointError
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
    """Sets the optimizer's LR for the coming optimizer step; its state is JSON.

    The curve is `make_factor(num_training_steps, num_warmup_steps)` -- the base curve -- read through a
    time map from the run's steps to the base curve's. The map is the identity until a resume changes the
    run's length (`retime`): then the rest of the base curve is stretched (or squeezed) over the rest of the
    run, so the LR goes on from where it was, with no jump, to `min_lr_ratio` at the new last step. The map
    is a list of knots [run step, base step], linear between them and past the last one; it travels in the
    state, so every later resume follows the same curve.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, make_factor, num_training_steps, num_warmup_steps):
        self.optimizer = optimizer
        self.make_factor = make_factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._time(num_training_steps, num_warmup_steps, knots=[])
        self._apply()
        self.last_step_lr = optimizer.param_groups[0]["lr"]  # before any step: the first step's

    def _time(self, num_training_steps, num_warmup_steps, knots):
        if (num_training_steps, num_warmup_steps) != (getattr(self, "num_training_steps", None),
                                                      getattr(self, "num_warmup_steps", None)):
            self.factor = self.make_factor(num_training_steps, num_warmup_steps)
        self.num_training_steps, self.num_warmup_steps = num_training_steps, num_warmup_steps  # the base curve's
        self.knots = knots

    @property
    def end(self):
        """The number of run steps the curve is timed for: step `end - 1` is at min_lr_ratio."""
        return self.knots[-1][0] + 1 if self.knots else self.num_training_steps

    def base_step(self, step):
        """The step of the base curve that the run's step `step` reads (fractional once re-timed)."""
        knots = self.knots
        if not knots or step <= knots[0][0]:
            return step
        i = min(bisect.bisect_right([s for s, _ in knots], step), len(knots) - 1)
        (s0, b0), (s1, b1) = knots[i - 1], knots[i]
        return b0 + (b1 - b0) * (step - s0) / (s1 - s0)

    def retime(self, step, num_training_steps):
        """Time the rest of the curve, from the run's step `step` on, for a run of `num_training_steps` steps:
        the base curve from where step `step` reads it to its last step, spread evenly over the steps left.
        Warm-up is never re-run or stretched: a run still warming up finishes it first. Returns whether the
        timing changed."""
        if num_training_steps == self.end:
            return False
        # Before the first knot the map is the identity, and every knot lies after the warm-up.
        pivot = step if self.base_step(step) >= self.num_warmup_steps else self.num_warmup_steps
        here = self.base_step(pivot)
        last = max(self.num_training_steps - 1, here)  # a curve already at its end stays there
        kept = [knot for knot in self.knots if knot[0] < pivot]
        self._time(self.num_training_steps, self.num_warmup_steps,
                   kept + [[pivot, here], [max(num_training_steps - 1, pivot + 1), last]])
        self._apply()
        return True

    def factor_at(self, step):
        return self.factor(self.base_step(step))

    def step(self):
        self.last_step_lr = self.optimizer.param_groups[0]["lr"]  # what the step just taken used (hooks read it)
        self.step_count += 1
        self._apply()

    def _apply(self):
        f = self.factor_at(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def lr_of_last_step(self):
        """The LR the most recent optimizer step used (the next one's before any step)."""
        step = max(self.step_count - 1, 0)
        return [base * self.factor_at(step) for base in self.base_lrs]

    def state_dict(self):
        return {"step_count": self.step_count, "base_lrs": self.base_lrs, "num_training_steps": self.num_training_steps,
                "num_warmup_steps": self.num_warmup_steps, "retimed": self.knots}

    def load_state_dict(self, state):
        """Checkpoints from before the timing was saved hold only `step_count` and `base_lrs`: their curve is
        the one this run built (the resume fills in the checkpoint's own timing where it knows it)."""
        unknown = sorted(set(state) - set(self.state_dict()))
        knots = state.get("retimed", [])
        if unknown or not all(isinstance(k, list) and len(k) == 2 for k in knots):
            raise CheckpointError(f"the schedule state is not valid: unknown keys {unknown} or knots {knots!r}")
        self.step_count = int(state["step_count"])
        self.base_lrs = list(state["base_lrs"])
        self._time(int(state.get("num_training_steps", self.num_training_steps)),
                   int(state.get("num_warmup_steps", self.num_warmup_steps)),
                   [[int(s), float(b)] for s, b in knots])
        self._apply()
