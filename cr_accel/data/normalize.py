"""`data.normalize`: input statistics computed once from the training split, kept in every checkpoint, and
applied wherever the model meets data, so that the same raw sample gives the same output in training,
validation, `cr_accel.load_model` and `cr-accel predict`.

    none          inputs as the dataset gives them (the default)
    per_channel   (x - mean) / std per channel: dim 0 of a sample (each feature of a 1-D sample)
    minmax        (x - min) / (max - min) over all values: the inputs' range mapped to [0, 1]
    {mean, std}   given values: numbers, or one per channel

The statistics come from one streaming pass over the training split (each process reads its share of the
samples, then the partial moments are merged in process order), in float64: a dataset larger than memory is
read once, never held. A channel (or range) with no spread is scaled by 1, not divided by 0.

Only the model's side of the data changes: the model gets normalised inputs, and where the targets are floating
point and shaped like the inputs (reconstruction) its outputs are mapped back to the inputs' units before anything else sees
them. Losses, metrics, pictures and predictions are therefore in the data's own units whether or not the
inputs are normalised.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from ..errors import CheckpointError, UserError

KINDS = ("none", "per_channel", "minmax")
FIXED = "fixed"  # the kind of a {mean, std} mapping
EXAMPLE = "per_channel, minmax, none, or {mean: [0.5], std: [0.25]}"


def config_problems(value: Any) -> list[str]:
    """What is wrong with a `data.normalize` value (empty when it is usable)."""
    if value is None or value in KINDS:
        return []
    if isinstance(value, str):
        return [f"is `{value}`; allowed: {EXAMPLE}"]
    if not isinstance(value, dict):
        return [f"must be one of {EXAMPLE}, got `{value!r}`"]
    if set(value) != {"mean", "std"}:
        return [f"a mapping needs exactly the keys `mean` and `std` (numbers, or one per channel), got "
                f"{sorted(map(str, value))}"]
    mean, std = (_numbers(value[key]) for key in ("mean", "std"))
    if mean is None or std is None:
        return [f"`{key}` must be a number or a list of numbers, got `{value[key]!r}`"
                for key, numbers in (("mean", mean), ("std", std)) if numbers is None]
    problems = []
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        problems.append(f"`mean` has {len(mean)} values and `std` {len(std)}; give one of each per channel (or one "
                        "for all)")
    if not problems and not all(math.isfinite(m) for m in mean):
        problems.append(f"`mean` must be finite, got {mean}")
    if not problems and not all(math.isfinite(s) and s > 0 for s in std):
        problems.append(f"`std` must be finite and > 0, got {std}")
    return problems


def _numbers(value: Any) -> list[float] | None:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return [float(v) for v in values]


class Normalization:
    """The normalisation of one run: its kind, its statistics once known, and `run(model, inputs)`, the one
    place where inputs are normalised and outputs mapped back. Saved in checkpoints (`state_dict`)."""

    def __init__(self, kind: str | None = None, shift: list[float] | None = None, scale: list[float] | None = None,
                 restore_outputs: bool = False) -> None:
        self.kind = None if kind == "none" else kind
        self.shift, self.scale = shift, scale
        self.restore_outputs = restore_outputs
        self._views: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, value: Any) -> Normalization:
        """The normalisation `data.normalize` asks for: given values are known at once, computed ones after `fit`;
        whether outputs are mapped back is decided by `match_sample`."""
        if isinstance(value, dict):
            mean, std = _numbers(value["mean"]) or [], _numbers(value["std"]) or []
            channels = max(len(mean), len(std))  # a single value goes with every channel
            return cls(FIXED, mean * (channels // len(mean)), std * (channels // len(std)))
        return cls(value)

    @property
    def active(self) -> bool:
        return self.kind is not None

    @property
    def needs_fit(self) -> bool:
        return self.active and self.shift is None

    # ---------------------------------------------------------------- applying it

    def run(self, model: Any, inputs: torch.Tensor) -> Any:
        """`model` on `inputs` normalised, its outputs mapped back to the data's units where they are shaped
        like the inputs (see the module docstring)."""
        if self.shift is None:
            return model(inputs)
        shift, scale = self._device_views(inputs)
        outputs = model((inputs - shift) / scale)
        return outputs * scale + shift if self.restore_outputs else outputs

    def _device_views(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) as float32 tensors on the inputs' device, shaped to broadcast over a batch of them
        (made once per device and rank)."""
        key = (inputs.device, inputs.ndim)
        if key not in self._views:
            assert self.shift is not None and self.scale is not None
            # one value broadcasts as a scalar; one per channel lines up with dim 1 of the batch
            shape = [] if len(self.shift) == 1 else [1, -1] + [1] * (inputs.ndim - 2)
            shift, scale = (torch.tensor(values, dtype=torch.float32, device=inputs.device).reshape(shape)
                            for values in (self.shift, self.scale))
            self._views[key] = (shift, scale)
        return self._views[key]

    def match_sample(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Fit the normalisation to one training sample: outputs are mapped back where the targets are floating
        point and shaped like the inputs (reconstruction); given per-channel values must match the channels."""
        self.restore_outputs = targets.is_floating_point() and targets.shape == inputs.shape
        if self.kind != FIXED or self.shift is None or len(self.shift) == 1:
            return
        channels = inputs.shape[0] if inputs.ndim else 1
        if len(self.shift) != channels:
            raise UserError(f"data.normalize gives {len(self.shift)} means and stds, but the inputs have {channels} "
                            f"channel(s) (samples of shape {list(inputs.shape)}); give one value per channel, or one "
                            "for all")

    # ---------------------------------------------------------------- computing it

    def fit(self, dataset: Any, accelerator: Any, batch_size: int, loader_options: dict[str, Any]) -> None:
        """Compute the statistics from the inputs of `dataset` (the training split): one pass in which each
        process reads every `num_processes`-th sample, then the moments of all processes merged."""
        moments = ChannelMoments()
        rank, world = accelerator.process_index, accelerator.num_processes
        share = Subset(dataset, range(rank, len(dataset), world))
        for batch in DataLoader(share, batch_size=batch_size, shuffle=False, **loader_options):
            moments.add(batch[0])
        moments = ChannelMoments.merged(_gathered(accelerator, moments.as_tensor()))
        self.shift, self.scale = moments.statistics(self.kind)
        self._views.clear()

    # ---------------------------------------------------------------- what checkpoints and metadata hold

    def describe(self) -> dict[str, Any] | None:
        """The normalisation as recorded in the dataset metadata (None when off)."""
        return self.state_dict() if self.active else None

    def summary(self) -> str:
        """One line for the run's log: the kind and (the first few) statistics."""
        def shown(values: list[float] | None) -> str:
            text = ", ".join(f"{v:.6g}" for v in (values or [])[:4])
            return f"[{text}{', ...' if values and len(values) > 4 else ''}]"

        outputs = "; outputs mapped back to the data's units" if self.restore_outputs else ""
        return f"data.normalize={self.kind}: shift {shown(self.shift)}, scale {shown(self.scale)}{outputs}"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": self.shift, "scale": self.scale, "restore_outputs": self.restore_outputs}

    def load_state_dict(self, state: Any) -> None:
        """Take the checkpoint's statistics when it normalised the same way (a resume must not re-fit: the data
        may have changed); a checkpoint that normalised otherwise (a config change allowed on resume) keeps
        this run's own."""
        problem = state_problem(state)
        if problem:
            raise CheckpointError(f"the normalization state is not valid: {problem}")
        if state["kind"] == self.kind and self.kind not in (None, FIXED):
            self.shift, self.scale = state["shift"], state["scale"]
            self._views.clear()

    def adopt(self, state: Any) -> bool:
        """Take `state`'s statistics if it is a valid one of this kind; whether it was taken."""
        if state_problem(state) or state["kind"] != self.kind or state["shift"] is None:
            return False
        self.load_state_dict(state)
        return True


def state_problem(state: Any) -> str | None:
    if not isinstance(state, dict) or set(state) != {"kind", "shift", "scale", "restore_outputs"}:
        return "it must hold kind, shift, scale and restore_outputs"
    if state["kind"] not in (None, FIXED, *KINDS):
        return f"unknown kind `{state['kind']}`"
    for key in ("shift", "scale"):
        if state[key] is not None and _numbers(state[key]) is None:
            return f"`{key}` is not a list of numbers"
    if not isinstance(state["restore_outputs"], bool):
        return "`restore_outputs` is not true or false"
    return None


def normalized(model: torch.nn.Module, normalization: Normalization) -> torch.nn.Module:
    """`model` itself when `normalization` is off, else a module that takes raw inputs (see `Normalized`)."""
    return Normalized(model, normalization) if normalization.active else model


class Normalized(torch.nn.Module):
    """A model that takes raw inputs: `forward(x)` normalises `x`, runs `self.model`, and maps outputs shaped
    like the inputs back to their units. `cr_accel.load_model` gives one for a run trained with
    `data.normalize`; `self.model` is the network, `self.normalization` the statistics."""

    def __init__(self, model: torch.nn.Module, normalization: Normalization) -> None:
        super().__init__()
        self.model = model
        self.normalization = normalization

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.normalization.run(self.model, inputs)


class ChannelMoments:
    """Count, mean, sum of squared deviations, min and max per channel, merged batch by batch (Chan et al.'s
    pairwise update, in float64), so a streaming pass agrees with the whole-array computation."""

    def __init__(self, table: torch.Tensor | None = None) -> None:
        self.table = table  # rows: count, mean, m2, min, max; a column per channel

    def add(self, inputs: torch.Tensor) -> None:
        """One batch of inputs (samples along dim 0, channels along dim 1)."""
        if inputs.is_complex():
            raise UserError("data.normalize cannot normalise complex inputs; set data.normalize: none")
        values = _by_channel(inputs.detach().to("cpu", torch.float64))
        if values.shape[1] == 0:
            return
        mean = values.mean(dim=1)
        batch = torch.stack([torch.full_like(mean, values.shape[1]), mean, ((values - mean[:, None]) ** 2).sum(dim=1),
                             values.amin(dim=1), values.amax(dim=1)])
        self.table = batch if self.table is None else _merge(self.table, batch)

    def as_tensor(self) -> torch.Tensor | None:
        return self.table

    @classmethod
    def merged(cls, tables: list[torch.Tensor | None]) -> ChannelMoments:
        """The moments of several passes (one per process), merged in the order given."""
        merged = None
        for table in tables:
            if table is not None:
                merged = table if merged is None else _merge(merged, table)
        return cls(merged)

    def statistics(self, kind: str | None) -> tuple[list[float], list[float]]:
        """(shift, scale) of `kind`: per channel mean and population std, or the overall min and max - min."""
        if self.table is None:
            raise UserError("data.normalize: the training split has no samples to compute statistics from")
        count, mean, m2, low, high = self.table
        if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise UserError(f"data.normalize={kind}: the training inputs hold non-finite values (NaN or inf), so "
                            "their statistics are undefined; clean the data, or set data.normalize: none")
        if kind == "minmax":
            low_all, high_all = float(low.min()), float(high.max())
            return [low_all], [_unless_zero(high_all - low_all)]
        std = torch.sqrt(m2 / count)
        return mean.tolist(), [_unless_zero(s) for s in std.tolist()]


def _by_channel(inputs: torch.Tensor) -> torch.Tensor:
    """A batch as (channels, values): dim 1 holds the channels; scalar samples are one channel."""
    if inputs.ndim == 1:
        return inputs.reshape(1, -1)
    return inputs.transpose(0, 1).reshape(inputs.shape[1], -1)


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape != b.shape:
        raise UserError(f"data.normalize: the training inputs change their number of channels ({a.shape[1]} and "
                        f"{b.shape[1]}); every sample needs the same channels")
    (na, ma, m2a, lowa, higha), (nb, mb, m2b, lowb, highb) = a, b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    m2 = m2a + m2b + delta**2 * (na * nb / n)
    return torch.stack([n, mean, m2, torch.minimum(lowa, lowb), torch.maximum(higha, highb)])


def _gathered(accelerator: Any, table: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Every process's moments, in process order (one all-gather of objects: tables are a few numbers)."""
    if accelerator.num_processes == 1:
        return [table]
    import torch.distributed as dist

    tables: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(tables, table)
    return tables


def _unless_zero(spread: float) -> float:
    return spread if spread > 0 else 1.0
