"""Validation metrics: each returns one value per sample, so the trainer can average them exactly.

A metric that takes a `data_range` argument gets the targets' range from the dataset's metadata unless its
entry in `training.metrics` gives one (`components.build_metrics`).
"""

import torch

from . import ssim as _ssim
from .registry import Registry

METRICS = Registry("metric")


@METRICS.register("psnr")
def psnr(outputs, targets, data_range=1.0):
    """Peak signal-to-noise ratio in dB per sample (capped at 100 dB for a perfect match)."""
    mse = (outputs.float() - targets.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


@METRICS.register("ssim")
def ssim(outputs, targets, data_range=1.0, window=_ssim.WINDOW, sigma=_ssim.SIGMA):
    """Structural similarity per sample, in [-1, 1] (1.0 for a perfect match): a gaussian window of `window`
    pixels (odd) and `sigma`, per channel and averaged, over the pixels whose window lies inside the image
    (skimage's border convention). The formula and the reference it matches: cr_accel/ssim.py."""
    return _ssim.ssim(outputs, targets, data_range=data_range, window=window, sigma=sigma)


@METRICS.register("accuracy")
def accuracy(outputs, targets):
    """1.0 where the arg-max class equals the integer target, else 0.0."""
    return (outputs.argmax(dim=1) == targets).float()
