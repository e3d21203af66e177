"""The dashboard's samples picture: cr_accel.images.samples_png (kept here under its earlier name)."""

from ..images import encode_png, samples_png

__all__ = ["encode_png", "samples_png"]
