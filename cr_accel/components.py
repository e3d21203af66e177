"""Resolve and build the swappable parts named in a config: model, loss, data, optimizer, schedule.

`check_components` finds every problem (unknown names, kwargs the builder does not take, missing
paths) without building anything, so a bad config fails before any output is created.
"""

from pathlib import Path

from . import optim, schedule
from .building import build_part
from .data import DATASETS
from .errors import UserError
from .losses import LOSSES
from .metrics import METRICS
from .models import MODELS
from .registry import accepts, check_kwargs

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
        problems += [(f"{section}.{key}", _with_synonym(key, msg))
                     for key, msg in check_kwargs(builder, section_cfg.kwargs, injected)]
    problems += _check_paths(cfg.data.kwargs)
    for i, name in enumerate(cfg.training.metrics):
        try:
            METRICS.resolve(str(name))
        except LookupError as exc:
            problems.append((f"training.metrics[{i}]", str(exc)))
    return problems


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


def build_loss(cfg):
    return LOSSES.resolve(cfg.loss.name)(**cfg.loss.kwargs)


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


def build_optimizer(cfg, params):
    o = cfg.optimizer
    return optim.OPTIMIZERS.resolve(o.name)(params, lr=o.lr, weight_decay=o.weight_decay, **o.kwargs)


def build_schedule(cfg, optimizer, num_training_steps):
    s = cfg.scheduler
    builder = schedule.SCHEDULES.resolve(s.name)

    def make_factor(total, warmup):
        return builder(num_training_steps=total, num_warmup_steps=warmup, min_lr_ratio=s.min_lr_ratio, **s.kwargs)

    return build_part("scheduler", s, builder, lambda: schedule.StepSchedule(
        optimizer, make_factor, num_training_steps, schedule.warmup_steps_for(s, num_training_steps)))


def build_metrics(cfg):
    return {name: METRICS.resolve(name) for name in cfg.training.metrics}

