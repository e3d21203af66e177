"""Training in stages: a list of named spans of the run, each with its own settings.

    stages:
      - name: warmup
        epochs: 5
        optimizer: {lr: 1.0e-3}
        scheduler: {name: constant, warmup_ratio: 0.0}
        freeze: [stem, down]            # module name prefixes: the encoder of conv_autoencoder
      - name: finetune
        epochs: 45
        optimizer: {lr: 1.0e-4, weight_decay: 0.01}
        loss: {name: weighted, terms: {mse: 1.0, ssim: 0.1}}
        data: {batch_size: 16}

A stage's sections change the top-level ones for its span (a `scheduler` or `loss` with another `name` starts
from that builder's defaults rather than the top-level one's keys). Lengths are all `epochs` (adding up to
training.epochs) or all `steps` (adding up to training.max_steps). Every stage's span is known in optimizer
steps before the run starts, so the LR of every step is one function of the step -- each stage's schedule over
its own span, scaled by its lr -- and a resume anywhere, mid-stage included, is exact.

Frozen parameters keep being differentiated (one model wrapper serves every stage, also under DDP, where the
set of parameters with gradients is fixed when the model is wrapped); their gradients are dropped before
clipping and the optimizer step, so neither the clip norm nor the update (weight decay and moments included:
torch's optimizers skip parameters without a gradient) touches them.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, UserError

STAGE_KEYS = ("name", "epochs", "steps", "optimizer", "scheduler", "loss", "freeze", "data")
OPTIMIZER_KEYS = ("lr", "weight_decay")
DATA_KEYS = ("batch_size",)


@dataclass
class Stage:
    name: str
    length: int  # in `unit`s
    unit: str  # "epochs" or "steps"
    raw: dict[str, Any]  # the stage as written

    @property
    def freeze(self) -> list[str]:
        return list(self.raw.get("freeze") or [])


def check_stages(raw: Any, cfg_dict: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every problem of the `stages` list, before anything runs."""
    if not isinstance(raw, list):
        return [("stages", f"must be a list of stages (each with a `name` and `epochs` or `steps`), got `{raw!r}`")]
    problems: list[tuple[str, str]] = []
    names: set[str] = set()
    units = set()
    for i, stage in enumerate(raw):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            problems.append((where, f"must be a mapping with `name` and `epochs` or `steps`, got `{stage!r}`"))
            continue
        problems += _check_stage_keys(where, stage)
        name = stage.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append((f"{where}.name", "every stage needs a name (it is logged as `stage`)"))
        elif name in names:
            problems.append((f"{where}.name", f"`{name}` names two stages; give each stage its own name"))
        else:
            names.add(name)
        lengths = [unit for unit in ("epochs", "steps") if unit in stage]
        if len(lengths) != 1:
            problems.append((where, "give the stage's length as `epochs` or `steps` (one of them)"))
        else:
            value = stage[lengths[0]]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append((f"{where}.{lengths[0]}", f"must be an integer >= 1, got `{value!r}`"))
            units.add(lengths[0])
        problems += _check_sections(where, stage, cfg_dict)
    if len(units) > 1:
        problems.append(("stages", "give every stage's length in the same unit: all `epochs` or all `steps`"))
    if raw and cfg_dict.get("training", {}).get("auto_batch_size"):
        # Its search sizes one training loader; stages may each train with a batch size of their own.
        problems.append(("training.auto_batch_size", "does not work with `stages` yet: set data.batch_size (and "
                         "training.gradient_accumulation_steps) by hand, or training.auto_batch_size=false"))
    if problems or not raw:
        return problems
    return _check_total(raw, units.pop(), cfg_dict.get("training", {}))


