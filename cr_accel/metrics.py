"""Validation metrics: each returns one value per sample, so the trainer can average them exactly."""

import torch

from .registry import Registry

METRICS = Registry("metric")


@METRICS.register("psnr")
def psnr(outputs, targets, data_range=1.0):
    """Peak signal-to-noise ratio in dB per sample (capped at 100 dB for a perfect match)."""
    mse = (outputs.float() - targets.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


@METRICS.register("accuracy")
def accuracy(outputs, targets):
    """1.0 where the arg-max class equals the integer target, else 0.0."""
    return (outputs.argmax(dim=1) == targets).float()
