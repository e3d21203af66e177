"""Scoring a model on a set as validation does: the test split at the end of training (callbacks/final_score.py)
and `cr-accel evaluate` / `cr-accel predict` (which checkpoint of a run they use).

The numbers come from `validation.score` with the run's loss and metrics and the validation's batches, so a
checkpoint scored here gives exactly what validation logged for it (on as many processes as it ran with).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from .checkpoint import is_complete, read_state
from .errors import UserError
from .run_files import CHECKPOINTS
from .validation import renamed_for_split, score

NAMED = ("best", "last")  # a run's own checkpoints, in the order `best if present, else last` tries them


def run_checkpoint(run_dir: str | os.PathLike, which: str | None = None) -> Path:
    """The checkpoint folder of run `run_dir` that `which` names: `best`, `last`, a folder name inside
    checkpoints/ (`step_00000080`) or any checkpoint folder's path; None: best/ where it is complete, else last/."""
    ckpts = Path(run_dir) / CHECKPOINTS
    if which is None or which in NAMED:
        for name in NAMED if which is None else (which,):
            if is_complete(ckpts / name):
                return ckpts / name
        what = "complete best/ or last/ checkpoint" if which is None else f"complete {which}/ checkpoint"
        present = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) if ckpts.is_dir() else []
        listing = f" (checkpoints/ holds: {', '.join(present)})" if present else " (no checkpoints/ folder yet)"
        raise UserError(f"run `{run_dir}` has no {what}{listing}; train it first, or pass --checkpoint PATH")
    path = Path(which)
    if not path.is_dir() and (ckpts / which).is_dir():
        path = ckpts / which
    if not is_complete(path):
        problem = "is not a complete checkpoint (no manifest.json)" if path.is_dir() else "does not exist"
        raise UserError(f"--checkpoint `{which}` {problem}; pass best, last, a folder in `{ckpts}` or a "
                        "checkpoint folder's path")
    return path


def checkpoint_name(path: Path) -> str:
    """What a record calls a checkpoint: its folder name (`best`, `last`, `step_00000080`)."""
    return path.resolve().name


def global_step_of(path: Path) -> int:
    return int(read_state(path)["trainer"]["global_step"])


@contextlib.contextmanager
def _accelerator_kept(acc: Any) -> Iterator[None]:
    """accelerate keeps every model and loader it prepares in lists that `save_state` and `load_state` walk; what
    scoring prepares leaves them again, so a checkpoint written after it holds what it would have held."""
    models, loaders = list(acc._models), list(acc._dataloaders)
    try:
        yield
    finally:
        acc._models[:] = models
        acc._dataloaders[:] = loaders


def score_model(acc: Any, model: Any, loader: Any, loss_fn: Any, metric_fns: dict[str, Any], split: str,
                batches: Callable[[Any], Any] = iter) -> dict[str, float]:
    """`model` scored on the set of the unprepared `loader` (every process its share, exact means over all):
    `<split>_loss`, `<split>_<metric>`. A plain model is prepared for evaluation here -- the run's mixed precision,
    no DDP wrapper -- and a prepared one (the Trainer's) used as it is; its train/eval mode is restored after."""
    with _accelerator_kept(acc):
        model = acc.prepare_model(model, evaluation_mode=True)  # returns an already prepared model as it is
        prepared = acc.prepare_data_loader(loader, device_placement=acc.device.type != "cpu")
        training = model.training
        model.eval()
        try:
            metrics, _ = score(acc, model, prepared, loss_fn, metric_fns, batches)
        finally:
            model.train(training)
    return renamed_for_split(metrics, split)


def write_record(path: Path, checkpoint: str, global_step: int, metrics: dict[str, float], **extra: Any) -> None:
    """`{"checkpoint": ..., "global_step": ..., **extra, "metrics": {...}}` as JSON, written whole (a temporary
    file renamed into place)."""
    record = {"checkpoint": checkpoint, "global_step": global_step, **extra, "metrics": metrics}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
