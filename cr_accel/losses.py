"""Built-in losses: thin names over torch.nn losses, so YAML can pick one and pass its options."""

from torch import nn

from .registry import Registry

LOSSES = Registry("loss")


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
