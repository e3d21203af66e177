"""accelerate's standard trackers named in `output.trackers` (TensorBoard, Weights & Biases, ...).

Every value goes on one axis, the optimizer step: step records as `train/<name>` (train/loss, train/lr,
train/loss/l1), epoch records as `epoch/<name>` (epoch/val_loss, epoch/val_psnr), so the two never write the
same tag at the same step. TensorBoard also gets the samples pictures (`images/<name>`) and histograms of
weights and gradients. A resumed run opens TensorBoard with `purge_step` one past the checkpoint's step:
TensorBoard then hides what the interrupted run logged after it, so no step appears twice.

The trackers are accelerate's (`Accelerator(log_with=...)`), created on the main process only. What they are
handed is written by one thread of this sink's own, in order, so the training thread does not build
TensorBoard's protobufs: in one process on the benchmark MLP (a 1.6 ms step), the scalars of the step and epoch
records cost ~45 us a step averaged when written inline. That thread also writes TensorBoard's event file
itself, kept open (sinks/event_file.py), in place of TensorBoard's own writing thread. `finish` waits for
everything queued; an error of a tracker is raised in the training thread at the next record.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from typing import Any, Callable

from . import RunStart, Sink
from .event_file import take_over

PROJECT = "cr_accel"
FLUSH_SECONDS = 5.0  # how stale TensorBoard's view of the scalars may get


class TrackersSink(Sink):
    def __init__(self, accelerator: Any, names: list[str]) -> None:
        self.accelerator = accelerator
        self.names = list(names)
        self._jobs: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._flushed = time.monotonic()

    def start(self, run: RunStart) -> None:
        if "tensorboard" in self.names:
            fast_tensorboard_checksums()
        init_kwargs = {"tensorboard": {"purge_step": run.steps_done + 1}} if run.resumed else {}
        self.accelerator.init_trackers(PROJECT, init_kwargs=init_kwargs)
        flat = _flatten(run.config)  # TensorBoard's hparams take scalars only
        for tracker in self.accelerator.trackers:
            tracker.store_init_configuration(flat)
        if "tensorboard" in self.names:
            from tensorboard.summary.writer import record_writer

            # From here on, this sink's thread writes the event file itself (sinks/event_file.py).
            take_over(self._tensorboard(), record_writer.masked_crc32c)
        self._writer = threading.Thread(target=self._write, name="cr_accel-trackers", daemon=True)
        self._writer.start()

    def log_step(self, record: dict[str, Any]) -> None:
        self._submit(self._scalars, _tagged("train", record), record["step"])

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._submit(self._scalars, _tagged("epoch", record), record["step"])

    def log_image(self, name: str, png: bytes, step: int, epoch: int) -> None:
        if "tensorboard" in self.names:
            self._submit(self._image, name, png, step)

    def log_histograms(self, histograms: dict[str, dict[str, Any]], step: int) -> None:
        self._submit(self._histograms, histograms, step)

    @property
    def wants_histograms(self) -> bool:
        return "tensorboard" in self.names

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._jobs.put(None)
            self._writer.join()
            self._writer = None
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self._raise_error()

    # ------------------------------------------------------------ the writing thread

    def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._raise_error()
        if self._writer is None:  # not started (a sink driven on its own): write now
            fn(*args, **kwargs)
        else:
            self._jobs.put((fn, args, kwargs))

    def _write(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                fn, args, kwargs = job
                try:
                    fn(*args, **kwargs)
                except BaseException as exc:  # raised in the training thread at its next record
                    self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard: the record's values as one event (accelerate's tracker writes one event per value and
        flushes the file after each record: ~4x the work, on a thread that takes the GIL from training);
        flushed at most every FLUSH_SECONDS, and at the end. Other trackers: their own `log`."""
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":
                tracker.log(values, step=step)
                continue
            from tensorboard.compat.proto.summary_pb2 import Summary

            writer = tracker.tracker
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
            writer.file_writer.add_summary(summary, step)
            if time.monotonic() - self._flushed >= FLUSH_SECONDS:
                writer.flush()
                self._flushed = time.monotonic()

    def _image(self, name: str, png: bytes, step: int) -> None:
        self._tensorboard().add_image(f"images/{name}", _decode(png), global_step=step, dataformats="HWC")

    def _histograms(self, histograms: dict[str, dict[str, Any]], step: int) -> None:
        """Written raw (`add_histogram_raw`): the counts are made by the Histograms callback."""
        writer = self._tensorboard()
        for tag, histogram in histograms.items():
            writer.add_histogram_raw(tag, **histogram, global_step=step)

    def _tensorboard(self) -> Any:
        if "tensorboard" not in self.names:
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)


def fast_tensorboard_checksums() -> bool:
    """Have TensorBoard's record writer checksum in C where google-crc32c is installed (the `tensorboard` extra
    brings it); True if it does.

    Without TensorFlow, TensorBoard computes each record's masked CRC32C in pure Python, on its writer's thread:
    ~140 us for one histogram's 1 KB, 17 us for a 7-value step record, ~3.3 ms of a histogram epoch of the
    benchmark MLP's 24 tensors -- Python that takes the GIL from the training thread. google-crc32c gives the same
    values (tests/test_trackers.py compares them) in ~1 us. The writer looks the function up in its module at each
    record, so replacing it there covers every writer of the process."""
    try:
        import google_crc32c
    except ImportError:
        return False
    if google_crc32c.implementation != "c":  # its own pure-Python fallback would gain nothing
        return False
    from tensorboard.summary.writer import record_writer

    record_writer.masked_crc32c = masked_crc32c
    return True


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC32C rotated right by 15 bits plus a constant, modulo 2**32."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tagged(prefix: str, record: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard tags: `epoch/<name>` for epoch records; in step records, `train/<name>`, and `val/<name>` for
    the metrics of a validation at that step (training.eval_every_steps), which are not training values."""
    def tag(key: str) -> str:
        return f"val/{key}" if prefix == "train" and key.startswith("val_") else f"{prefix}/{key}"

    return {tag(k): v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


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
