"""The typed, strict config: YAML and `section.key=value` overrides into dataclasses.

Every problem in a file is collected and reported together (ConfigError), before anything is created:
unknown keys (with the closest valid key), wrong types, impossible values. Sections that name a
swappable part (model, loss, data, optimizer, scheduler) also take that part's own keyword arguments;
those are checked against its signature by `cr_accel.components`.
"""

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from .errors import ConfigError, UserError

@dataclass
class ModelConfig:
    """`name` picks the model; every other key is passed to its constructor."""

    name: str = "conv_autoencoder"
    kwargs: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    """`name` picks the loss; every other key is passed to its constructor."""

    name: str = "mse"
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """`name` picks the dataset; keys other than the loader's own are passed to the dataset builder."""

    name: str = "synthetic_cr"
    batch_size: int = 32
    val_batch_size: Optional[int] = None  # None: same as batch_size
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    persistent_workers: bool = False  # keep the workers between epochs (only with num_workers > 0)
    prefetch_factor: Optional[int] = None  # batches each worker loads ahead; None: torch's (2); only with workers
    # page-locked host batches, copied to the device without blocking: None = on when the device is CUDA
    pin_memory: Optional[bool] = None
    # inputs normalised by statistics of the training split kept in checkpoints: none, per_channel, minmax, or
    # {mean, std}; see data/normalize.py
    normalize: Union[str, dict, None] = None
    # more validation sets: {name: {builder keys that differ from this section's}}; metrics val/<name>/<metric>
    val_sets: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-3
    kwargs: dict = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    """LR factor per optimizer step: linear warm-up, then the named shape down to `min_lr_ratio`."""

    name: str = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None  # overrides warmup_ratio when set
    min_lr_ratio: float = 0.0
    # whether `step`, `multistep`, `cosine_restarts` and torch.optim.lr_scheduler targets count their lengths in
    # optimizer steps or epochs (and when a torch scheduler is stepped); None: the schedule's own default
    interval: Optional[Literal["step", "epoch"]] = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class TrainingConfig:
    epochs: int = 300
    max_steps: Optional[int] = None  # stop after this many optimizer steps, whatever `epochs` says
    gradient_accumulation_steps: int = 1
    # before training, find the largest micro-batch that fits (halving data.batch_size on out-of-memory) and
    # raise the accumulation so the global batch stays the same; the choice is kept in the checkpoints
    auto_batch_size: bool = False
    grad_clip: Optional[float] = 1.0  # max total gradient norm; None: no clipping (the norm is still recorded)
    use_amp: Optional[bool] = None  # short form: true = mixed_precision auto, false = no
    mixed_precision: Optional[Literal["no", "fp16", "bf16", "auto"]] = None
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    eval_every_steps: Optional[int] = None  # also validate every this many optimizer steps (long epochs)
    log_every: int = 50  # optimizer steps between progress lines; also how often losses leave the device
    early_stopping_patience: Optional[int] = None  # validations without improvement of checkpoint.monitor
    early_stopping_min_delta: float = 0.0
    skip_nonfinite: bool = False  # skip optimizer steps with a non-finite gradient norm instead of stopping
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    # extra validation metrics: names, or mappings of a name and options, e.g. [psnr, {name: ssim, window: 7}]
    metrics: list = field(default_factory=list)
    # torch.compile the model in place (its parameter names stay plain, so checkpoints resume either way);
    # true = the default mode, or a mode by name.
    compile: typing.Union[bool, Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = False
    # An exponential moving average of the weights (callbacks/ema.py), used for validation, `best/` and
    # load_model: null = off; else the decay in (0, 1), e.g. 0.999. Before optimizer step `ema_start_step` the
    # average copies the weights; from then on it is updated every `ema_every` optimizer steps.
    ema_decay: Optional[float] = None
    ema_start_step: int = 0
    ema_every: int = 1


@dataclass
class CheckpointConfig:
    save_every: int = 10  # epochs between periodic checkpoints
    save_every_steps: Optional[int] = None
    keep_last_n: Optional[int] = 3  # periodic checkpoints kept; None keeps all
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    # Write checkpoints in the background: training waits only for a copy of the state in CPU memory.
    # Runs under DeepSpeed or FSDP save synchronously (their engines write the files) and say so in the log.
    async_save: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    log_file: str = "train.log"  # relative paths are inside `dir`
    metrics_file: str = "metrics.csv"  # one row per epoch
    steps_file: str = "steps.csv"  # one row every training.log_every optimizer steps
    trackers: list = field(default_factory=list)  # accelerate trackers by name, e.g. [tensorboard]
    samples_every: int = 1  # epochs between pictures of validation samples (samples/epoch_NNNN.png); 0: none
    histograms_every: int = 10  # epochs between weight and gradient histograms (TensorBoard); 0: none


@dataclass
class DashboardConfig:
    enabled: bool = False
    url: str = "http://127.0.0.1:8765"
    token: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    seed: int = 42
    # spans of the run with their own optimizer lr/weight_decay, scheduler, loss, freeze, data.batch_size
    # (see cr_accel/stages.py and "Stages" in the README); empty: one stage, the sections above
    stages: list = field(default_factory=list)

    @property
    def resolved_mixed_precision(self):
        """`training.mixed_precision` with `use_amp` folded in; `auto` is left for the runtime to pick."""
        t = self.training
        if t.mixed_precision is not None:
            return t.mixed_precision
        return "auto" if t.use_amp in (True, None) else "no"

    def to_dict(self):
        """The config as it would be written in YAML: builder kwargs back inside their sections."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                section = {k: v for k, v in dataclasses.asdict(value).items() if k != "kwargs"}
                section.update(getattr(value, "kwargs", {}))
                value = section
            out[f.name] = value
        return out


# Names people reach for from other trainers, mapped to where the setting lives here.
SYNONYMS = {
    "learning_rate": "optimizer.lr",
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "warmup_ratio": "scheduler.warmup_ratio",
    "warmup_steps": "scheduler.warmup_steps",
    "num_epochs": "training.epochs",
    "epochs": "training.epochs",
    "max_epochs": "training.epochs",
    "batch_size": "data.batch_size",
    "max_grad_norm": "training.grad_clip",
    "gradient_clip_val": "training.grad_clip",
    "grad_clip": "training.grad_clip",
    "seed": "seed",
    "output_dir": "output.dir",
    "save_every": "checkpoint.save_every",
    "patience": "training.early_stopping_patience",
}


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names the same key twice: PyYAML would keep the last value without a word."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1, and so PyYAML, wants `1.0e-3`) and refuses a key
    given twice in one mapping (a second `epochs:` in `training:` would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise DuplicateKeyError(
                    None, None, f"`{key}` is given twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), check_components: bool = True) -> Config:
    """Read, override, type-check and value-check a config; raise ConfigError listing every problem."""
    problems: list[str] = []
    raw = _apply_overrides(_read_yaml_file(path), overrides, problems)
    return config_from_dict(raw, check_components, problems)


def config_from_dict(raw: dict[str, Any], check_components: bool = True, problems: list[str] | None = None) -> Config:
    """The same checks as `load_config`, for a config already in memory (tests, benchmarks, notebooks)."""
    problems = list(problems or [])
    cfg, flagged = _from_dict(raw, problems)
    problems += [f"`{key}`: {msg}" for key, msg in check_values(cfg) if key not in flagged]
    if cfg.stages and "stages" not in flagged and not problems:
        from .stages import check_stages

        problems += [f"`{key}`: {msg}" for key, msg in check_stages(cfg.stages, cfg.to_dict())]
    if check_components:
        from .components import check_components as check

        # A section with a wrongly typed key is not resolved: its name or kwargs may be the wrong ones.
        problems += [f"`{key}`: {msg}" for key, msg in check(cfg) if key.split(".")[0] not in flagged]
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml_file(path):
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file `{path}` is a folder; pass a YAML file, e.g. --config configs/default.yaml")
    if not path.is_file():
        raise UserError(f"config file `{path}` does not exist; pass an existing YAML file, e.g. --config configs/default.yaml")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"config file `{path}` is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                        "save it as UTF-8") from None
    except DuplicateKeyError as exc:
        raise UserError(f"config file `{path}`: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file `{path}` is not valid YAML: {exc}") from None
    if raw is None:
        raise UserError(f"config file `{path}` is empty (or holds only comments); give it the sections of a run, "
                        "e.g. start from a copy of configs/default.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"config file `{path}` must hold a mapping of sections (model:, data:, ...), not {type(raw).__name__}")
    return raw


def _apply_overrides(raw, overrides, problems):
    """`section.key=value` on top of the file, values read as YAML (`[1,2]`, `null`, `3e-4`);
    `~section.key` removes a key (e.g. a dataset argument, when switching `data.name`)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        remove = item.startswith("~")
        dotted, sep, text = item[remove:].partition("=")
        parts = dotted.split(".")
        if (not sep and not remove) or (sep and remove) or not dotted:
            problems.append(f"override `{item}` must look like `section.key=value` (or `~section.key` to remove "
                            "a key), e.g. `training.epochs=5`")
        elif len(parts) > 2:
            problems.append(f"override `{item}`: keys have the form `section.key`, not `{dotted}`")
        elif len(parts) == 2 and not isinstance(raw.setdefault(parts[0], {}), dict):
            problems.append(f"override `{item}`: `{parts[0]}` is not a section")
        elif remove:
            container = raw if len(parts) == 1 else raw[parts[0]]
            if container.pop(parts[-1], _INVALID) is _INVALID:
                problems.append(f"override `{item}`: `{dotted}` is not in the config, so it cannot be removed")
        else:
            container = raw if len(parts) == 1 else raw[parts[0]]
            container[parts[-1]] = _parse_value(text)
    return raw


def _parse_value(text):
    if text == "":
        return None
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def _from_dict(raw, problems):
    """A Config from `raw`, plus the set of keys (and section names) that were wrong.

    A wrong value keeps its default so that checking can go on and report every other problem too;
    the returned set tells the later checks which keys to leave alone.
    """
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    values, flagged = {}, set()
    for key, value in raw.items():
        if key not in sections:
            problems.append(f"unknown key `{key}`{_suggest(key, None)}")
            continue
        section_class = _section_class(sections[key])
        if section_class:
            values[key] = _section_from_dict(key, section_class, value, problems, flagged)
            continue
        checked = _check_type(key, value, hints[key], problems)
        if checked is _INVALID:
            flagged.add(key)
        else:
            values[key] = checked
    return Config(**values), flagged


_INVALID = object()


def _section_class(config_field):
    """The dataclass of a section field of Config, or None for a plain value such as `seed`."""
    factory = config_field.default_factory
    return factory if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory) else None


