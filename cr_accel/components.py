"""Resolve and build the swappable parts named in a config: model, loss, data, optimizer, schedule, metrics.

`check_components` finds every problem (unknown names, kwargs the builder does not take, missing
paths) without building anything, so a bad config fails before any output is created.
"""

import functools
import inspect
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from . import optim, schedule
from .building import build_part
from .data import DATASETS
from .errors import UserError
from .losses import LOSSES
from .metrics import METRICS
from .models import MODELS
from .registry import accepts, check_kwargs, names

# section -> (registry, arguments the trainer passes itself)
PARTS = {
    "model": (MODELS, ()),
    "loss": (LOSSES, ()),
    "data": (DATASETS, ("seed",)),
    "optimizer": (optim.OPTIMIZERS, optim.INJECTED),
    "scheduler": (schedule.SCHEDULES, schedule.INJECTED),
}


def _with_synonym(key, message):
    """A name people bring from other trainers (`learning_rate`) gets the key it is here (`optimizer.lr`)."""
    from .config import SYNONYMS

    if key in SYNONYMS and "did you mean" not in message:
        return f"{message}; did you mean `{SYNONYMS[key]}`?"
    return message


def check_components(cfg):
    problems = []
    for section, (registry, injected) in PARTS.items():
        section_cfg = getattr(cfg, section)
        try:
            builder = registry.resolve(section_cfg.name)
        except LookupError as exc:
            problems.append((f"{section}.name", str(exc)))
            continue
        # `seed` is passed only to dataset builders that take it.
        injected = tuple(n for n in injected if n != "seed" or accepts(builder, "seed"))
        if section == "scheduler" and schedule.is_torch_scheduler(builder):
            injected = schedule.TORCH_INJECTED
        problems += [(f"{section}.{key}", _with_synonym(key, msg))
                     for key, msg in check_kwargs(builder, section_cfg.kwargs, injected)]
    problems += _check_scheduler(cfg)
    problems += _check_paths(cfg.data.kwargs)
    problems += _check_metrics(cfg.training.metrics)
    return problems


def _check_metrics(entries):
    """Every `training.metrics` entry names a metric, and its options are parameters of that metric (the outputs
    and targets are passed by the trainer). Malformed entries were reported by `config.check_values`."""
    from .config import metric_entry

    problems = []
    for i, entry in enumerate(entries):
        name, options = metric_entry(entry)
        if not isinstance(name, str):
            continue
        key = f"training.metrics[{i}]"
        try:
            metric = METRICS.resolve(name)
        except LookupError as exc:
            problems.append((f"{key}.name" if isinstance(entry, dict) else key, str(exc)))
            continue
        problems += [(f"{key}.{option}", msg) for option, msg in check_kwargs(metric, options, _inputs_of(metric))]
        data_range = options.get("data_range")
        if data_range is not None and not _positive_number(data_range):
            problems.append((f"{key}.data_range",
                             f"must be a number > 0 (the targets' max - min), got `{data_range!r}`"))
    return problems


