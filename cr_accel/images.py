"""Pictures a run draws: validation samples (input | output | target | |output - target|, one row per sample)
and a confusion matrix, as PNG bytes (Pillow), written to `samples/epoch_NNNN.png` and sent to the trackers.

    png = samples_png(inputs, outputs, targets, difference=True)
    png = confusion_png(counts)                     # counts[true, predicted], a K x K array

Sample values are shown as gray levels (RGB for 3-channel images), scaled from `value_range` (default [0, 1])
and clipped (NaN black). Accepted shapes per argument, N samples each: (N, H, W); (N, C, H, W) (3 channels as
RGB, any other count averaged to gray); (N, L), drawn as a strip of height 1. Tensors (any device or dtype),
numpy arrays and nested lists all work. Panels are separated by a thin colored line, so a black or white sample
edge stays visible. The difference panel shows |output - target| four times brighter than the values (an error
of a quarter of the range is white), the same scale every epoch.
"""

import io

import numpy as np

_SEPARATOR = (40, 110, 160)  # RGB of the lines between panels and rows: no gray level can be mistaken for it
DIFFERENCE_GAIN = 4.0


def samples_png(inputs, outputs, targets, scale=4, max_pixels=2_000_000, difference=False, value_range=(0.0, 1.0)):
    """PNG bytes of an N-row grid: input | output | target (| |output - target| with `difference`), each value a
    scale x scale square.

    `scale` shrinks (never below 1) if the picture would exceed `max_pixels`, which keeps it small
    enough to send to the dashboard every epoch.
    """
    lo, hi = value_range
    span = (hi - lo) or 1.0
    columns = [_as_images(x, name) for x, name in ((inputs, "inputs"), (outputs, "outputs"), (targets, "targets"))]
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"samples_png needs as many outputs and targets as inputs; got "
                         f"{', '.join(str(len(c)) for c in columns)} samples")
    if n == 0:
        raise ValueError("samples_png needs at least one sample")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"samples_png scale must be a positive int, got {scale!r}")
    shown = [(c - lo) / span for c in columns]
    if difference:
        if columns[1].shape != columns[2].shape:
            raise ValueError(f"samples_png: the difference needs outputs and targets of one shape, got "
                             f"{columns[1].shape[1:]} and {columns[2].shape[1:]}")
        shown.append(np.abs(columns[1] - columns[2]) / span * DIFFERENCE_GAIN)
    return encode_png(_grid(shown, n, scale, max_pixels))


def _grid(columns, n, scale, max_pixels):
    """The (H, W, 3) uint8 picture of `columns` side by side, one row per sample."""
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
            pixels = _to_uint8(images[row])  # (h, w, 3)
            big = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
            h, w = big.shape[:2]
            canvas[y:y + h, x:x + w] = big
            if h < height * scale:  # a shorter panel than its neighbours: fill below it with black
                canvas[y + h:y + height * scale, x:x + w] = 0
            x += widths[col] * scale + gap
    return canvas


def confusion_png(counts, cell=None):
    """PNG bytes of a K x K confusion matrix (rows: true class, columns: predicted), each cell shaded by its
    share of its row (white: none, dark blue: all) and, where the cells are large enough, labelled with its
    count."""
    from PIL import Image, ImageDraw

    counts = np.asarray(counts.detach().cpu() if hasattr(counts, "detach") else counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"confusion_png needs a K x K array of counts, got shape {counts.shape}")
    k = counts.shape[0]
    cell = cell or max(6, min(40, 480 // k))
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    colors = (white + (blue - white) * share[..., None]).round().astype(np.uint8)
    picture = Image.fromarray(np.repeat(np.repeat(colors, cell, axis=0), cell, axis=1), "RGB")
    if cell >= 24:
        draw = ImageDraw.Draw(picture)
        for (true, predicted), count in np.ndenumerate(counts):
            ink = (255, 255, 255) if share[true, predicted] > 0.5 else (0, 0, 0)
            draw.text((predicted * cell + 3, true * cell + 3), str(count), fill=ink)
    return _encode(picture)


def encode_png(rgb):
    """PNG bytes for an (H, W, 3) uint8 array (or (H, W) for grayscale)."""
    from PIL import Image

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"encode_png needs an (H, W) or (H, W, 3) array, got shape {rgb.shape}")
    return _encode(Image.fromarray(rgb, "L" if rgb.ndim == 2 else "RGB"))


def _encode(picture):
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _size(widths, height, n, scale, gap):
    return (sum(widths) * scale + gap * (len(widths) + 1)) * (n * height * scale + gap * (n + 1))


def _as_images(x, name):
    """(N, H, W, 3) float array from a tensor, array or list of any of the accepted shapes."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, None, :]
    elif a.ndim == 4:
        a = np.moveaxis(a, 1, -1) if a.shape[1] == 3 else a.mean(axis=1)
    elif a.ndim != 3:
        raise ValueError(f"samples_png: `{name}` has shape {a.shape}; expected (N, H, W), (N, C, H, W) or (N, L)")
    if a.shape[1] == 0 or a.shape[2] == 0:
        raise ValueError(f"samples_png: `{name}` has an empty image (shape {a.shape})")
    return a if a.ndim == 4 else np.repeat(a[..., None], 3, axis=-1)


def _to_uint8(image):
    values = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