def _field_names(section_class):
    return [f.name for f in dataclasses.fields(section_class) if f.name != "kwargs"]


def _section_from_dict(name, cls, value, problems, flagged):
    if value is None:
        return cls()
    if not isinstance(value, dict):
        problems.append(f"`{name}` must be a mapping of keys, got {type(value).__name__} `{value!r}`")
        flagged.add(name)
        return cls()
    hints = typing.get_type_hints(cls)
    known = set(_field_names(cls))
    takes_kwargs = "kwargs" in hints
    kwargs, fields_ = {}, {}
    for key, item in value.items():
        if not isinstance(key, str):
            problems.append(f"`{name}`: keys must be strings, got `{key!r}`")
            flagged.add(name)
        elif key in known:
            checked = _check_type(f"{name}.{key}", item, hints[key], problems)
            if checked is _INVALID:
                flagged.update((name, f"{name}.{key}"))
            else:
                fields_[key] = checked
        elif takes_kwargs:
            kwargs[key] = item  # checked against the builder's signature in components.py
        else:
            problems.append(f"unknown key `{name}.{key}`{_suggest(key, name)}")
    if takes_kwargs:
        fields_["kwargs"] = kwargs
    return cls(**fields_)


def _check_type(key, value, annotation, problems):
    """`value` if it fits `annotation` (ints accepted for floats), else record a problem and return _INVALID."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X], or one of several types
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _check_type(key, value, options[0], problems)
        for option in options:
            checked = _check_type(key, value, option, [])
            if checked is not _INVALID:
                return checked
        problems.append(f"`{key}` is `{value!r}`; allowed values: {', '.join(_describe(o) for o in options)}")
        return _INVALID
    if origin is Literal:
        if value in args:
            return value
        allowed = ", ".join(str(a) for a in args)
        problems.append(f"`{key}` is `{value!r}`; allowed values: {allowed}")
        return _INVALID
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    shown = "null" if value is None else f"`{value!r}` ({type(value).__name__})"
    problems.append(f"`{key}` must be {kind.get(expected, expected.__name__)}, got {shown}")
    return _INVALID


def _describe(annotation):
    if typing.get_origin(annotation) is Literal:
        return ", ".join(str(a) for a in typing.get_args(annotation))
    return {bool: "true, false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(annotation, str(annotation))


def _suggest(key, section):
    """'; did you mean `x.y`?' from the same section's keys, the other sections' keys and SYNONYMS."""
    candidates = {}
    sections = {f.name: _section_class(f) for f in dataclasses.fields(Config)}
    for name, sub in sections.items():
        candidates.setdefault(name, []).append(name)
        for n in _field_names(sub) if sub else []:
            candidates.setdefault(n, []).append(f"{name}.{n}")
    for synonym, target in SYNONYMS.items():
        candidates.setdefault(synonym, []).append(target)
    if section is not None:  # prefer a close key in the section the user was writing
        close = difflib.get_close_matches(key, _field_names(sections[section]), n=1, cutoff=0.7)
        if close:
            return f"; did you mean `{section}.{close[0]}`?"
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean `{candidates[close[0]][0]}`?"


def check_values(cfg: Config) -> list[tuple[str, str]]:
    """(key, message) for every value that has the right type but cannot work."""
    t, s, o, d, c = cfg.training, cfg.scheduler, cfg.optimizer, cfg.data, cfg.checkpoint
    rules = [
        ("optimizer.lr", o.lr > 0, f"must be > 0, got {o.lr}"),
        ("optimizer.weight_decay", o.weight_decay >= 0, f"must be >= 0, got {o.weight_decay}"),
        ("scheduler.warmup_ratio", 0 <= s.warmup_ratio < 1, f"must be in [0, 1), got {s.warmup_ratio}"),
        ("scheduler.warmup_steps", s.warmup_steps is None or s.warmup_steps >= 0, f"must be >= 0, got {s.warmup_steps}"),
        ("scheduler.min_lr_ratio", 0 <= s.min_lr_ratio <= 1, f"must be in [0, 1], got {s.min_lr_ratio}"),
        ("training.epochs", t.epochs >= 1, f"must be >= 1, got {t.epochs}"),
        ("training.max_steps", t.max_steps is None or t.max_steps >= 1, f"must be >= 1 or null, got {t.max_steps}"),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1,
         f"must be >= 1, got {t.gradient_accumulation_steps}"),
        ("training.grad_clip", t.grad_clip is None or t.grad_clip > 0, f"must be > 0 or null (no clipping), got {t.grad_clip}"),
        ("training.eval_every", t.eval_every >= 1, f"must be >= 1, got {t.eval_every}"),
        ("training.eval_every_steps", t.eval_every_steps is None or t.eval_every_steps >= 1,
         f"must be >= 1 or null (off), got {t.eval_every_steps}"),
        ("training.log_every", t.log_every >= 1, f"must be >= 1, got {t.log_every}"),
        ("training.early_stopping_patience", t.early_stopping_patience is None or t.early_stopping_patience >= 1,
         f"must be >= 1 or null (off), got {t.early_stopping_patience}"),
        ("training.early_stopping_min_delta", t.early_stopping_min_delta >= 0,
         f"must be >= 0, got {t.early_stopping_min_delta}"),
        ("training.ema_decay", t.ema_decay is None or 0 < t.ema_decay < 1,
         f"must be in (0, 1) (e.g. 0.999), or null for no EMA, got {t.ema_decay}"),
        ("training.ema_start_step", t.ema_start_step >= 0, f"must be >= 0, got {t.ema_start_step}"),
        ("training.ema_every", t.ema_every >= 1, f"must be >= 1, got {t.ema_every}"),
        ("data.batch_size", d.batch_size >= 1, f"must be >= 1, got {d.batch_size}"),
        ("data.val_batch_size", d.val_batch_size is None or d.val_batch_size >= 1, f"must be >= 1, got {d.val_batch_size}"),
        ("data.num_workers", d.num_workers >= 0, f"must be >= 0, got {d.num_workers}"),
        ("data.persistent_workers", not d.persistent_workers or d.num_workers > 0,
         f"needs data.num_workers > 0 (there are no workers to keep), got num_workers {d.num_workers}"),
        ("data.prefetch_factor", d.prefetch_factor is None or d.num_workers > 0,
         f"needs data.num_workers > 0 (only workers load ahead), got num_workers {d.num_workers}; "
         "leave it null without workers"),
        ("data.prefetch_factor", d.prefetch_factor is None or d.prefetch_factor >= 1,
         f"must be >= 1 or null (torch's default), got {d.prefetch_factor}"),
        ("checkpoint.save_every", c.save_every >= 1, f"must be >= 1, got {c.save_every}"),
        ("checkpoint.save_every_steps", c.save_every_steps is None or c.save_every_steps >= 1,
         f"must be >= 1 or null, got {c.save_every_steps}"),
        ("checkpoint.keep_last_n", c.keep_last_n is None or c.keep_last_n >= 1, f"must be >= 1 or null (keep all), got {c.keep_last_n}"),
        ("output.dir", cfg.output.dir.strip() != "", "must not be empty"),
        ("output.samples_every", cfg.output.samples_every >= 0, f"must be >= 0 (0: no pictures), got "
                                                                 f"{cfg.output.samples_every}"),
        ("output.histograms_every", cfg.output.histograms_every >= 0, f"must be >= 0 (0: no histograms), got "
                                                                       f"{cfg.output.histograms_every}"),
    ]
    problems = [(key, msg) for key, ok, msg in rules if not ok]
    problems += _check_precision(t)
    if cfg.dashboard.enabled:
        from .dashboard.schema import check_url

        url_problem = check_url(cfg.dashboard.url)
        if url_problem:
            problems.append(("dashboard.url", url_problem.replace("dashboard url ", "")))
    problems += _check_trackers(cfg.output.trackers)
    problems += _check_val_sets(d.val_sets)
    problems += _check_normalize(d.normalize)
    problems += _check_monitor(c.monitor, t.metrics, d.val_sets)
    problems += _check_metric_entries(t.metrics)
    return problems


def metric_entry(entry: Any) -> tuple[Any, dict[str, Any]]:
    """(name, options) of one `training.metrics` entry: `psnr`, or a mapping `{name: ssim, window: 7}` whose other
    keys are the metric's options. The name is returned as given (possibly not a string: see
    `_check_metric_entries`); a run logs the metric as `val_<name>`."""
    if isinstance(entry, dict):
        return entry.get("name"), {k: v for k, v in entry.items() if k != "name"}
    return entry, {}


def metric_names(metrics: Sequence[Any]) -> list[str]:
    """The names of the well-formed entries of `training.metrics`, in order."""
    return [name for name, _ in map(metric_entry, metrics) if isinstance(name, str)]


def _check_metric_entries(metrics):
    """Each entry a name or a mapping with a `name`; no name twice, however it is written, since both would be
    logged as the same `val_<name>`. Names and options are checked against the registry and the metric's
    signature in components.py."""
    problems, seen = [], set()
    for i, entry in enumerate(metrics):
        key = f"training.metrics[{i}]"
        name, _ = metric_entry(entry)
        if isinstance(entry, dict) and name is None:
            problems.append((f"{key}.name", "is missing: an entry with options names its metric, "
                             "e.g. `{name: ssim, window: 7}`"))
        elif isinstance(entry, dict) and not isinstance(name, str):
            problems.append((f"{key}.name", f"must be a metric name, got `{name!r}`"))
        elif not isinstance(name, str):
            problems.append((key, f"must be a metric name or a mapping like `{{name: ssim, window: 7}}`, "
                             f"got `{entry!r}`"))
        elif name in seen:
            problems.append((key, f"`{name}` is listed twice; list each metric once"))
        else:
            seen.add(name)
    return problems


# What an epoch record holds when the trainer compares `checkpoint.monitor` (right after validation),
# besides a `val_<name>` per metric in `training.metrics`.
MONITORABLE = ("val_loss", "train_loss", "grad_norm")


def _check_normalize(value):
    from .data.normalize import config_problems

    return [("data.normalize", problem) for problem in config_problems(value)]


def _check_val_sets(val_sets):
    if not isinstance(val_sets, dict):
        return [("data.val_sets", f"must be a mapping of names to data keys, e.g. `{{noisy: {{noise_std: 0.2}}}}`, "
                 f"got `{val_sets!r}`")]
    problems = []
    for name, keys in val_sets.items():
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]+", name)):
            problems.append(("data.val_sets", f"`{name}` is not a usable set name: letters, digits, `_` and `-` "
                             "only (it becomes part of metric names and file columns)"))
        elif not isinstance(keys, dict):
            problems.append((f"data.val_sets.{name}", f"must be a mapping of the data builder's keys that differ "
                             f"for this set (e.g. `{{val_path: other.npz}}`), got `{keys!r}`"))
    return problems


def val_set_names(name, metrics):
    """The metric names a validation set named `name` (from data.val_sets) produces."""
    return [f"val/{name}/loss", *(f"val/{name}/{m}" for m in metric_names(metrics))]


def _check_monitor(monitor, metrics, val_sets=None):
    """`checkpoint.monitor` must be a value the run produces, or `best/` is never written and early
    stopping never fires."""
    names = metric_names(metrics)
    produced = [*MONITORABLE, *(f"val_{m}" for m in names)]
    if isinstance(val_sets, dict):
        produced += [n for name in val_sets if isinstance(name, str) for n in val_set_names(name, metrics)]
    if monitor in produced:
        return []
    from .metrics import METRICS

    addable = {f"val_{m}": m for m in METRICS.names() if m not in names}
    close = difflib.get_close_matches(monitor, [*produced, *addable], n=1, cutoff=0.6)
    hint = ""
    if close and close[0] in addable:
        hint = f"; did you mean `{close[0]}` (add `{addable[close[0]]}` to training.metrics)?"
    elif close:
        hint = f"; did you mean `{close[0]}`?"
    return [("checkpoint.monitor", f"`{monitor}` is not a metric this run produces{hint} "
             f"It can be one of: {', '.join(produced)}")]


def _check_trackers(names):
    """accelerate's trackers by name; each must be installed (TensorBoard: `pip install cr_accel[tensorboard]`)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    problems = []
    for i, name in enumerate(names):
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append((f"output.trackers[{i}]", f"unknown tracker `{name}`{hint} Choose from: {', '.join(known)}"))
        elif name not in available:
            extra = " (pip install 'cr_accel[tensorboard]')" if name == "tensorboard" else ""
            problems.append((f"output.trackers[{i}]", f"`{name}` is not installed{extra}"))
    return problems


def _check_precision(t):
    if t.use_amp is False and t.mixed_precision not in (None, "no"):
        return [("training.use_amp", f"is false but training.mixed_precision is `{t.mixed_precision}`; set only one of them")]
    wants_fp16 = t.mixed_precision == "fp16"
    if wants_fp16 and not cuda_available():
        return [("training.mixed_precision", "is `fp16` but this run has no CUDA GPU, and fp16 needs one "
                 "(accelerate would silently train in fp32); use `bf16` or `no` on CPU, or `auto` to pick per machine")]
    return []


def cuda_available():
    """Whether this run will train on a CUDA GPU (accelerate's ACCELERATE_USE_CPU forces the CPU)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    import torch

    return torch.cuda.is_available()
