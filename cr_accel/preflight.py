"""Preflight: every mismatch between the config and the data found before a run writes anything.

Two stages, both turning a failure into a UserError (exit 2, one message, no traceback) that names the
config keys involved, what the data holds and what the model produced:

- `check_parts(cfg)`, before the Trainer exists: the model, the loss and the optimizer are built once on
  the meta device (no memory, no initialisation; on the CPU only where a constructor needs real tensors),
  so a constructor that fails (`model.hidden_sizes=abc`, `optimizer.betas=[0.9]`) is reported as the
  section and the keys that made it fail.
- `run(trainer)`, first thing in `Trainer.train`: checks of the config against the dataset's metadata
  (the task, shapes, dtypes, number of classes), then one small batch of each split through
  model -> loss -> every metric, with no gradient and the model in eval mode (its modes restored after).
  The batch is taken from the dataset by index, never from the prepared loaders (their iterators draw from
  generators), and the RNG streams of torch (CPU and CUDA), NumPy and Python are saved and restored, so a
  run -- or a resumed run -- draws exactly the numbers it would draw without the preflight.

`CR_ACCEL_PREFLIGHT=0` in the environment switches both off; it exists for the test that shows a run is
bitwise the same with and without them.
"""

import contextlib
import inspect
import math
import os

import torch
from accelerate.utils import DistributedType
from torch.utils.data import default_collate

from . import components
from .building import build_part, describe_exception
from .config import metric_entry
from .data import DATASETS
from .data.normalize import normalized
from .errors import UserError
from .losses import LOSSES, loss_and_terms
from .models import MLP, MODELS, ConvAutoencoder
from .optim import OPTIMIZERS
from .rng import rng_kept
from .ssim import WINDOW

SWITCH = "CR_ACCEL_PREFLIGHT"
BATCH_SIZE = 2  # samples per split: enough for shapes and dtypes (two, so a squeezed batch dimension shows)
VALUE_LOSSES = ("mse", "l1", "smooth_l1")  # built-in losses that compare outputs and targets elementwise


class PreflightError(UserError):
    """Every problem the preflight found, reported together."""

    def __init__(self, problems):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"the config does not fit the data: {self.problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"the config does not fit the data, found {len(self.problems)} problems:\n{lines}")


def enabled():
    return os.environ.get(SWITCH, "1") != "0"


# ---------------------------------------------------------------- stage 1: the parts can be built


def check_parts(cfg):
    """Build the model, loss and optimizer of `cfg` once and throw them away; a failure names its section."""
    if not enabled():
        return
    with rng_kept():
        try:
            with torch.device("meta"):
                _build_parts(cfg, report=False)
            return
        except UserError:
            raise
        except Exception:
            pass  # some constructors need real tensors: find out on the CPU whether it really fails
        _build_parts(cfg, report=True)


def _build_parts(cfg, report):
    model = build_part("model", cfg.model, MODELS.resolve(cfg.model.name), lambda: components.build_model(cfg),
                       report)
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"`model.name={cfg.model.name}` returned `{type(model).__name__}`, not a torch.nn.Module; name a "
                        "model class (or a function that returns a module)")
    build_part("loss", cfg.loss, LOSSES.resolve(cfg.loss.name), lambda: components.build_loss(cfg), report)
    build_part("optimizer", cfg.optimizer, OPTIMIZERS.resolve(cfg.optimizer.name),
               lambda: components.build_optimizer(cfg, model.parameters()), report)


# ---------------------------------------------------------------- stage 2: one batch through everything


def run(trainer):
    """The batch check on a built Trainer's own parts (the model as it will train: precision, device)."""
    if not enabled():
        return
    acc = trainer.accelerator
    # Sharded engines gather their parameters in forward; everywhere else the plain module (no DDP hooks).
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    model = normalized(trainer.model if sharded else acc.unwrap_model(trainer.model), trainer.normalization)
    check_batch(trainer.cfg, trainer.data, model, trainer.loss_fn, trainer.metric_fns, acc.device,
                getattr(trainer, "val_sets", {}))