def _check_stage_keys(where: str, stage: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for key in stage:
        if key not in STAGE_KEYS:
            close = difflib.get_close_matches(str(key), STAGE_KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append((f"{where}.{key}", f"is not a stage key{hint}; a stage has: {', '.join(STAGE_KEYS)}"))
    return problems


def _check_sections(where: str, stage: dict[str, Any], cfg_dict: dict[str, Any]) -> list[tuple[str, str]]:
    """The stage's sections, merged into the config, must make a valid config themselves."""
    problems = []
    for section, allowed in (("optimizer", OPTIMIZER_KEYS), ("data", DATA_KEYS)):
        extra = [k for k in (stage.get(section) or {}) if k not in allowed]
        if extra:
            problems.append((f"{where}.{section}", f"a stage may change {', '.join(allowed)} here, not "
                             f"{', '.join(map(str, extra))}"))
    if stage.get("data") and "steps" in stage:
        problems.append((f"{where}.data", "a stage measured in `steps` may end mid-epoch, where the batch size "
                         "cannot change: give the stages' lengths in `epochs` to change `data.batch_size`"))
    freeze = stage.get("freeze", [])
    if not isinstance(freeze, list) or not all(isinstance(p, str) and p for p in freeze):
        problems.append((f"{where}.freeze", f"must be a list of module name prefixes, e.g. [stem, down], got "
                         f"`{freeze!r}`"))
    for section in ("optimizer", "scheduler", "loss", "data"):
        if section in stage and not isinstance(stage[section], dict):
            problems.append((f"{where}.{section}", f"must be a mapping of `{section}` keys, got `{stage[section]!r}`"))
    if problems:
        return problems
    from .config import ConfigError, config_from_dict

    merged = stage_dict(cfg_dict, stage)
    try:
        config_from_dict(merged)
    except ConfigError as exc:
        problems += [(where, f"with this stage's changes, {problem}") for problem in exc.problems]
    return problems + _check_stage_schedule(where, merged.get("scheduler", {}).get("name", "cosine"))


def _check_stage_schedule(where: str, name: Any) -> list[tuple[str, str]]:
    """A stage's schedule is a curve over its own span: `plateau` (driven by validations) and torch's scheduler
    objects (with state of their own) are not curves that can be cut into spans."""
    from .schedule import SCHEDULES, is_torch_scheduler

    try:
        builder = SCHEDULES.resolve(name)
    except (LookupError, TypeError):
        return []  # reported by the config check
    if name == "plateau" or is_torch_scheduler(builder):
        return [(f"{where}.scheduler", f"`{name}` cannot run within stages (each stage's schedule is a curve over "
                 "its own span): give the stages cosine, linear, constant, step, multistep or cosine_restarts")]
    return []


def _check_total(raw: list[dict[str, Any]], unit: str, training: dict[str, Any]) -> list[tuple[str, str]]:
    total = sum(stage[unit] for stage in raw)
    if unit == "epochs":
        epochs = training.get("epochs", 300)
        if total != epochs:
            return [("stages", f"the stages add up to {total} epochs but training.epochs is {epochs}: set "
                     f"training.epochs={total} (or change the stages' lengths)")]
    elif training.get("max_steps") != total:
        return [("stages", f"the stages add up to {total} steps but training.max_steps is "
                 f"{training.get('max_steps')}: set training.max_steps={total} (and training.epochs high enough)")]
    return []


def stage_dict(cfg_dict: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as a dict, with the stage's sections applied."""
    merged = copy.deepcopy(cfg_dict)
    merged["stages"] = []
    for section in ("optimizer", "scheduler", "loss", "data"):
        changes = stage.get(section) or {}
        base = merged.get(section, {})
        if "name" in changes and changes["name"] != base.get("name"):
            base = {}  # another builder: its own defaults, not the top-level one's keys
        merged[section] = {**base, **changes}
    return merged


def parse(raw: list[dict[str, Any]]) -> list[Stage]:
    return [Stage(name=s["name"], length=s["epochs"] if "epochs" in s else s["steps"],
                  unit="epochs" if "epochs" in s else "steps", raw=s) for s in raw]


class Stages:
    """Where the run is among its stages; a stateful part of checkpoints (`current_stage`, `stage_step`).

    `spans[i]` is stage i's length in optimizer steps, known once the loaders are built: an epoch stage spans
    its epochs times the steps per epoch at its own batch size.
    """

    def __init__(self, stages: list[Stage], spans: list[int]) -> None:
        self.stages = stages
        self.set_spans(spans)
        self.current = 0
        self.stage_step = 0  # optimizer steps done in the current stage

    def set_spans(self, spans: list[int]) -> None:
        self.spans = spans
        self.starts = [sum(spans[:i]) for i in range(len(spans))]

    def __bool__(self) -> bool:
        return bool(self.stages)

    @property
    def stage(self) -> Stage:
        return self.stages[self.current]

    def index_at(self, step: int) -> int:
        """The stage that optimizer step `step` (0-based) belongs to; the last one past the end."""
        for i in range(len(self.spans) - 1, -1, -1):
            if step >= self.starts[i]:
                return i
        return 0

    def after_step(self, global_step: int) -> bool:
        """Count an optimizer step; True when it ended the current stage and a next one begins."""
        self.stage_step = global_step - self.starts[self.current]
        if self.stage_step >= self.spans[self.current] and self.current + 1 < len(self.stages):
            self.current += 1
            self.stage_step = 0
            return True
        return False

    def record(self, global_step: int) -> dict[str, Any]:
        """`stage` and `stage_id` of the last step done (a record's values belong to it)."""
        i = self.index_at(max(global_step - 1, 0))
        return {"stage": self.stages[i].name, "stage_id": i}

    def state_dict(self) -> dict[str, Any]:
        return {"current_stage": self.current, "stage_step": self.stage_step, "names": [s.name for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current, step = state.get("current_stage"), state.get("stage_step")
        if state.get("names") != [s.name for s in self.stages]:
            raise CheckpointError(f"the checkpoint's stages {state.get('names')} are not this config's "
                                  f"{[s.name for s in self.stages]}")
        if not (isinstance(current, int) and 0 <= current < len(self.stages) and isinstance(step, int) and step >= 0):
            raise CheckpointError(f"the stage state is not valid: current_stage {current!r}, stage_step {step!r}")
        self.current, self.stage_step = current, step


def check_freeze(stages: list[Stage], model: Any) -> None:
    """Every `freeze` prefix must name modules of the model: a typo would otherwise train what was to be frozen."""
    names = [name for name, _ in model.named_parameters()]
    modules = sorted({name.split(".")[0] for name in names})
    for i, stage in enumerate(stages):
        for prefix in stage.freeze:
            if not any(_matches(name, prefix) for name in names):
                close = difflib.get_close_matches(prefix, modules, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise UserError(f"stages[{i}].freeze: `{prefix}` names no parameter of the model{hint}; its top-level "
                                f"modules: {', '.join(modules)}")


def frozen_parameters(model: Any, prefixes: list[str]) -> tuple[list[Any], list[Any]]:
    """(frozen, trainable) parameters of `model` for these module name prefixes."""
    frozen: list[Any] = []
    trainable: list[Any] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (frozen if any(_matches(name, p) for p in prefixes) else trainable).append(param)
    return frozen, trainable


def _matches(name: str, prefix: str) -> bool:
    """`down` matches `down.0.weight`, not `downsample.weight`."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def stage_factor(spans: list[int], configs: list[Any], base_lr: float, builders: list[Any]) -> Any:
    """factor(step) over the whole run: stage i's schedule over its own span, times its lr over `base_lr`."""
    starts = [sum(spans[:i]) for i in range(len(spans))]
    factors = [build(span) for build, span in zip(builders, spans)]
    ratios = [cfg.optimizer.lr / base_lr for cfg in configs]

    def factor(step: float) -> float:
        i = next((j for j in range(len(starts) - 1, -1, -1) if step >= starts[j]), 0)
        return ratios[i] * factors[i](step - starts[i])

    return factor
