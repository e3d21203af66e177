"""The run folder's own records: the epoch line of train.log, metrics.csv (per epoch) and steps.csv (per logged
step). After a resume the rows logged after the checkpoint move to `<file>.superseded` before they are logged
again, so each file reads as one uninterrupted run."""

from __future__ import annotations

from typing import Any

from ..run_log import RecordsCSV, TextLog
from . import RunStart, Sink


class TextLogSink(Sink):
    """One line per epoch in train.log (and on the console): the numbers a person scans for."""

    def __init__(self, log: TextLog, epochs: int) -> None:
        self.log = log
        self.epochs = epochs

    def log_epoch(self, record: dict[str, Any]) -> None:
        m = record
        parts = [f"epoch {m['epoch']}/{self.epochs}", f"step {m['step']}", f"train_loss {m['train_loss']:.6g}"]
        if "val_loss" in m:
            parts.append(f"val_loss {m['val_loss']:.6g}")
        parts += [f"best_val {m['best_val']:.6g}", f"lr {m['lr']:.4g}"]
        parts += [f"{k} {v:.4g}" for k, v in m.items() if k.startswith("val_") and not k.startswith("val_loss")]
        self.log.info(" | ".join(parts))


class CSVSink(Sink):
    """Rows of epoch records (`per="epoch"`, metrics.csv) or of step records (`per="step"`, steps.csv)."""

    def __init__(self, path: Any, per: str) -> None:
        self.per = per
        self.file = RecordsCSV(path, enabled=True, key=per)

    def start(self, run: RunStart) -> None:
        self.file.keep_through(run.epochs_done if self.per == "epoch" else run.steps_done)

    def log_step(self, record: dict[str, Any]) -> None:
        if self.per == "step":
            self.file.append(record)

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.per == "epoch":
            self.file.append(record)
