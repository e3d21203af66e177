"""Built-in losses: thin names over torch.nn losses (and SSIM), so YAML can pick one and pass its options, and
`weighted`, a sum of any registered losses whose terms are logged one by one.

A loss returns the batch mean as a 0-d tensor, or a mapping of named terms with the total under `loss`
(`{"loss": total, "mse": ..., "l1": ...}`): the total is what is backpropagated, every other entry is logged
(`loss/<term>` per step, `train_loss/<term>` and `val_loss/<term>` per epoch).
"""

from collections.abc import Mapping

import torch
from torch import nn

from . import ssim as ssim_math
from .errors import UserError
from .registry import Registry

LOSSES = Registry("loss")


def loss_and_terms(value):
    """(total, {name: term} or None) of what a loss returned: a tensor, or a mapping holding `loss`."""
    if isinstance(value, torch.Tensor):  # the cheap checks first: every step asks
        return value, None
    if type(value) is not dict and not isinstance(value, Mapping):
        return value, None
    if "loss" not in value:
        raise TypeError(f"a loss that returns a mapping must hold its total under `loss`; it returned "
                        f"{', '.join(map(str, value)) or 'an empty mapping'}")
    return value["loss"], {k: v for k, v in value.items() if k != "loss"}


@LOSSES.register("mse")
def mse():
    return nn.MSELoss()


@LOSSES.register("l1")
def l1():
    return nn.L1Loss()


@LOSSES.register("smooth_l1")
def smooth_l1(beta: float = 1.0):
    return nn.SmoothL1Loss(beta=beta)


@LOSSES.register("cross_entropy")
def cross_entropy(label_smoothing: float = 0.0):
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


class Weighted(nn.Module):
    """sum(weight * term(outputs, targets)) over named terms; returns the total and each term's own value."""

    def __init__(self, terms: dict, data_range: float | None = None):
        super().__init__()
        self.weights = {name: float(weight) for name, weight in terms.items()}
        self.terms = nn.ModuleDict({name: _term(name, data_range) for name in terms})
        # (name, module, weight) in order: one tuple to unpack per term each step
        self._plan = [(name, self.terms[name], self.weights[name]) for name in terms]

    def forward(self, outputs, targets):
        values = {}
        total = None
        for name, term, weight in self._plan:  # no multiply for a weight of 1, no `0 +` to start: each op costs
            value = term(outputs, targets)
            if not isinstance(value, torch.Tensor):  # a term that returns its own terms: its total
                value = loss_and_terms(value)[0]
            values[name] = value
            weighted = value if weight == 1.0 else weight * value
            total = weighted if total is None else total + weighted
        return {"loss": total, **values}


@LOSSES.register("weighted")
def weighted(terms: dict, data_range: float | None = None):
    """`loss: {name: weighted, terms: {mse: 1.0, l1: 0.5}}`: any registered loss (or `package.module:Name`) by
    name, each with its weight; `data_range` goes to the terms that take one (ssim), from the dataset's
    metadata unless given."""
    if not isinstance(terms, Mapping) or not terms:
        raise UserError("`loss.terms` must map loss names to weights, e.g. {mse: 1.0, l1: 0.5}")
    for name, weight in terms.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"`loss.terms.{name}` must be a number (its weight), got {weight!r}")
        if name == "weighted":
            raise UserError("`loss.terms` cannot hold `weighted` itself")
    return Weighted(dict(terms), data_range)


def _term(name, data_range):
    from .registry import names

    try:
        builder = LOSSES.resolve(name)
    except LookupError as exc:
        raise UserError(f"`loss.terms`: {exc}") from None
    return builder(data_range=data_range) if data_range is not None and names(builder, "data_range") else builder()


class SSIMLoss(nn.Module):
    """1 - the batch's mean SSIM (cr_accel/ssim.py): 0 for a perfect reconstruction; usable alone or as a term
    of a weighted loss. The options are checked when it is built, so a bad value is reported as the loss's."""

    def __init__(self, window: int = ssim_math.WINDOW, sigma: float = ssim_math.SIGMA, data_range: float = 1.0):
        super().__init__()
        ssim_math.check_options(window, sigma, data_range)
        self.window, self.sigma, self.data_range = window, sigma, data_range

    def forward(self, outputs, targets):
        return 1 - ssim_math.ssim(outputs, targets, self.data_range, self.window, self.sigma).mean()


@LOSSES.register("ssim")
def ssim(window: int = ssim_math.WINDOW, sigma: float = ssim_math.SIGMA, data_range: float = 1.0):
    """`data_range` is the targets' max - min; the trainer passes the dataset metadata's (as for the `ssim`
    metric) unless the config gives one, and 1.0 where the metadata says nothing."""
    return SSIMLoss(window=window, sigma=sigma, data_range=data_range)