def _inputs_of(metric):
    """The names of a metric's first two parameters, which take the outputs and the targets."""
    try:
        params = list(inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params[:2] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_paths(data_kwargs):
    """Dataset arguments named `path` or `*_path` / `*_dir` must exist: checked before anything runs."""
    problems = []
    for key, value in data_kwargs.items():
        if (key == "path" or key.endswith(("_path", "_dir"))) and value is not None:
            if not isinstance(value, str):
                problems.append((f"data.{key}", f"must be a path string, got `{value!r}`"))
            elif not Path(value).exists():
                problems.append((f"data.{key}", f"path `{value}` does not exist; point it at your data files"))
    return problems


def build_model(cfg):
    return MODELS.resolve(cfg.model.name)(**cfg.model.kwargs)


def build_model_skeleton(cfg):
    """The model of `cfg` with its parameter names and shapes but no memory: built on the meta device (on the
    CPU where a constructor needs real tensors), with every random stream left as it was."""
    import torch

    from .rng import rng_kept

    with rng_kept():
        try:
            with torch.device("meta"):
                return build_model(cfg)
        except Exception:
            return build_model(cfg)


def build_loss(cfg, metadata=None):
    """The loss of `cfg`; one that takes `data_range` (ssim, weighted with an ssim term, a user's) gets the
    targets' range from the dataset's `metadata` unless the config gives one."""
    builder = LOSSES.resolve(cfg.loss.name)
    kwargs = dict(cfg.loss.kwargs)
    if metadata is not None and "data_range" not in kwargs and names(builder, "data_range"):
        kwargs["data_range"] = data_range_of(metadata)
    return builder(**kwargs)


def build_datasets(cfg):
    """DatasetSplits from the `data` section; user builders may return a plain (train, val) pair. A builder's
    own failure is a UserError naming the section."""
    builder = DATASETS.resolve(cfg.data.name)
    kwargs = dict(cfg.data.kwargs)
    if accepts(builder, "seed"):
        kwargs["seed"] = cfg.seed
    from .data import DatasetSplits

    splits = build_part("data", cfg.data, builder, lambda: builder(**kwargs))
    if isinstance(splits, tuple) and len(splits) == 2:
        train, val = splits
        splits = DatasetSplits(train=train, val=val, metadata={})
    if not isinstance(splits, DatasetSplits):
        raise UserError(f"`data.name={cfg.data.name}` returned a {type(splits).__name__}; a dataset builder returns "
                        "cr_accel.data.DatasetSplits or a (train, val) pair of datasets")
    return splits


def build_val_sets(cfg):
    """{name: dataset} for `data.val_sets`: each the validation split the data builder makes with the `data`
    section's keys, changed by the set's own."""
    import dataclasses

    sets = {}
    for name, keys in cfg.data.val_sets.items():
        data = dataclasses.replace(cfg.data, kwargs={**cfg.data.kwargs, **keys}, val_sets={})
        try:
            sets[name] = build_datasets(dataclasses.replace(cfg, data=data)).val
        except UserError as exc:
            raise UserError(f"validation set `data.val_sets.{name}`: {exc}") from None
    return sets


def build_optimizer(cfg, params):
    o = cfg.optimizer
    return optim.OPTIMIZERS.resolve(o.name)(params, lr=o.lr, weight_decay=o.weight_decay, **o.kwargs)


def stage_config(cfg, stage):
    """The Config a stage (cr_accel/stages.py) trains with: the run's, with the stage's sections applied."""
    from .config import config_from_dict
    from .stages import stage_dict

    return config_from_dict(stage_dict(cfg.to_dict(), stage.raw), check_components=False)


def build_staged_schedule(cfg, stage_cfgs, spans, optimizer, steps_per_epoch):
    """One schedule over every stage: stage i's own schedule over its span, scaled by its lr; `steps_per_epoch[i]`
    is stage i's (its own batch size)."""
    from .stages import stage_factor

    def stage_builder(stage_cfg, per_epoch):
        s = stage_cfg.scheduler
        builder = schedule.SCHEDULES.resolve(s.name)
        given = schedule_arguments(stage_cfg, builder, per_epoch)
        return lambda span: builder(num_training_steps=span, num_warmup_steps=schedule.warmup_steps_for(s, span),
                                    min_lr_ratio=s.min_lr_ratio, **given)

    builders = [stage_builder(c, n) for c, n in zip(stage_cfgs, steps_per_epoch)]
    try:
        return schedule.StepSchedule(optimizer, lambda _total, _warmup: stage_factor(
            spans, stage_cfgs, cfg.optimizer.lr, builders), sum(spans), 0)
    except Exception as exc:  # a builder refusing a stage's scheduler keys
        from .building import describe_exception

        raise UserError(f"the stages' schedules could not be built: {describe_exception(exc)}; check each stage's "
                        "`scheduler` keys") from None


def build_schedule(cfg, optimizer, num_training_steps, steps_per_epoch=1):
    s = cfg.scheduler
    builder = schedule.SCHEDULES.resolve(s.name)
    warmup = schedule.warmup_steps_for(s, num_training_steps)
    if schedule.is_torch_scheduler(builder):
        return build_part("scheduler", s, builder, lambda: schedule.TorchSchedule(
            optimizer, builder, s.kwargs, s.interval or "epoch", num_training_steps, warmup))
    given = schedule_arguments(cfg, builder, steps_per_epoch)

    def make_factor(total, warmup):
        return builder(num_training_steps=total, num_warmup_steps=warmup, min_lr_ratio=s.min_lr_ratio, **given)

    return build_part("scheduler", s, builder, lambda: schedule.StepSchedule(
        optimizer, make_factor, num_training_steps, warmup))


def schedule_arguments(cfg, builder, steps_per_epoch):
    """The section's own keys, `scheduler.interval`, the steps per epoch (for a builder that takes them) and, for a
    metric-driven one (a `monitor` parameter: plateau), the monitored metric and its mode from `checkpoint` unless
    the section gives them."""
    s = cfg.scheduler
    given = dict(s.kwargs)
    if names(builder, "steps_per_epoch"):
        given["steps_per_epoch"] = steps_per_epoch
    if s.interval is not None:
        given["interval"] = s.interval
    if names(builder, "monitor"):
        given.setdefault("monitor", cfg.checkpoint.monitor)
        if given["monitor"] == cfg.checkpoint.monitor:
            given.setdefault("mode", cfg.checkpoint.mode)
    return given


def _check_scheduler(cfg):
    """`scheduler.interval` only where a schedule counts in it; a metric-driven schedule's monitor is a metric the
    run produces, and its mode is known."""
    from .config import _check_monitor

    s = cfg.scheduler
    try:
        builder = schedule.SCHEDULES.resolve(s.name)
    except LookupError:
        return []  # reported with the other parts
    problems = []
    if s.interval is not None and not (schedule.is_torch_scheduler(builder) or names(builder, "interval")):
        problems.append(("scheduler.interval", f"`{s.name}` is a curve over the whole run and takes no interval; "
                         "it applies to step, multistep, cosine_restarts and torch.optim.lr_scheduler targets"))
    if names(builder, "monitor"):
        monitor = s.kwargs.get("monitor", cfg.checkpoint.monitor)
        problems += [("scheduler.monitor", message) for _, message in
                     _check_monitor(monitor, cfg.training.metrics, cfg.data.val_sets)]
        if monitor != cfg.checkpoint.monitor and s.kwargs.get("mode") not in ("min", "max"):
            problems.append(("scheduler.mode", f"scheduler.monitor `{monitor}` is not checkpoint.monitor, so its "
                             "direction is not known: set scheduler.mode=min (lower is better) or max"))
    return problems


def build_metrics(cfg: Any, metadata: Mapping[str, Any] | None) -> dict[str, Callable[[Any, Any], Any]]:
    """{name: fn(outputs, targets) -> one value per sample} for `training.metrics`, options bound. A metric that
    takes `data_range` (psnr, ssim, or a user's) gets the targets' range from the dataset's `metadata` unless
    its entry gives one; see `data_range_of`."""
    from .config import metric_entry

    data_range = data_range_of(metadata)
    metrics = {}
    for entry in cfg.training.metrics:
        name, options = metric_entry(entry)
        metric = METRICS.resolve(name)
        if "data_range" not in options and names(metric, "data_range"):
            options["data_range"] = data_range
        metrics[name] = functools.partial(metric, **options) if options else metric
    return metrics


def data_bounds(metadata: Mapping[str, Any] | None) -> tuple[float, float]:
    """(low, high) of the targets from the dataset metadata's `data_range` (`[low, high]`: synthetic_cr's [0, 1],
    tensor_files' observed range of the training targets), else (0, 1): a user's dataset without metadata, class
    labels, or a range that is empty or not finite."""
    bounds = (metadata or {}).get("data_range")
    if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(_number(b) for b in bounds):
        if _positive_number(float(bounds[1]) - float(bounds[0])):
            return float(bounds[0]), float(bounds[1])
    return 0.0, 1.0


def data_range_of(metadata: Mapping[str, Any] | None) -> float:
    """The targets' max - min (see `data_bounds`): what psnr, ssim and the ssim loss measure against."""
    low, high = data_bounds(metadata)
    return high - low


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)