def check_batch(cfg, data, model, loss_fn, metric_fns, device, val_sets=None):
    """Raise PreflightError unless a batch of each split of `data` (and of each of data.val_sets) goes through
    model, loss and metrics."""
    with rng_kept(), torch.no_grad(), _eval_mode(model), _eager():
        splits = {"train": data.train, "val": data.val,
                  **({"test": data.test} if getattr(data, "test", None) is not None else {}),
                  **{f"`data.val_sets.{name}`": dataset for name, dataset in (val_sets or {}).items()}}
        batches = {split: first_batch(dataset, split, device) for split, dataset in splits.items()}
        facts = DataFacts.of(cfg, data.metadata, *batches["train"])
        problems = _check_finite(batches) + _check_loss(cfg, facts) + _check_metrics(cfg, facts)
        problems += _check_model(cfg, facts)
        if problems:
            raise PreflightError(problems)
        for split, (inputs, targets) in batches.items():
            outputs = _forward(cfg, facts, model, inputs, split)
            problems = _check_outputs(cfg, facts, outputs, targets)
            if problems:
                raise PreflightError(problems)
            _loss_and_metrics(cfg, loss_fn, metric_fns, outputs, targets)


def _check_finite(batches):
    """NaN or infinite values in the data make the first loss NaN: say so now, naming the split and the tensor."""
    problems = []
    for split, tensors in batches.items():
        for what, tensor in zip(("inputs", "targets"), tensors):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                problems.append(f"the first {split} batch's {what} hold {bad} NaN or infinite value(s) of "
                                f"{tensor.numel()}: clean the data (or replace them, e.g. numpy.nan_to_num) before "
                                "training")
    return problems


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (no dropout draws, no batch-norm statistics updated); every submodule's mode restored."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    if modes:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _eager():
    """A compiled model runs eagerly here: compiling a no-grad graph for one batch would cost seconds."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


def first_batch(dataset, split, device, k=BATCH_SIZE):
    """Items [0:k] of the dataset, collated as the DataLoader does, on the training device (read by index: no
    generator or sampler draws; also auto_batch_size's probe batch)."""
    k = min(k, len(dataset))
    if k == 0:
        raise UserError(f"the {split} split of the data is empty; add samples or change the data section")
    try:
        items = [dataset[i] for i in range(k)]
    except Exception as exc:
        raise UserError(f"item 0 of the {split} data could not be read: {describe_exception(exc)}") from None
    if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        got = type(items[0]).__name__ + (f" of {len(items[0])}" if isinstance(items[0], (tuple, list)) else "")
        raise UserError(f"the {split} dataset must yield (input, target) pairs, but its items are a {got}")
    inputs, targets = default_collate(items)
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        raise UserError(f"the {split} dataset must yield tensors, got a {type(inputs).__name__} input and a "
                        f"{type(targets).__name__} target")
    return inputs.to(device), targets.to(device)


class DataFacts:
    """What the data holds: the dataset's metadata, with the first training batch as the ground truth for
    shapes and dtypes (and for the task, where a user's builder gave no metadata)."""

    def __init__(self, task, inputs, targets, num_classes, source):
        self.task, self.num_classes, self.source = task, num_classes, source
        self.input_shape, self.target_shape = list(inputs.shape[1:]), list(targets.shape[1:])
        self.input_dtype, self.target_dtype = _dtype(inputs), _dtype(targets)
        self.labels = task == "classification"
        self.images = targets.is_floating_point() and len(self.target_shape) >= 2
        self.probabilities = (targets.is_floating_point() and targets.ndim == 2 and bool((targets >= 0).all())
                              and bool(torch.allclose(targets.sum(1), torch.ones_like(targets[:, 0]))))

    @classmethod
    def of(cls, cfg, metadata, inputs, targets):
        integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
        task = (metadata or {}).get("task")
        if task is None:
            task = "classification" if integer and targets.ndim == 1 else (
                "reconstruction" if targets.shape == inputs.shape else "regression")
        num_classes = (metadata or {}).get("num_classes")
        if task == "classification" and num_classes is None and integer:
            num_classes = int(targets.max()) + 1  # from the batch: at least this many
        return cls(task, inputs, targets, num_classes, _data_source(cfg))

    @property
    def targets_text(self):
        if self.labels:
            classes = f"{self.num_classes} classes" if self.num_classes else "classes"
            return f"class labels ({self.target_dtype}, {classes})"
        return f"{self.target_dtype} values of shape {_shape(self.target_shape)} (task {self.task})"

    def describe(self):
        return (f"inputs {_shape(self.input_shape)} {self.input_dtype}, targets {_shape(self.target_shape)} "
                f"{self.target_dtype} (task {self.task}; {self.source})")


def _data_source(cfg):
    """The data section's name and shape-setting keys, as the user would write them."""
    builder = DATASETS.resolve(cfg.data.name)
    parts = [f"`data.name={cfg.data.name}`"]
    for key in ("image_size", "path"):
        value = cfg.data.kwargs.get(key, _default(builder, key))
        if value is not None:
            parts.append(f"`data.{key}={value}`")
    return ", ".join(parts)


def _check_loss(cfg, facts):
    name = cfg.loss.name
    if facts.labels and name in VALUE_LOSSES:
        return [f"`loss.name={name}` compares values, but the targets are {facts.targets_text}: "
                f"set `loss.name=cross_entropy`"]
    if name == "ssim" and not facts.images:
        fix = "cross_entropy" if facts.labels else "mse"
        return [f"`loss.name=ssim` compares images, but the targets are {facts.targets_text}: set `loss.name={fix}`"]
    if not facts.labels and name == "cross_entropy" and not facts.probabilities:
        return [f"`loss.name=cross_entropy` needs class labels (integer targets), but the targets are "
                f"{facts.targets_text}: set `loss.name=mse` (or `l1`, `smooth_l1`)"]
    return []


IMAGE_METRICS = ("psnr", "ssim")  # built-in metrics that compare images


def _check_metrics(cfg, facts):
    entries = [(metric_entry(entry)[0], entry) for entry in cfg.training.metrics]
    wrong = {"accuracy": not facts.labels, **{name: not facts.images for name in IMAGE_METRICS}}
    bad = [n for n, _ in entries if wrong.get(n)]
    if not bad:
        return _check_ssim_windows(entries, facts)
    kept = [(n, entry) for n, entry in entries if n not in bad]
    fixed = [_flow(entry) for _, entry in kept]
    if facts.labels and "accuracy" not in [n for n, _ in kept]:
        fixed.append("accuracy")
    if facts.images and not any(n in IMAGE_METRICS for n, _ in kept):
        fixed.append("psnr")
    needs = {"psnr": "compares images", "ssim": "compares images", "accuracy": "needs class-label targets"}
    return [f"`training.metrics` has `{n}`, which {needs[n]}, but the targets are {facts.targets_text}: "
            f"set `training.metrics=[{','.join(fixed)}]`" for n in bad]


def _check_ssim_windows(entries, facts):
    """SSIM's window must fit inside the images (its map has side - window + 1 pixels)."""
    problems = []
    for i, (name, entry) in enumerate(entries):
        if name != "ssim":
            continue
        window = entry.get("window", WINDOW) if isinstance(entry, dict) else WINDOW
        side = min(facts.target_shape[-2:])  # ssim passed the task check: the targets are images
        if isinstance(window, int) and window > side:
            fit = side if side % 2 else side - 1
            problems.append(f"`training.metrics[{i}]` is ssim with a window of {window} pixels, but the targets are "
                            f"{_shape(facts.target_shape)} images: set `training.metrics[{i}]` to "
                            f"`{{name: ssim, window: {fit}}}` (an odd window up to {side})")
    return problems


def _flow(entry):
    """An entry of `training.metrics` as it is written in an override: `psnr`, `{name: ssim, window: 7}`."""
    if isinstance(entry, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}"
    return str(entry)


def _check_model(cfg, facts):
    """What the built-in models need from the data, in terms of their config keys."""
    builder = MODELS.resolve(cfg.model.name)
    if builder not in (MLP, ConvAutoencoder):
        return []  # a user's model: its forward on the batch tells
    args = {k: _default(builder, k) for k in inspect.signature(builder).parameters}
    args.update(cfg.model.kwargs)
    if any(not isinstance(args[k], int) for k in ("in_features", "out_features", "in_channels", "out_channels",
                                                    "depth") if k in args):
        return []  # a wrong type was reported when the model was built
    return _check_mlp(args, facts) if builder is MLP else _check_conv(args, facts)


def _check_mlp(args, facts):
    problems = []
    size_in = math.prod(facts.input_shape)
    if args["in_features"] != size_in:
        problems.append(f"`model.in_features={args['in_features']}` but each input holds {size_in} values "
                        f"({_shape(facts.input_shape)} {facts.input_dtype}, flattened): "
                        f"set `model.in_features={size_in}`")
    out = args["out_features"]
    if facts.labels and facts.num_classes and out < facts.num_classes:
        problems.append(f"`model.out_features={out}` but the targets hold class labels up to "
                        f"{facts.num_classes - 1} ({facts.num_classes} classes): "
                        f"set `model.out_features={facts.num_classes}`")
    elif not facts.labels and len(facts.target_shape) > 1:
        problems.append(f"`model.name=mlp` outputs a vector per sample, but the targets are "
                        f"{facts.targets_text}: use `model.name=conv_autoencoder` for image targets")
    elif not facts.labels and out != math.prod(facts.target_shape):
        size_out = math.prod(facts.target_shape)
        problems.append(f"`model.out_features={out}` but each target holds {size_out} value(s) "
                        f"({_shape(facts.target_shape)}): set `model.out_features={size_out}`")
    return problems


def _check_conv(args, facts):
    if len(facts.input_shape) != 3:
        return [f"`model.name=conv_autoencoder` takes images (channels x height x width), but the inputs are "
                f"{_shape(facts.input_shape)} {facts.input_dtype}: use `model.name=mlp` for vectors"]
    channels, height, width = facts.input_shape
    problems = []
    if facts.labels:
        problems.append(f"`model.name=conv_autoencoder` outputs images, but the targets are {facts.targets_text}: "
                        f"use `model.name=mlp` with `model.out_features={facts.num_classes}`")
    if args["in_channels"] != channels:
        problems.append(f"`model.in_channels={args['in_channels']}` but the inputs have {channels} channel(s) "
                        f"({_shape(facts.input_shape)}): set `model.in_channels={channels}`")
    if not facts.labels and len(facts.target_shape) == 3:
        if facts.target_shape[1:] != [height, width]:
            problems.append(f"`model.name=conv_autoencoder` outputs images of its inputs' size ({height}x{width}), "
                            f"but the targets are {_shape(facts.target_shape)}")
        if args["out_channels"] != facts.target_shape[0]:
            problems.append(f"`model.out_channels={args['out_channels']}` but the targets have "
                            f"{facts.target_shape[0]} channel(s) ({_shape(facts.target_shape)}): "
                            f"set `model.out_channels={facts.target_shape[0]}`")
    depth, factor = args["depth"], 2 ** max(args["depth"], 0)
    if height % factor or width % factor:
        fits = max(d for d in range(depth + 1) if height % 2**d == 0 and width % 2**d == 0)
        size = f" (`data.image_size={height}`)" if "data.image_size" in facts.source else ""
        fix = f"`data.image_size={-(-max(height, width) // factor) * factor}`" if size else "images of such sides"
        problems.append(f"`model.depth={depth}` halves the images {depth} times, so their sides must be multiples "
                        f"of {factor}, but the inputs are {channels}x{height}x{width}{size}: set "
                        f"`model.depth={fits}` or use {fix}")
    return problems


def _forward(cfg, facts, model, inputs, split):
    try:
        return model(inputs)
    except Exception as exc:
        keys = "".join(f", `model.{k}={v}`" for k, v in cfg.model.kwargs.items())
        raise PreflightError([f"`model.name={cfg.model.name}`{keys} failed on a batch of the {split} data "
                              f"({_shape(list(inputs.shape))} {_dtype(inputs)}): {describe_exception(exc)}. "
                              f"The data: {facts.describe()}"]) from None


def _check_outputs(cfg, facts, outputs, targets):
    if not isinstance(outputs, torch.Tensor):
        return [f"the model (`model.name={cfg.model.name}`) returned a {type(outputs).__name__}; the loss "
                f"and the metrics take one tensor"]
    produced = f"{_shape(list(outputs.shape))} {_dtype(outputs)}"
    if facts.labels and cfg.loss.name == "cross_entropy":
        need = facts.num_classes or int(targets.max()) + 1
        if outputs.ndim != 2 or len(outputs) != len(targets):
            return [f"for class labels the model must output [batch, classes] scores, but it produced {produced} "
                    f"for a batch of {len(targets)}"]
        if outputs.shape[1] < need:
            return [f"the model (`model.name={cfg.model.name}`) outputs {outputs.shape[1]} class score(s) per "
                    f"sample but the targets hold class labels up to {need - 1} ({need} classes): "
                    f"make it output {need}"]
    elif cfg.loss.name in (*VALUE_LOSSES, "ssim") and outputs.shape != targets.shape:
        return [f"the model (`model.name={cfg.model.name}`) produced {produced} for a batch of targets "
                f"{_shape(list(targets.shape))} {_dtype(targets)}; `loss.name={cfg.loss.name}` needs the same "
                f"shape (it would broadcast the two or fail). The data: {facts.describe()}"]
    return []


def _loss_and_metrics(cfg, loss_fn, metric_fns, outputs, targets):
    shapes = (f"outputs {_shape(list(outputs.shape))} {_dtype(outputs)} and targets "
              f"{_shape(list(targets.shape))} {_dtype(targets)}")
    try:
        loss = loss_fn(outputs, targets)
    except Exception as exc:
        keys = "".join(f", `loss.{k}={v}`" for k, v in cfg.loss.kwargs.items())
        raise PreflightError([f"`loss.name={cfg.loss.name}`{keys} failed on the {shapes}: "
                              f"{describe_exception(exc)}"]) from None
    _check_loss_value(cfg, loss)
    for i, (name, fn) in enumerate(metric_fns.items()):
        try:
            value = fn(outputs, targets)
        except Exception as exc:
            raise PreflightError([f"`training.metrics[{i}]` (`{name}`) failed on the {shapes}: "
                                  f"{describe_exception(exc)}"]) from None
        if not isinstance(value, torch.Tensor) or value.shape != (len(targets),):
            got = _shape(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PreflightError([f"metric `{name}` returned {got} for a batch of {len(targets)}; a metric returns "
                                  f"one value per sample (shape [{len(targets)}]), so validation averages exactly"])


def _check_loss_value(cfg, value):
    """One number, or a mapping of named numbers holding the total under `loss` (its terms are logged)."""
    try:
        total, terms = loss_and_terms(value)
    except TypeError as exc:
        raise PreflightError([f"`loss.name={cfg.loss.name}`: {exc}"]) from None
    for name, item in {"loss": total, **(terms or {})}.items():
        if not isinstance(item, torch.Tensor) or item.numel() != 1:
            got = _shape(list(item.shape)) if isinstance(item, torch.Tensor) else type(item).__name__
            what = "returned" if terms is None else f"returned `{name}` as"
            raise PreflightError([f"`loss.name={cfg.loss.name}` {what} {got}; a loss returns the mean over the "
                                  "batch, one number (e.g. reduction='mean'), or a mapping of such numbers with the "
                                  "total under `loss`"])


# ---------------------------------------------------------------- wording


def _default(builder, key):
    try:
        p = inspect.signature(builder).parameters.get(key)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _shape(dims):
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _dtype(tensor):
    return str(tensor.dtype).removeprefix("torch.")
