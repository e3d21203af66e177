"""synthetic_cr: the default reconstruction task, generated in memory from the seed."""

import math

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cr_accel.errors import UserError

from . import DATASETS, DatasetSplits, seeded_generator



@DATASETS.register("synthetic_cr")
def synthetic_cr(
    seed,
    num_train=256,
    num_val=64,
    image_size=32,
    max_shapes=4,
    blur_sigma=1.0,
    noise_std=0.05,
    mask_ratio=0.0,
    num_test=0,
):
    """Synthetic reconstruction: recover clean images of smooth shapes from blurred, noisy, masked copies.

    Targets are 1 x image_size x image_size float32 images in [0, 1]: a dark background (level below 0.1)
    with 1 to `max_shapes` soft-edged ellipses, rectangles and smooth blobs of random size, rotation and
    intensity. Inputs are the targets blurred by a gaussian, plus gaussian noise, clipped to [0, 1], and
    with a random fraction of pixels set to 0. Generated in memory from the seed: the same seed gives
    bit-identical data in every process on a machine, whatever its thread count. Train and val come from
    separate random streams, so changing `num_train` leaves the validation set as it was; the test split
(`num_test`) has a stream of its own too, so adding one changes neither.

    Args:
        num_train: number of training images (default 256).
        num_val: number of validation images (default 64).
        image_size: height and width of each image in pixels (default 32).
        max_shapes: largest number of shapes drawn per image; each image has 1 to max_shapes (default 4).
        blur_sigma: standard deviation of the gaussian blur in pixels; 0 turns blurring off (default 1.0).
        noise_std: standard deviation of the additive gaussian noise, in units of the [0, 1] data range;
            0 turns noise off (default 0.05).
        mask_ratio: fraction of input pixels set to 0 at random, in [0, 1) (default 0.0).
        num_test: number of test images, scored once after training; 0: no test split (default 0).
    """
    _check_int("num_train", num_train, minimum=1)
    _check_int("num_val", num_val, minimum=1)
    _check_int("num_test", num_test, minimum=0)
    _check_int("image_size", image_size, minimum=4)
    _check_int("max_shapes", max_shapes, minimum=1)
    _check_float("blur_sigma", blur_sigma, minimum=0.0)
    _check_float("noise_std", noise_std, minimum=0.0)
    _check_float("mask_ratio", mask_ratio, minimum=0.0, below=1.0)

    splits = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        if count == 0:
            continue
        generator = seeded_generator(seed, f"synthetic_cr/{split}")
        clean = _render_shapes(generator, count, image_size, max_shapes)
        degraded = _degrade(clean, generator, blur_sigma, noise_std, mask_ratio)
        splits[split] = TensorDataset(degraded, clean)

    shape = [1, image_size, image_size]
    metadata = {
        "dataset": "synthetic_cr",
        "task": "reconstruction",
        "input_shape": shape,
        "target_shape": shape,
        "input_dtype": "float32",
        "target_dtype": "float32",
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        # The targets' range by construction (background in [0, 0.1), shapes of intensity up to 1, combined by
        # max), not the range observed in this draw: psnr and ssim measure against it.
        "data_range": [0.0, 1.0],
        "normalization": None,
        "source": {"generator": "synthetic_cr", "seed": seed, "max_shapes": max_shapes},
        "degradation": {
            "blur_sigma": float(blur_sigma),
            "noise_std": float(noise_std),
            "mask_ratio": float(mask_ratio),
        },
    }
    return DatasetSplits(train=splits["train"], val=splits["val"], metadata=metadata, test=splits.get("test"))


# Rendering and blurring use only +, -, *, /, sqrt, min/max and clamp on image-sized tensors: IEEE-exact
# operations, whose results cannot depend on the CPU's vector width or on how PyTorch splits work across
# threads (a 2-process `accelerate launch` runs with fewer threads than a single process). exp, sin and
# friends are approximations with no such promise, so rotations come from normalised gaussian pairs rather
# than sin/cos of an angle. (torch.randn itself may differ in the last bits between CPU types, e.g. with
# and without AVX2; on one machine every process gets the same data.)
_RENDER_CHUNK = 1024  # images rendered at once, bounding memory for large num_train


