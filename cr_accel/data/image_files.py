"""Reading image files: a header without the pixels, or the whole image as a `C x H x W` float32 tensor.

A file is a path, or an `EncodedImage`: the bytes of an image file held in memory (an `Image` column of a
Hugging Face dataset), read by the same code so that both are checked and scaled alike.

PNG and JPEG are read with Pillow, TIFF with tifffile (16-bit and floating-point TIFFs, as SAR and microscopy
data come). Both are imported on first use, so the rest of cr_accel works without them; a missing one is a
user error naming the extra that installs it. Values: 8-bit images divided by 255, 16-bit ones by 65535 (both
in [0, 1]), floating-point ones kept as stored.
"""

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cr_accel.errors import UserError

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES
SUPPORTED_TEXT = ".png, .jpg, .jpeg, .tif or .tiff"
INSTALL = "pip install -e '.[images]'"
SCALE = {"uint8": 255.0, "uint16": 65535.0}  # integer images are divided by their largest value
FLOATS = ("float16", "float32", "float64")

# Pillow's mode -> (the mode it is converted to before reading, or None; channels; stored dtype). Pillow opens
# 16-bit grayscale PNGs as I;16 (or I, in older versions); a 1-bit image reads as 0 and 1.
PILLOW_MODES = {
    "1": ("L", 1, "uint8"), "L": (None, 1, "uint8"), "P": ("RGB", 3, "uint8"), "RGB": (None, 3, "uint8"),
    "CMYK": ("RGB", 3, "uint8"), "YCbCr": ("RGB", 3, "uint8"),
    "I;16": (None, 1, "uint16"), "I;16B": (None, 1, "uint16"), "I;16L": (None, 1, "uint16"), "I": (None, 1, "uint16"),
}  # fmt: skip


@dataclass(frozen=True)
class EncodedImage:
    """The bytes of an image file in memory; `name` says where they came from in messages."""

    name: str
    data: bytes = field(repr=False)

    def __str__(self) -> str:
        return self.name


ImageSource = Path | EncodedImage
# A TIFF (and a BigTIFF) starts with its byte order and the magic number 42 (43): the bytes have no extension.
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


class ImageReadError(UserError):
    """A file that cannot be read as an image. Raised in a DataLoader worker, it reaches the main process as
    `ImageReadError(<the worker's traceback as text>)`; only the message, its last line, is kept: one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2] + " (read in a DataLoader worker)"
        super().__init__(message)


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says: enough to check it against the others without decoding it."""

    file: ImageSource
    height: int
    width: int
    channels: int
    dtype: str  # as stored: uint8, uint16, float16, float32 or float64

    @property
    def integer(self) -> bool:
        return self.dtype in SCALE

    @property
    def kind(self) -> str:
        return f"{self.channels}-channel {self.dtype}"

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height} pixels (width x height)"


def read_header(file: ImageSource) -> ImageHeader:
    """The header of an image file (Pillow opens lazily; tifffile reads the page's tags), any failure a UserError
    naming the file."""
    return _reading(file, _tiff_header if _is_tiff(file) else _pillow_header)


def decode_image(file: ImageSource, keep_8_bit: bool = False) -> torch.Tensor:
    """The image of `file` as a `C x H x W` float32 tensor, scaled as the module docstring says; with
    `keep_8_bit`, an 8-bit image as its stored uint8 values (`scaled(image)` is then the float32 tensor)."""
    array, dtype = _reading(file, _tiff_pixels if _is_tiff(file) else _pillow_pixels)
    if keep_8_bit and dtype == "uint8":
        return torch.from_numpy(np.require(array, requirements=["C", "W"]))  # a read-only array would warn
    return scaled(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), dtype)


