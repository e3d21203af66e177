"""A small PNG of validation samples (one row per sample: input | output | target), without PIL.

    png = samples_png(inputs, outputs, targets)        # bytes, ready to write or to send
    Path(run / "samples" / f"epoch_{epoch:04d}.png").write_bytes(png)

Values are shown as gray levels, clipped to [0, 1] (0 black, 1 white; NaN black). Accepted shapes per
argument, N samples each: (N, H, W); (N, C, H, W) (channels averaged: a grayscale view); (N, L), drawn
as a strip of height 1. Tensors (any device or dtype), numpy arrays and nested lists all work. The
three panels of a row are separated by a thin colored line, so a black or white sample edge stays
visible.
"""

import struct
import zlib

import numpy as np

_SEPARATOR = (40, 110, 160)  # RGB of the lines between panels and rows: no gray level can be mistaken for it


def samples_png(inputs, outputs, targets, scale=4, max_pixels=2_000_000):
    """PNG bytes of an N-row grid: input | output | target, each value a scale x scale gray square.

    `scale` shrinks (never below 1) if the picture would exceed `max_pixels`, which keeps it small
    enough to send to the dashboard every epoch.
    """
    columns = [_as_images(x, name) for x, name in ((inputs, "inputs"), (outputs, "outputs"), (targets, "targets"))]
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"samples_png needs as many outputs and targets as inputs; got "
                         f"{', '.join(str(len(c)) for c in columns)} samples")
    if n == 0:
        raise ValueError("samples_png needs at least one sample")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"samples_png scale must be a positive int, got {scale!r}")
    widths = [c.shape[2] for c in columns]
    height = max(c.shape[1] for c in columns)
    gap = 1  # separator width, in scaled pixels
    while scale > 1 and _size(widths, height, n, scale, gap) > max_pixels:
        scale -= 1
    total_w = sum(widths) * scale + gap * (len(columns) + 1)
    total_h = n * height * scale + gap * (n + 1)
    canvas = np.empty((total_h, total_w, 3), dtype=np.uint8)
    canvas[:] = _SEPARATOR
    for row in range(n):
        y = gap + row * (height * scale + gap)
        x = gap
        for col, images in enumerate(columns):
            gray = _to_uint8(images[row])
            big = np.repeat(np.repeat(gray, scale, axis=0), scale, axis=1)
            h, w = big.shape
            canvas[y:y + h, x:x + w] = big[:, :, None]
            if h < height * scale:  # a shorter panel than its neighbours: fill below it with black
                canvas[y + h:y + height * scale, x:x + w] = 0
            x += widths[col] * scale + gap
    return encode_png(canvas)


def encode_png(rgb):
    """PNG bytes for an (H, W, 3) uint8 array (or (H, W) for grayscale)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim == 2:
        color_type, channels = 0, 1
    elif rgb.ndim == 3 and rgb.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"encode_png needs an (H, W) or (H, W, 3) array, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    rows = rgb.reshape(h, w * channels)
    raw = np.zeros((h, w * channels + 1), dtype=np.uint8)  # each scanline starts with filter type 0
    raw[:, 1:] = rows
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _chunk(b"IEND", b""))


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _size(widths, height, n, scale, gap):
    return (sum(widths) * scale + gap * 4) * (n * height * scale + gap * (n + 1))


def _as_images(x, name):
    """(N, H, W) float array from a tensor, array or list of any of the accepted shapes."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, None, :]
    elif a.ndim == 4:
        a = a.mean(axis=1)
    elif a.ndim != 3:
        raise ValueError(f"samples_png: `{name}` has shape {a.shape}; expected (N, H, W), (N, C, H, W) or (N, L)")
    if a.shape[1] == 0 or a.shape[2] == 0:
        raise ValueError(f"samples_png: `{name}` has an empty image (shape {a.shape})")
    return a


def _to_uint8(image):
    values = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
