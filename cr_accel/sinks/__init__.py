"""One metrics path: everything a run logs goes through `Sinks`, which hands it to every sink.

    sinks = Sinks([TextLogSink(log), CSVSink(...), ...])      # the main process's; elsewhere Sinks([])
    sinks.start(RunStart(...))                                # once, after a resume decided where the run is
    sinks.log_step({"step": 40, "epoch": 2, "loss": 0.1, "lr": 1e-3, "grad_norm": 0.5, "loss/l1": 0.02})
    sinks.log_epoch({"epoch": 2, "step": 40, "train_loss": 0.1, "val_loss": 0.2, "val_psnr": 31.0, ...})
    sinks.log_image("samples", png_bytes, step=40, epoch=2)
    sinks.log_histograms({"weights/head.weight": histogram_of(weight), ...}, step=40)   # cr_accel.histogram
    sinks.finish("finished")

A record is a flat dict of names to numbers (plus `step` and `epoch`), reduced over every process before it
gets here: a sink writes, it never computes. Step records come every `training.log_every` optimizer steps,
epoch records once per epoch; `epoch` is counted from 1, `step` is the optimizer step the record belongs to.
Adding a destination is one `Sink` subclass; adding a value is one key in a record.

The sinks: TextLogSink and CSVSink (files.py: train.log's epoch line, metrics.csv, steps.csv), TrackersSink
(trackers.py: accelerate's standard trackers such as TensorBoard, with images and histograms) and DashboardSink
(dashboard.py: the live dashboard).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStart:
    """Where the run starts: a resumed run continues after `epochs_done` epochs and `steps_done` optimizer steps,
    and whatever a sink holds from after that point was about to be logged again."""

    config: dict[str, Any]
    world_size: int
    device: str
    epochs_done: int = 0
    steps_done: int = 0
    resumed: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Sink:
    """A destination for what the run logs; every method does nothing unless overridden."""

    def start(self, run: RunStart) -> None:
        pass

    def log_step(self, record: dict[str, Any]) -> None:
        pass

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def log_image(self, name: str, png: bytes, step: int, epoch: int) -> None:
        pass

    def log_histograms(self, histograms: dict[str, dict[str, Any]], step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass

    @property
    def wants_histograms(self) -> bool:
        """Histograms cost a pass over every weight and gradient: they are made only for a sink that keeps them."""
        return False


class Sinks(Sink):
    """Every sink of the run, in order; on processes other than the main one, none."""

    def __init__(self, sinks: list[Sink] | tuple[Sink, ...] = ()) -> None:
        self.sinks = list(sinks)

    def start(self, run: RunStart) -> None:
        for sink in self.sinks:
            sink.start(run)

    def log_step(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_step(record)

    def log_epoch(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_epoch(record)

    def log_image(self, name: str, png: bytes, step: int, epoch: int) -> None:
        for sink in self.sinks:
            sink.log_image(name, png, step, epoch)

    def log_histograms(self, histograms: dict[str, dict[str, Any]], step: int) -> None:
        for sink in self.sinks:
            if sink.wants_histograms:
                sink.log_histograms(histograms, step)

    def finish(self, status: str) -> None:
        for sink in self.sinks:
            sink.finish(status)

    @property
    def wants_histograms(self) -> bool:
        return any(sink.wants_histograms for sink in self.sinks)


def build_sinks(cfg: Any, accelerator: Any, log: Any) -> Sinks:
    """The main process's sinks: train.log's epoch line, metrics.csv, steps.csv, the trackers named in
    output.trackers, the dashboard when it is enabled."""
    from pathlib import Path

    from .files import CSVSink, TextLogSink

    out = Path(cfg.output.dir)
    sinks = [TextLogSink(log, cfg.training.epochs), CSVSink(out / cfg.output.metrics_file, per="epoch"),
             CSVSink(out / cfg.output.steps_file, per="step")]
    if cfg.output.trackers:
        from .trackers import TrackersSink

        sinks.append(TrackersSink(accelerator, cfg.output.trackers))
    if cfg.dashboard.enabled:
        from .dashboard import DashboardSink, dashboard_tracker

        sinks.append(DashboardSink(dashboard_tracker(cfg, log), out))
    return Sinks(sinks)


__all__ = ["RunStart", "Sink", "Sinks", "build_sinks"]