def scaled(image: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored values (or a batch of them) of an image of `dtype` as float32, integers divided by their largest
    value: one float32 division wherever it runs, so a worker and the device compute the same bits."""
    image = image if image.dtype == torch.float32 else image.float()
    return image / SCALE[dtype] if dtype in SCALE else image


def _is_tiff(file):
    if isinstance(file, EncodedImage):
        return file.data[:4] in TIFF_MAGIC
    return file.suffix.lower() in TIFF_SUFFIXES


def _opened(file):
    """What Pillow and tifffile open: the path, or a file object over the bytes."""
    return io.BytesIO(file.data) if isinstance(file, EncodedImage) else file


def _reading(file, read):
    try:
        return read(file)
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign files: each reader has exception types of its own
        text = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {text[0] if text else 'no details'}"
        claimed = "an image format cr_accel reads" if isinstance(file, EncodedImage) else "the format its extension says"
        raise ImageReadError(f"cannot read the image `{file}` ({why}): it is corrupt or not {claimed}; replace or "
                             "remove it") from None


# ---------------------------------------------------------------- PNG and JPEG: Pillow


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise UserError(f"data.name=image_folder reads PNG and JPEG files with Pillow, which is not installed: "
                        f"{INSTALL}") from None
    return Image


def _pillow_mode(file, image):
    mode = image.mode
    if mode not in PILLOW_MODES:
        alpha = " (it has an alpha channel: save it without)" if "A" in mode else ""
        raise UserError(f"`{file}` has Pillow mode {mode}{alpha}, which cr_accel does not read; save it as "
                        "grayscale or RGB (8 or 16 bits), e.g. Image.open(f).convert('RGB').save(f)")
    tile = image.tile[0] if getattr(image, "tile", None) else None
    raw = getattr(tile, "args", None) if tile is not None else None
    if image.format == "PNG" and isinstance(raw, str) and raw.startswith("RGB") and ";16" in raw:
        raise UserError(f"`{file}` is a 16-bit color PNG, which Pillow reads as 8 bits; save it as a 16-bit TIFF "
                        "(tifffile.imwrite) to keep its precision")
    return PILLOW_MODES[mode]


def _pillow_header(file):
    with _pillow().open(_opened(file)) as image:
        _, channels, dtype = _pillow_mode(file, image)
        return ImageHeader(file, image.height, image.width, channels, dtype)


def _pillow_pixels(file):
    with _pillow().open(_opened(file)) as image:
        convert, channels, dtype = _pillow_mode(file, image)
        array = np.asarray(image.convert(convert) if convert else image)
    array = array.reshape(array.shape[0], array.shape[1], channels)
    return array.transpose(2, 0, 1), dtype


# ---------------------------------------------------------------- TIFF: tifffile


def _tifffile(file):
    try:
        import tifffile
    except ImportError:
        raise UserError(f"`{file}` is a TIFF, which cr_accel reads with tifffile, not installed: "
                        f"{INSTALL}") from None
    return tifffile


def _tiff_page(file, tif) -> tuple[Any, str, int | None]:
    """The one page of a TIFF, its dtype and which axis holds the channels (None: grayscale)."""
    if len(tif.pages) != 1:
        raise UserError(f"`{file}` holds {len(tif.pages)} pages (a stack); cr_accel reads one image per file: "
                        "save each page as a file of its own")
    page = tif.pages[0]
    dtype = np.dtype(page.dtype).name
    if dtype not in (*SCALE, *FLOATS):
        raise UserError(f"`{file}` holds {dtype} values; cr_accel reads 8- and 16-bit unsigned or "
                        "floating-point TIFFs: convert it (e.g. to float32)")
    axes = {"YX": None, "YXS": 2, "SYX": 0}
    if page.axes not in axes:
        raise UserError(f"`{file}` has axes {page.axes}; cr_accel reads single images (YX, YXS or SYX): save "
                        "it as one 2-D image, with or without channels")
    return page, dtype, axes[page.axes]


def _tiff_header(file):
    with _tifffile(file).TiffFile(_opened(file)) as tif:
        page, dtype, channel_axis = _tiff_page(file, tif)
        shape = list(page.shape)
    channels = 1 if channel_axis is None else shape.pop(channel_axis)
    return ImageHeader(file, shape[0], shape[1], channels, dtype)


def _tiff_pixels(file):
    with _tifffile(file).TiffFile(_opened(file)) as tif:
        page, dtype, channel_axis = _tiff_page(file, tif)
        array = page.asarray()
    if channel_axis is None:
        array = array[None]
    elif channel_axis == 2:
        array = array.transpose(2, 0, 1)
    return array, dtype
