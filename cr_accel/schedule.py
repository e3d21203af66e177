"""Learning-rate schedules as a factor of the peak LR per optimizer step.

The trainer steps the schedule itself, once per real optimizer step (not through accelerate's
AcceleratedScheduler, which steps `num_processes` times per call): the LR as a function of the
optimizer step is then the same for any number of processes and accumulation steps.

A schedule builder takes (num_training_steps, num_warmup_steps, min_lr_ratio, **kwargs) and returns
`factor(step) -> float`, the multiplier of the peak LR *for* optimizer step `step` (0-based):
step 0 is the first update. Warm-up is linear from 1/(warmup+1) to 1, reaching the peak at step
`num_warmup_steps`; the last step (num_training_steps - 1) is at `min_lr_ratio`.

A builder may also take `steps_per_epoch` (injected) and `interval` (`scheduler.interval`: whether its own
lengths count optimizer steps or epochs). `plateau` is metric-driven: its factor object also takes the
validations' values (`observe`) and has JSON state of its own, which `StepSchedule` saves with its own. A
`torch.optim.lr_scheduler` class is run by `TorchSchedule` (see there).
"""

import bisect
import math
from collections.abc import Sequence

import torch

from .errors import CheckpointError
from .registry import Registry

SCHEDULES = Registry("scheduler")
INJECTED = ("num_training_steps", "num_warmup_steps", "min_lr_ratio", "steps_per_epoch")
TORCH_INJECTED = ("optimizer", "last_epoch")
INTERVALS = ("step", "epoch")


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


def _units(step, interval, steps_per_epoch):
    """How many of the schedule's units (optimizer steps, or whole epochs) lie before optimizer step `step`."""
    return step if interval == "step" else step // max(1, steps_per_epoch)


def _check_interval(interval):
    if interval not in INTERVALS:
        raise ValueError(f"interval must be `step` or `epoch`, got {interval!r}")


