"""Whether a validation improved a monitored metric: what the checkpoint policy and early stopping both ask."""

from __future__ import annotations

import math
from typing import Any


class Monitor:
    """The best value of one metric so far, in `mode` min or max; an improvement must beat it by `min_delta`."""

    def __init__(self, metric: str, mode: str = "min", min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be `min` or `max`, got {mode!r}")
        self.metric, self.mode, self.min_delta = metric, mode, min_delta
        self.best: float | None = None

    def update(self, metrics: dict[str, Any]) -> bool | None:
        """Take a validation's metrics: True when the metric improved (and is now the best), False when not,
        None when the metrics do not hold it (or hold NaN), which counts neither way."""
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            return None
        value = float(value)
        if self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                 else value > self.best + self.min_delta):
            self.best = value
            return True
        return False
