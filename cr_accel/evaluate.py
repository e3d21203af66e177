"""`cr-accel evaluate RUN_DIR [--checkpoint best|last|PATH] [--split val|test] [section.key=value ...]`.

Scores a trained run's checkpoint on its validation or test split -- or on other data, through overrides of the
run's config (`data.val_path=other.npz`) -- with the run's loss and metrics, exactly as validation computes them
(`validation.score`, the validation's batch size): the `val_*` numbers of a checkpoint equal the `val_*` row of
metrics.csv for the epoch it was saved at (in a run with `stages`, with the loss of the checkpoint's stage). The
model is the checkpoint's, as `cr_accel.load_model` gives it (EMA weights where the run keeps an EMA); the loss
and metrics measure against the data range the run recorded.

Prints the metrics as one JSON object on stdout and writes them, with the checkpoint and its step, to
`RUN_DIR/eval_<split>_<checkpoint>.json`. Under `accelerate launch` every process scores its share of the set,
each sample counted once, and only the main process prints and writes. A user error is one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, UserError
from .run_files import CONFIG, eval_file

SPLITS = ("val", "test")


def main(argv: Sequence[str]) -> int:
    from .cli import EXIT_USER_ERROR, _error, _leave_process_group

    args = _parser().parse_intermixed_args(argv)
    try:
        metrics = evaluate(args.run_dir, args.checkpoint, args.split, args.overrides)
    except UserError as exc:
        _error(one_line(exc))
        _leave_process_group()
        return EXIT_USER_ERROR
    if metrics is not None:
        print(json.dumps(metrics), flush=True)
    _leave_process_group()
    return 0


def _parser() -> argparse.ArgumentParser:
    from .cli import _Parser

    p = _Parser(prog="cr-accel evaluate",
                description="Score a run's checkpoint on its validation or test split (or other data, through "
                            "overrides of the run's config) with the run's loss and metrics; print them as JSON "
                            "and write RUN_DIR/eval_<split>_<checkpoint>.json.",
                epilog="example: %(prog)s runs/default --split test; "
                       "%(prog)s runs/default --checkpoint last data.val_path=other.npz")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output.dir (holding config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", metavar="best|last|PATH",
                   help="best, last, a folder in RUN_DIR/checkpoints, or a checkpoint folder's path "
                        "(default: best if present, else last)")
    p.add_argument("--split", choices=SPLITS, default="val", help="the split to score (default: val)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the run's config")
    return p


def evaluate(run_dir: str, checkpoint: str | None = None, split: str = "val",
             overrides: Sequence[str] = ()) -> dict[str, float] | None:
    """The metrics of `split` scored with `checkpoint` of run `run_dir` (see the module docstring), written to
    the run's eval_<split>_<checkpoint>.json; None on processes other than the main one."""
    from .scoring import checkpoint_name, global_step_of, run_checkpoint, write_record

    run, cfg = load_run(run_dir, overrides)
    path = run_checkpoint(run, checkpoint)
    metrics = score_checkpoint(cfg, path, split)
    if metrics is None:
        return None
    name = checkpoint_name(path)
    write_record(run / eval_file(split, name), name, global_step_of(path), metrics, split=split)
    return metrics


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, Any]:
    """(run folder, its config.yaml with `overrides`), or a UserError naming what is missing."""
    from .config import load_config

    run = Path(run_dir)
    if not run.is_dir():
        problem = "is a file, not a run folder" if run.exists() else "does not exist"
        raise UserError(f"run folder `{run_dir}` {problem}; give a run's output.dir (e.g. runs/default)")
    if not (run / CONFIG).is_file():
        raise UserError(f"`{run_dir}` holds no {CONFIG}, so it is not a run's output.dir; give the folder a "
                        "training run wrote")
    return run, load_config(run / CONFIG, overrides)


def score_checkpoint(cfg: Any, path: Path, split: str) -> dict[str, float] | None:
    """`split` of `cfg`'s data scored with checkpoint `path` on every process; the metrics on the main process."""
    from accelerate import Accelerator

    from . import components
    from .checkpoint import load_model, read_state
    from .environment import pick_precision
    from .progress import Progress
    from .scoring import score_model
    from .validation import eval_loader, pins_memory

    data = components.build_datasets(cfg)
    dataset = data.val if split == "val" else getattr(data, "test", None)
    if dataset is None:
        raise UserError(f"the data of this run has no {split} split; give it one with an override: "
                        "data.test_path=FILE or data.test_ratio=0.1 (tensor_files, image_folder), data.test_split=test "
                        "(hf_dataset), data.num_test=64 (synthetic_cr)")
    parts = read_state(path)
    # The data range psnr/ssim measured against during training (tensor_files' is the training targets' own).
    metadata = parts.get("dataset") or data.metadata
    acc = Accelerator(mixed_precision=pick_precision(cfg.resolved_mixed_precision))
    acc.dataloader_config.non_blocking = pins_memory(cfg.data, acc.device)  # as training's loaders copy (pinned)
    loss_fn = components.build_loss(loss_config(cfg, parts), metadata).to(acc.device)
    metric_fns = components.build_metrics(cfg, metadata)
    chosen = (parts.get("auto_batch_size") or {}).get("micro_batch_size")  # training.auto_batch_size's choice
    progress = Progress(enabled=acc.is_local_main_process)
    model = load_model(path, device=acc.device)
    metrics = score_model(acc, model, eval_loader(cfg.data, dataset, chosen, acc.device), loss_fn, metric_fns, split,
                          lambda batches: progress.validation(batches, desc=f"evaluate {split}"))
    acc.wait_for_everyone()
    return metrics if acc.is_main_process else None


def loss_config(cfg: Any, parts: dict[str, Any]) -> Any:
    """The config whose `loss` the checkpoint's validations used: in a run with `stages`, that of the stage the
    checkpoint was in (the trainer enters a stage right after the step that ends the one before, so every
    validation after that step, and the checkpoint, belong to it); else the run's own."""
    from . import components, stages

    current = (parts.get("stages") or {}).get("current_stage")
    listed = stages.parse(cfg.stages) if cfg.stages else []
    if current is None or not 0 <= current < len(listed):
        return cfg
    return components.stage_config(cfg, listed[current])


def one_line(exc: UserError) -> str:
    """A user error's message on one line (a config's problems joined by `; `)."""
    if isinstance(exc, ConfigError):
        return "the run's config with the overrides is not valid: " + "; ".join(exc.problems)
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())