def _render_shapes(generator, count, size, max_shapes):
    """`count` clean 1 x size x size images; all random draws happen here, before rendering."""
    k = max_shapes

    def uniform(low, high, shape=(count, k, 1, 1)):
        return low + (high - low) * torch.rand(shape, generator=generator)

    params = {
        "kind": torch.randint(0, 3, (count, k, 1, 1), generator=generator),  # ellipse, rectangle, blob
        "cx": uniform(0.2, 0.8),
        "cy": uniform(0.2, 0.8),
        "ra": uniform(0.08, 0.3),
        "rb": uniform(0.08, 0.3),
        "edge": uniform(0.05, 0.4),  # width of the soft edge, as a fraction of the radius
        "intensity": uniform(0.3, 1.0),
    }
    direction = torch.randn((count, k, 2, 1, 1), generator=generator)
    norm = torch.sqrt(direction[:, :, 0] * direction[:, :, 0] + direction[:, :, 1] * direction[:, :, 1])
    params["cos"], params["sin"] = direction[:, :, 0] / norm, direction[:, :, 1] / norm
    shapes_used = torch.randint(1, k + 1, (count, 1, 1, 1), generator=generator)
    params["intensity"] = params["intensity"] * (torch.arange(k).view(1, k, 1, 1) < shapes_used)
    background = uniform(0.0, 0.1, (count, 1, 1, 1))

    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    images = []
    for start in range(0, count, _RENDER_CHUNK):
        chunk = {name: value[start : start + _RENDER_CHUNK] for name, value in params.items()}
        shapes = _shape_profiles(chunk, grid.view(1, 1, 1, size), grid.view(1, 1, size, 1))
        images.append(torch.maximum(background[start : start + _RENDER_CHUNK], shapes.amax(dim=1, keepdim=True)))
    return torch.cat(images)


def _shape_profiles(p, x, y):
    """(n, k, H, W) shapes scaled by their intensity, from per-shape parameters of size (n, k, 1, 1)."""
    dx, dy = x - p["cx"], y - p["cy"]
    u = (p["cos"] * dx + p["sin"] * dy) / p["ra"]  # coordinates along the shape's own axes,
    v = (p["cos"] * dy - p["sin"] * dx) / p["rb"]  # scaled so the outline sits at 1
    radius_sq = u * u + v * v
    ellipse = _smoothstep((1.0 - torch.sqrt(radius_sq)) / p["edge"] + 0.5)
    rectangle = _smoothstep((1.0 - torch.maximum(u.abs(), v.abs())) / p["edge"] + 0.5)
    bump = torch.clamp(1.0 - radius_sq, min=0.0)
    blob = bump * bump * bump  # close to exp(-3 r^2) inside the outline, exactly 0 outside
    profile = torch.where(p["kind"] == 0, ellipse, torch.where(p["kind"] == 1, rectangle, blob))
    return p["intensity"] * profile


def _smoothstep(t):
    t = torch.clamp(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _degrade(clean, generator, blur_sigma, noise_std, mask_ratio):
    """Blur, add noise, clip to [0, 1], mask. Noise and mask are drawn even when switched off, so that
    changing one knob does not change the random draws behind the others."""
    noise = torch.randn(clean.shape, generator=generator)
    keep = torch.rand(clean.shape, generator=generator) >= mask_ratio
    degraded = _gaussian_blur(clean, blur_sigma) + noise_std * noise
    return torch.where(keep, degraded.clamp(0.0, 1.0), 0.0)


def _gaussian_blur(images, sigma):
    """Separable gaussian blur of (n, 1, H, W) images with replicated borders, as a sum of shifted copies
    (exact elementwise operations in a fixed order, so bit-identical whatever the thread count)."""
    if sigma == 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    weights = [math.exp(-0.5 * (offset / sigma) ** 2) for offset in range(-radius, radius + 1)]
    weights = [w / sum(weights) for w in weights]
    for dim, pad in ((-1, (radius, radius, 0, 0)), (-2, (0, 0, radius, radius))):
        padded = F.pad(images, pad, mode="replicate")
        length = images.shape[dim]
        blurred = padded.narrow(dim, 0, length) * weights[0]
        for offset in range(1, len(weights)):
            blurred = blurred + padded.narrow(dim, offset, length) * weights[offset]
        images = blurred
    return images


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"data.{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name, value, minimum, below=None):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value < minimum or (below is not None and value >= below):
        allowed = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise UserError(f"data.{name} must be a number {allowed}, got {value!r}")
