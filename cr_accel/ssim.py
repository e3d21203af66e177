"""Structural similarity (SSIM, Wang et al. 2004) of image batches, one value per sample, on any device.

Used by the `ssim` metric (cr_accel/metrics.py) and the `ssim` loss (cr_accel/losses.py).

Per channel, with a normalised gaussian window w (`window` taps, `sigma`) and `*` a 2-D filtering by w:
    mu_x = w * x,  var_x = w * x^2 - mu_x^2,  cov = w * (x y) - mu_x mu_y      (no sample-covariance factor)
    S = (2 mu_x mu_y + C1)(2 cov + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)),
    C1 = (K1 data_range)^2, C2 = (K2 data_range)^2
and a sample's SSIM is the mean of S over its channels and over the pixels whose whole window lies inside the
image (a "valid" filtering: (window - 1) / 2 pixels at each border are left out).

That is skimage's `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=R, channel_axis=0)`: skimage filters the whole image with reflected borders and then crops
(win_size - 1) / 2 pixels from each side before averaging, which keeps exactly the pixels whose window never
reaches a reflected border -- so the valid filtering here gives its numbers without padding anything
(tests/test_ssim.py compares the two). skimage's gaussian has 2 * int(3.5 sigma + 0.5) + 1 taps (11 for sigma
1.5); with another `window` the gaussian here is cut to `window` taps and renormalised (as pytorch-msssim and
torchmetrics do), which skimage has no setting for.
"""

import contextlib

import torch
import torch.nn.functional as F

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03  # Wang et al. 2004


def check_options(window, sigma, data_range):
    """A ValueError naming the option, before any tensor is touched (a wrong value would give a silently
    meaningless SSIM: an even window shifts the map, a zero data range divides by zero)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ValueError(f"ssim `window` must be an odd integer >= 3 (pixels per side of the gaussian window), "
                         f"got {window!r}")
    for name, value in (("sigma", sigma), ("data_range", data_range)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"ssim `{name}` must be a number > 0, got {value!r}")


def ssim(outputs, targets, data_range=1.0, window=WINDOW, sigma=SIGMA, k1=K1, k2=K2):
    """SSIM of each sample of `outputs` against `targets`, images (N, C, H, W) or (N, H, W): a tensor of shape
    (N,), 1.0 for identical images. Computed in float32 (float64 if either input is float64), whatever the
    inputs' precision, with tensor operations only (no host synchronisation)."""
    check_options(window, sigma, data_range)
    if outputs.shape != targets.shape or outputs.ndim not in (3, 4):
        raise ValueError(f"ssim compares images of the same shape, (N, C, H, W) or (N, H, W); got outputs "
                         f"{list(outputs.shape)} and targets {list(targets.shape)}")
    if min(outputs.shape[-2:]) < window:
        raise ValueError(f"ssim's window ({window} pixels) is larger than the images ({outputs.shape[-2]}x"
                         f"{outputs.shape[-1]}); give a smaller odd `window`")
    dtype = torch.float64 if torch.float64 in (outputs.dtype, targets.dtype) else torch.float32
    x, y = outputs.to(dtype), targets.to(dtype)
    if x.ndim == 3:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    # The five filtered maps of every channel at once: one grouped convolution per direction.
    with _autocast_off(x.device):
        maps = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, sigma)
    mu_x, mu_y, xx, yy, xy = maps.chunk(5, dim=1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    numerator = (2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)
    denominator = (mu_xx + mu_yy + c1) * ((xx - mu_xx) + (yy - mu_yy) + c2)
    return (numerator / denominator).flatten(1).mean(1)


def _autocast_off(device):
    """Inside a bf16 autocast region (a loss computed under `accelerator.autocast()`), conv2d would run in bf16
    whatever its inputs: 1e-2 off on the test images, where SSIM differences of 1e-3 matter."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to switch off
        return contextlib.nullcontext()


def _filter(images, window, sigma):
    """`images` (N, K, H, W) filtered by the separable gaussian, valid part only: (N, K, H-window+1, W-window+1)."""
    offsets = torch.arange(window, dtype=images.dtype, device=images.device) - (window - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    channels = images.shape[1]
    rows = F.conv2d(images, taps.view(1, 1, 1, window).expand(channels, 1, 1, window), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, window, 1).expand(channels, 1, window, 1), groups=channels)
