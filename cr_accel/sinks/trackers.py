"""accelerate's standard trackers named in `output.trackers` (TensorBoard, Weights & Biases, ...).

Every value goes on one axis, the optimizer step: step records as `train/<name>` (train/loss, train/lr,
train/loss/l1), epoch records as `epoch/<name>` (epoch/val_loss, epoch/val_psnr), so the two never write the
same tag at the same step. TensorBoard also gets the samples pictures (`images/<name>`) and histograms of
weights and gradients. A resumed run opens TensorBoard with `purge_step` one past the checkpoint's step:
TensorBoard then hides what the interrupted run logged after it, so no step appears twice.

The trackers are accelerate's (`Accelerator(log_with=...)`), created on the main process only.
"""

from __future__ import annotations

import io
from typing import Any

from . import RunStart, Sink

PROJECT = "cr_accel"
HISTOGRAM_BINS = 64


class TrackersSink(Sink):
    def __init__(self, accelerator: Any, names: list[str]) -> None:
        self.accelerator = accelerator
        self.names = list(names)

    def start(self, run: RunStart) -> None:
        init_kwargs = {"tensorboard": {"purge_step": run.steps_done + 1}} if run.resumed else {}
        self.accelerator.init_trackers(PROJECT, init_kwargs=init_kwargs)
        flat = _flatten(run.config)  # TensorBoard's hparams take scalars only
        for tracker in self.accelerator.trackers:
            tracker.store_init_configuration(flat)

    def log_step(self, record: dict[str, Any]) -> None:
        self.accelerator.log(_tagged("train", record), step=record["step"])

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.accelerator.log(_tagged("epoch", record), step=record["step"])

    def log_image(self, name: str, png: bytes, step: int, epoch: int) -> None:
        writer = self._tensorboard()
        if writer is not None:
            writer.add_image(f"images/{name}", _decode(png), global_step=step, dataformats="HWC")

    def log_histograms(self, tensors: dict[str, Any], step: int) -> None:
        """Counted by torch (`torch.histogram`, 64 equal bins between the tensor's extremes) and written raw:
        TensorBoard's own add_histogram bins in NumPy, ~10x slower (28 ms for the 12 tensors of the overhead
        benchmark's MLP, at every histogram epoch's end)."""
        import torch

        writer = self._tensorboard()
        for tag, tensor in tensors.items():
            values = tensor.detach().double().flatten()
            values = values[torch.isfinite(values)]
            if values.numel() == 0:
                continue
            low, high = float(values.min()), float(values.max())
            counts, edges = torch.histogram(values, bins=HISTOGRAM_BINS, range=(low, high if high > low else low + 1))
            writer.add_histogram_raw(tag, low, high, values.numel(), float(values.sum()), float(values.square().sum()),
                                     bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)

    @property
    def wants_histograms(self) -> bool:
        return "tensorboard" in self.names

    def finish(self, status: str) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def _tensorboard(self) -> Any:
        if "tensorboard" not in self.names:
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)


def _tagged(prefix: str, record: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def _decode(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; lists and None as text."""
    flat = {}
    for section, values in config.items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for key, value in items:
            name = section if key is None else f"{section}.{key}"
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