@SCHEDULES.register("step")
def step_decay(num_training_steps, num_warmup_steps, min_lr_ratio=0.0, steps_per_epoch=1, step_size: int = 30,
               gamma: float = 0.1, interval="epoch"):
    """The LR times `gamma` every `step_size` epochs (or steps, with interval `step`), counted from the start of
    the run as torch's StepLR counts; never below `min_lr_ratio`."""
    _check_interval(interval)
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")

    def factor(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        return max(min_lr_ratio, gamma ** (_units(int(step), interval, steps_per_epoch) // step_size))

    return factor


@SCHEDULES.register("multistep")
def multistep(num_training_steps, num_warmup_steps, min_lr_ratio=0.0, steps_per_epoch=1,
              milestones: Sequence[int] = (), gamma: float = 0.1, interval="epoch"):
    """The LR times `gamma` at each of `milestones` (epochs, or steps with interval `step`), as torch's
    MultiStepLR; never below `min_lr_ratio`."""
    _check_interval(interval)
    marks = sorted(int(m) for m in milestones)

    def factor(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        passed = bisect.bisect_right(marks, _units(int(step), interval, steps_per_epoch))
        return max(min_lr_ratio, gamma ** passed)

    return factor


@SCHEDULES.register("cosine_restarts")
def cosine_restarts(num_training_steps, num_warmup_steps, min_lr_ratio=0.0, steps_per_epoch=1,
                    cycle_length: int = 10, cycle_mult: int = 1, interval="step"):
    """Cosine from the peak to `min_lr_ratio` over `cycle_length` steps (or epochs, with interval `epoch`), then
    a restart at the peak with each cycle `cycle_mult` times longer than the one before (SGDR; torch's
    CosineAnnealingWarmRestarts with T_0 = cycle_length, T_mult = cycle_mult), after the warm-up. With interval
    `epoch` the curve still moves every step (fractional epochs)."""
    _check_interval(interval)
    if cycle_length < 1 or cycle_mult < 1:
        raise ValueError(f"cycle_length and cycle_mult must be >= 1, got {cycle_length} and {cycle_mult}")
    unit = 1 if interval == "step" else max(1, steps_per_epoch)

    def factor(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        t, length = (step - num_warmup_steps) / unit, cycle_length
        while t >= length:  # cycles grow geometrically: a run crosses few of them
            t, length = t - length, length * cycle_mult
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t / length))

    return factor


class Plateau:
    """The factor of `plateau`: the warm-up, then 1 multiplied by `factor` each time the monitored value has not
    improved for more than `patience` validations (torch's ReduceLROnPlateau rules: `threshold` in
    `threshold_mode` rel or abs, `cooldown` validations after a reduction that count as no bad ones), never
    below `min_lr_ratio`. Each reduction is kept with the optimizer step it starts at, so the factor stays a
    function of the step (the LR an earlier step used can be read back) and its JSON state is exact on resume."""

    open_ended = True  # its curve does not depend on the run's length: nothing to re-time on a resume

    def __init__(self, num_warmup_steps, min_lr_ratio, monitor, mode, factor, patience, threshold, threshold_mode,
                 cooldown):
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(f"mode must be min or max and threshold_mode rel or abs, got {mode!r}, {threshold_mode!r}")
        if patience < 0 or cooldown < 0 or threshold < 0:
            raise ValueError("patience, cooldown and threshold must be >= 0")
        self.num_warmup_steps, self.min_lr_ratio = num_warmup_steps, min_lr_ratio
        self.monitor, self.mode, self.reduce_by = monitor, mode, factor
        self.patience, self.threshold, self.threshold_mode, self.cooldown = patience, threshold, threshold_mode, cooldown
        self.best = None
        self.bad_validations = 0
        self.cooldown_left = 0
        self.reductions = []  # [[first optimizer step at the new scale, scale]]

    def __call__(self, step):
        if step < self.num_warmup_steps:
            return _warmup(step, self.num_warmup_steps) * self.scale_at(step)
        return self.scale_at(step)

    def scale_at(self, step):
        i = bisect.bisect_right([s for s, _ in self.reductions], step)
        return self.reductions[i - 1][1] if i else 1.0

    def _improves(self, value):
        if self.best is None:
            return True
        margin = self.best * self.threshold if self.threshold_mode == "rel" else self.threshold  # as torch
        return value < self.best - margin if self.mode == "min" else value > self.best + margin

    def observe(self, value, step):
        """One validation's value of the monitored metric; a reduction applies from optimizer step `step` on.
        Returns the new scale when it was reduced, else None."""
        value = float(value)
        if math.isnan(value):
            return None
        if self._improves(value):
            self.best, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_validations = 0
        if self.bad_validations <= self.patience:
            return None
        self.bad_validations, self.cooldown_left = 0, self.cooldown
        scale = self.scale_at(step)
        new = max(scale * self.reduce_by, self.min_lr_ratio)
        if new >= scale:
            return None
        self.reductions = [r for r in self.reductions if r[0] < step] + [[step, new]]
        return new

    def state_dict(self):
        return {"best": self.best, "bad_validations": self.bad_validations, "cooldown_left": self.cooldown_left,
                "reductions": self.reductions}

    def load_state_dict(self, state):
        best, reductions = state.get("best"), state.get("reductions", [])
        counts = [state.get("bad_validations", 0), state.get("cooldown_left", 0)]
        if (best is not None and not isinstance(best, (int, float))) or not all(isinstance(c, int) for c in counts) \
                or not all(isinstance(r, list) and len(r) == 2 for r in reductions):
            raise CheckpointError(f"the plateau schedule's state is not valid: {state!r}")
        self.best = None if best is None else float(best)
        self.bad_validations, self.cooldown_left = counts
        self.reductions = [[int(s), float(f)] for s, f in reductions]


@SCHEDULES.register("plateau")
def plateau(num_training_steps, num_warmup_steps, min_lr_ratio=0.0, monitor: str | None = None,
            mode: str | None = None, factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
            threshold_mode: str = "rel", cooldown: int = 0):
    """Drop the LR by `factor` when `monitor` (default: checkpoint.monitor, in checkpoint.mode) stalls; see
    `Plateau`. `monitor` and `mode` are filled in by the trainer when not given."""
    return Plateau(num_warmup_steps, min_lr_ratio, monitor, mode, factor, patience, threshold, threshold_mode,
                   cooldown)


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
        if num_training_steps == self.end or getattr(self.factor, "open_ended", False):
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

    @property
    def monitor(self):
        """The metric a metric-driven schedule (plateau) follows, else None."""
        return getattr(self.factor, "monitor", None)

    def observe(self, value):
        """A validation's value of `monitor`: a metric-driven factor may lower the LR from the next step on.
        Returns the new factor when it changed, else None."""
        changed = self.factor.observe(value, self.step_count)
        self._apply()
        return changed

    def epoch_end(self):
        """Nothing: a factor of the step already knows where epochs end (see TorchSchedule)."""

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
        state = {"step_count": self.step_count, "base_lrs": self.base_lrs,
                 "num_training_steps": self.num_training_steps, "num_warmup_steps": self.num_warmup_steps,
                 "retimed": self.knots}
        if hasattr(self.factor, "state_dict"):  # a metric-driven factor's own record (plateau)
            state["factor_state"] = self.factor.state_dict()
        return state

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
        if hasattr(self.factor, "load_state_dict") and "factor_state" in state:
            self.factor.load_state_dict(state["factor_state"])
        self._apply()


def is_torch_scheduler(builder):
    """Whether `builder` is a torch.optim.lr_scheduler class (run by TorchSchedule, not a factor builder)."""
    return isinstance(builder, type) and issubclass(builder, torch.optim.lr_scheduler.LRScheduler)


# What torch prints when a scheduler it did not see wrap the optimizer is stepped: the trainer steps both itself.
_ORDER_WARNINGS = r".*(lr_scheduler\.step\(\)|optimizer\.step\(\) has been overridden).*"


class TorchSchedule:
    """A torch.optim.lr_scheduler class as the run's schedule (`scheduler.name: torch.optim.lr_scheduler:StepLR`
    with its own arguments as the section's other keys): stepped after every optimizer step (`interval: step`) or
    at the end of every epoch (`interval: epoch`, the default, as torch's examples step them). The linear
    warm-up comes first: for its steps the scheduler is not stepped and the LR is its first one times the
    warm-up factor. Its state (torch's `state_dict`, which must be JSON: not LambdaLR's functions) travels in the
    checkpoint with the step count, so a resume goes on exactly. The same interface as StepSchedule."""

    open_ended = True

    def __init__(self, optimizer, scheduler_class, kwargs, interval, num_training_steps, num_warmup_steps):
        _check_interval(interval)
        if issubclass(scheduler_class, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError("it needs the monitored metric: use `scheduler.name: plateau` (the same rules, after the "
                             "warm-up, following scheduler.monitor)")
        self.optimizer, self.interval = optimizer, interval
        self.inner = scheduler_class(optimizer, **kwargs)
        self._check_json(self.inner.state_dict())
        self.base_lrs = list(self.inner.base_lrs)
        self.num_training_steps, self.num_warmup_steps = num_training_steps, num_warmup_steps
        self.step_count = 0
        self._apply()
        self.last_step_lrs = [group["lr"] for group in optimizer.param_groups]  # before any step: the first step's

    @staticmethod
    def _check_json(state):
        import json

        try:
            json.dumps(state)
        except (TypeError, ValueError):
            raise ValueError("its state_dict is not plain JSON (a function or an object inside), so it cannot be "
                             "checkpointed: use a built-in schedule or a scheduler without functions") from None

    @property
    def last_step_lr(self):
        return self.last_step_lrs[0]

    @property
    def end(self):
        return self.num_training_steps

    @property
    def monitor(self):
        return None

    def base_step(self, step):
        return step

    def factor_at(self, step):
        """The factor of the LR now over the first LR (a resume's notes read it; this schedule is never re-timed)."""
        return self.optimizer.param_groups[0]["lr"] / self.base_lrs[0] if self.base_lrs[0] else 0.0

    def retime(self, step, num_training_steps):
        self.num_training_steps = num_training_steps
        return False

    def _warming(self):
        return self.step_count < self.num_warmup_steps

    def _step_inner(self):
        """One step of torch's scheduler, from its own last LR (chainable schedulers read the group's LR)."""
        import warnings

        for group, lr in zip(self.optimizer.param_groups, self.inner.get_last_lr()):
            group["lr"] = lr
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ORDER_WARNINGS, category=UserWarning)
            self.inner.step()

    def step(self):
        self.last_step_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.step_count += 1
        if self.interval == "step" and self.step_count > self.num_warmup_steps:
            self._step_inner()
        self._apply()

    def epoch_end(self):
        if self.interval == "epoch" and not self._warming():
            self._step_inner()
            self._apply()

    def observe(self, value):
        return None

    def _apply(self):
        warm = _warmup(self.step_count, self.num_warmup_steps) if self._warming() else 1.0
        for group, lr in zip(self.optimizer.param_groups, self.inner.get_last_lr()):
            group["lr"] = lr * warm

    def lr_of_last_step(self):
        return list(self.last_step_lrs)

    def state_dict(self):
        return {"step_count": self.step_count, "base_lrs": self.base_lrs, "num_training_steps": self.num_training_steps,
                "num_warmup_steps": self.num_warmup_steps, "last_step_lrs": self.last_step_lrs,
                "torch_state": self.inner.state_dict()}

    def load_state_dict(self, state):
        unknown = sorted(set(state) - set(self.state_dict()) - {"retimed"})
        if unknown or not isinstance(state.get("torch_state"), dict):
            raise CheckpointError(f"the schedule state is not valid for a torch scheduler: unknown keys {unknown} or "
                                  "no `torch_state` (was the checkpoint written with another scheduler.name?)")
        self.step_count = int(state["step_count"])
        self.num_warmup_steps = int(state.get("num_warmup_steps", self.num_warmup_steps))
        self.last_step_lrs = [float(lr) for lr in state.get("last_step_lrs", self.last_step_lrs)]
        self.inner.load_state_dict(state["torch_state"])
        self._apply()
