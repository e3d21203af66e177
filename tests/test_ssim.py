"""SSIM (cr_accel/ssim.py), as the `ssim` metric and the `ssim` loss: against an independent reference, per
sample, in float32 whatever the inputs' precision, and scaled by the data range.

The reference is scikit-image's `skimage.metrics.structural_similarity` (NumPy and SciPy, no code shared with
ours) with the settings cr_accel claims: `gaussian_weights=True, sigma=1.5` (an 11-tap gaussian, skimage's
truncate 3.5), `use_sample_covariance=False`, the same `data_range`, `channel_axis=0` (per channel, averaged),
in float64. Border handling: skimage filters with reflected borders and then crops (11 - 1) / 2 = 5 pixels on
each side before averaging; cr_accel averages the valid filtering, which is the same set of pixels.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from cr_accel.losses import LOSSES, SSIMLoss
from cr_accel.metrics import METRICS
from cr_accel.ssim import ssim


def _pair(n=4, channels=3, height=37, width=29, noise=0.05, seed=0):
    """Seeded smooth random images in [0, 1] (coarse noise, upsampled) and a blurred, noisy copy; 37x29 is not a
    multiple of the window."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, height // 4, width // 4, generator=g)
    clean = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    blurred = F.avg_pool2d(clean, 3, stride=1, padding=1, count_include_pad=False)
    return (blurred + noise * torch.randn(clean.shape, generator=g)).clamp(0, 1), clean


def _reference(outputs, targets, data_range):
    return [structural_similarity(o.double().numpy(), t.double().numpy(), gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=data_range, channel_axis=0)
            for o, t in zip(outputs, targets)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_identical_images_give_exactly_one(dtype):
    _, images = _pair()
    values = ssim(images.to(dtype), images.to(dtype))
    assert values.tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    assert ssim(images[:, 0], images[:, 0]).tolist() == pytest.approx([1.0] * 4, abs=1e-6)  # (N, H, W)


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_matches_skimage_on_a_known_pair(data_range):
    outputs, targets = _pair()
    outputs, targets = outputs * data_range, targets * data_range
    expected = _reference(outputs, targets, data_range)
    assert 0.3 < min(expected) and max(expected) < 0.95  # a pair that is neither identical nor unrelated
    ours = ssim(outputs, targets, data_range=data_range)
    assert ours.dtype == torch.float32
    assert ours.double().tolist() == pytest.approx(expected, abs=1e-4)  # measured: 5e-7 in float32
    in_float64 = ssim(outputs.double(), targets.double(), data_range=data_range)
    assert in_float64.tolist() == pytest.approx(expected, abs=1e-12)


def test_one_value_per_sample_independent_of_the_batch():
    outputs, targets = _pair(n=5)
    values = ssim(outputs, targets)
    assert values.shape == (5,)
    alone = torch.cat([ssim(outputs[i : i + 1], targets[i : i + 1]) for i in range(5)])
    assert torch.allclose(values, alone, atol=1e-6)
    assert ssim(outputs[:, 0], targets[:, 0]).shape == (5,)


def test_data_range_scales_the_constants():
    outputs, targets = _pair()
    unit = ssim(outputs, targets, data_range=1.0)
    assert torch.allclose(ssim(outputs * 255, targets * 255, data_range=255.0), unit, atol=1e-5)
    # The same pixels measured against a range 255 times too small: C1, C2 vanish, the values change.
    assert not torch.allclose(ssim(outputs * 255, targets * 255, data_range=1.0), unit, atol=1e-3)


def test_mean_over_an_uneven_split_equals_the_whole_set_mean():
    """What validation does: per-sample values summed over batches of any size, divided once."""
    outputs, targets = _pair(n=7)
    whole = ssim(outputs, targets).double().mean()
    sums = [ssim(outputs[a:b], targets[a:b]).double().sum() for a, b in ((0, 3), (3, 6), (6, 7))]
    assert float(sum(sums) / 7) == pytest.approx(float(whole), abs=1e-12)


def test_bf16_inputs_are_computed_in_float32():
    """bf16 arithmetic would lose the small differences SSIM is made of: the inputs are only rounded to bf16."""
    outputs, targets = _pair()
    low = ssim(outputs.bfloat16(), targets.bfloat16())
    assert low.dtype == torch.float32
    exact = _reference(outputs.bfloat16().float(), targets.bfloat16().float(), 1.0)
    assert low.double().tolist() == pytest.approx(exact, abs=1e-5)


def test_float32_inside_a_bf16_autocast_region():
    """A loss computed under autocast (`accelerator.autocast()`, a user's loop): conv2d would run in bf16."""
    outputs, targets = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = ssim(outputs, targets)
    assert values.dtype == torch.float32
    assert values.double().tolist() == pytest.approx(_reference(outputs, targets, 1.0), abs=1e-5)


def test_metric_and_loss_are_registered_with_their_options():
    outputs, targets = _pair()
    metric = METRICS.resolve("ssim")
    assert torch.equal(metric(outputs, targets, window=7, sigma=1.0), ssim(outputs, targets, window=7, sigma=1.0))
    assert not torch.allclose(metric(outputs, targets, window=7), metric(outputs, targets))
    loss = LOSSES.resolve("ssim")(window=7, data_range=2.0)
    assert isinstance(loss, SSIMLoss) and isinstance(loss, torch.nn.Module)
    assert float(loss(outputs, targets)) == pytest.approx(1 - float(ssim(outputs, targets, 2.0, 7).mean()), abs=1e-7)


def test_loss_is_zero_for_a_perfect_match_and_gives_gradients():
    outputs, targets = _pair(n=2)
    loss_fn = SSIMLoss()
    assert float(loss_fn(targets, targets)) == pytest.approx(0.0, abs=1e-6)
    outputs.requires_grad_(True)
    loss = loss_fn(outputs, targets)
    loss.backward()
    assert loss.ndim == 0 and outputs.grad is not None and outputs.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 4}, r"`window` must be an odd integer >= 3"),
    ({"sigma": 0}, r"`sigma` must be a number > 0, got 0"),
    ({"data_range": -1.0}, r"`data_range` must be a number > 0, got -1\.0"),
])
def test_bad_options_are_refused_when_the_loss_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSIMLoss(**kwargs)


def test_images_smaller_than_the_window_are_refused():
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"window \(11 pixels\) is larger than the images \(8x8\)"):
        ssim(images, images)
    assert ssim(images, images, window=7).shape == (2,)


def test_reference_settings_are_the_ones_claimed():
    """Guard the reference itself: skimage's default (uniform 7x7 window, sample covariance) gives other
    numbers, so a test passing with it would not be checking the gaussian SSIM."""
    outputs, targets = _pair(n=1)
    o, t = outputs[0].double().numpy(), targets[0].double().numpy()
    default = structural_similarity(o, t, data_range=1.0, channel_axis=0)
    assert abs(default - _reference(outputs, targets, 1.0)[0]) > 1e-3
    assert np.isclose(_reference(outputs, targets, 1.0)[0], float(ssim(outputs, targets)[0]), atol=1e-4)
