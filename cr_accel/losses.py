"""Built-in losses: thin names over torch.nn losses (and SSIM), so YAML can pick one and pass its options."""

from torch import nn

from . import ssim as ssim_math
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
    """`data_range` is the targets' max - min (1.0 for images in [0, 1]); unlike the `ssim` metric, the loss
    does not read it from the dataset: give it for data in another range."""
    return SSIMLoss(window=window, sigma=sigma, data_range=data_range)
