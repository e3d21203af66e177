"""Command line: `train.py` / `cr-accel train` parse arguments here; user errors exit 2 without a traceback."""

import argparse
import os
import shutil
import sys
from pathlib import Path

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1

# What a run writes into output.dir besides the log and the CSV (whose names are configurable).
RUN_FILES = ("config.yaml", "environment.json", "checkpoints", "samples", "dashboard_run_id")


def train_parser(prog="train.py"):
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train from a YAML config; override any key as section.key=value.",
        epilog="example: %(prog)s --config configs/default.yaml training.epochs=5 optimizer.lr=3e-4",
    )
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", metavar="PATH|latest",
                   help="continue from a checkpoint folder, or the newest complete one in output.dir")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output.dir")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def run_training(args):
    from . import preflight
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    preflight.check_parts(cfg)  # the model, loss and optimizer can be built (the batch check is in train())
    resume = args.resume_from_checkpoint
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        raise UserError(f"--resume_from_checkpoint `{resume}` is not a folder; give a checkpoint folder "
                        f"(e.g. {Path(cfg.output.dir) / 'checkpoints' / 'last'}) or `latest`")
    if resume is None:
        _claim_output_dir(cfg, args.overwrite)
    from .preemption import PREEMPTED_EXIT_CODE
    from .step_stats import NonFiniteLossError
    from .trainer import Trainer

    try:
        status = Trainer(cfg).train(resume_from_checkpoint=resume)
    except NonFiniteLossError as exc:
        _error(f"training stopped: {exc}")
        return EXIT_TRAINING_FAILED
    return PREEMPTED_EXIT_CODE if status == "preempted" else 0


def _claim_output_dir(cfg, overwrite):
    """Refuse to mix a new run into the files of an earlier one, unless --overwrite says to replace them."""
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir `{out}` is a file, not a folder; choose another output.dir")
    ours = [out / name for name in (*RUN_FILES, cfg.output.log_file, cfg.output.metrics_file)]
    existing = [p for p in ours if p.exists()]
    if not existing:
        return
    if not overwrite:
        raise UserError(
            f"output.dir `{out}` already holds a run ({', '.join(p.name for p in existing)}); "
            "pass --resume_from_checkpoint latest to continue it, --overwrite to replace it, "
            "or choose another output.dir (e.g. output.dir=runs/new)"
        )
    if _is_main_process():
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _is_main_process():
    return os.environ.get("RANK", "0") == "0"


def _error(message):
    if _is_main_process():  # every process finds the same user error; say it once
        print(f"error: {message}", file=sys.stderr)


def main_train(argv=None, prog="train.py"):
    args = train_parser(prog).parse_intermixed_args(argv)  # overrides may come between options
    try:
        return run_training(args)
    except UserError as exc:
        _error(str(exc))
        return EXIT_USER_ERROR


def main_dashboard(argv):
    """`cr-accel dashboard [--host H] [--port P] [--db FILE] [--token T]`: the live dashboard server."""
    from .dashboard.server import main as dashboard_main

    return dashboard_main(argv)


def main(argv=None):
    """`cr-accel <command>`: train (and, as they land, more commands)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": lambda rest: main_train(rest, prog="cr-accel train"), "dashboard": main_dashboard}
    if not argv or argv[0] not in commands:
        print(f"usage: cr-accel {{{','.join(commands)}}} ...  (cr-accel train --help)", file=sys.stderr)
        return EXIT_USER_ERROR
    return commands[argv[0]](argv[1:])
