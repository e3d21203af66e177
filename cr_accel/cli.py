"""Command line: `train.py` / `cr-accel train` parse arguments here; user errors exit 2 without a traceback."""

import argparse
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from .disk import check_writable, failure_kind, write_failure
from .errors import UserError
from .run_files import EVAL_PATTERN, RUN_FILES

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors (exit 2) are printed by the main process only: every process of a launched
    run parses the same arguments and would print the same message."""

    def error(self, message):
        if _is_main_process():
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Train from a YAML config; override any key as section.key=value.",
        epilog="example: %(prog)s --config configs/default.yaml training.epochs=5 optimizer.lr=3e-4",
    )
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", metavar="PATH|latest",
                   help="continue from a checkpoint folder, or the newest complete one in output.dir")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output.dir")
    p.add_argument("--allow-config-change", "--allow_config_change", action="store_true",
                   help="resume although the config differs from the checkpoint's (the changes are logged)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def run_training(args: argparse.Namespace, callbacks: Iterable[Any] = ()) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # a missing file or bad YAML is said before torch is imported
    from . import preflight

    preflight.check_parts(cfg)  # the model, loss and optimizer can be built (the batch check comes below)
    resume = args.resume_from_checkpoint
    if resume is not None and args.overwrite:
        raise UserError("--overwrite replaces an earlier run and --resume_from_checkpoint continues one; pass one "
                        "of them")
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        raise UserError(f"--resume_from_checkpoint `{resume}` is not a folder; give a checkpoint folder "
                        f"(e.g. {Path(cfg.output.dir) / 'checkpoints' / 'last'}) or `latest`")
    check_writable(cfg.output.dir)
    earlier = _earlier_run(cfg, args.overwrite) if resume is None else []
    import torch

    from .oom import OutOfMemory, unexplained
    from .preemption import PREEMPTED_EXIT_CODE
    from .step_stats import NonFiniteLossError
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg, callbacks=callbacks)
        trainer.preflight(resume)  # before --overwrite removes anything: a run that cannot start keeps the earlier one
        _remove(earlier)
        status = trainer.train(resume_from_checkpoint=resume, allow_config_change=args.allow_config_change)
    except NonFiniteLossError as exc:
        _error(f"training stopped: {exc}")
        return EXIT_TRAINING_FAILED
    except OutOfMemory as exc:  # training, validation, the preflight or auto_batch_size's search
        _training_failed(str(exc))
        return EXIT_TRAINING_FAILED
    except torch.OutOfMemoryError as exc:  # elsewhere: placing the model, loading or saving a checkpoint
        _training_failed(unexplained(exc))
        return EXIT_TRAINING_FAILED
    except OSError as exc:  # a log, CSV or run file on a disk that filled up or turned read-only
        error = write_failure(exc, "a file of the run", cfg.output.dir)
        if error is None or failure_kind(exc) == "io":
            raise
        raise error from exc
    return PREEMPTED_EXIT_CODE if status == "preempted" else 0


def _earlier_run(cfg, overwrite):
    """The files of an earlier run in output.dir, which --overwrite replaces; without it they refuse the run,
    so a new run never mixes into an earlier one's files."""
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir `{out}` is a file, not a folder; choose another output.dir")
    ours = [out / name for name in (*RUN_FILES, cfg.output.log_file, cfg.output.metrics_file, cfg.output.steps_file)]
    existing = [p for p in ours if p.exists()] + sorted(out.glob(EVAL_PATTERN))  # evaluate's scores of it too
    if existing and not overwrite:
        raise UserError(
            f"output.dir `{out}` already holds a run ({', '.join(p.name for p in existing)}); "
            "pass --resume_from_checkpoint latest to continue it, --overwrite to replace it, "
            "or choose another output.dir (e.g. output.dir=runs/new)"
        )
    return existing


def _remove(paths):
    if _is_main_process():
        for path in paths:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _is_main_process():
    return os.environ.get("RANK", "0") == "0"


def _error(message):
    if _is_main_process():  # every process finds the same user error; say it once
        print(f"error: {message}", file=sys.stderr)


def _training_failed(message):
    """A failure of the training itself (exit 1), said in one line by the main process; every process records it
    too, for the launcher to say when only another process met it (out of memory on one GPU)."""
    from .launch_exit import note_message

    _error(message)
    note_message(message)


def main_train(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    args = train_parser(prog).parse_intermixed_args(argv)  # overrides may come between options
    return train_command(args)


def train_command(args: argparse.Namespace, callbacks: Iterable[Any] = ()) -> int:
    """`run_training`, with a user error printed as one line (by the main process) and exit code 2."""
    try:
        return run_training(args, callbacks)
    except UserError as exc:
        _error(str(exc))
        return EXIT_USER_ERROR
    finally:
        _leave_process_group()


def _leave_process_group():
    """Close this process's side of the process group now, however the run ended: left to interpreter shutdown,
    a process whose peer has already gone can abort (SIGABRT) instead of exiting with its code (seen with gloo
    under FSDP2, after a finished or preempted run)."""
    if "torch" not in sys.modules:  # a config refused before torch was imported: nothing to close
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_dashboard(argv):
    """`cr-accel dashboard [--host H] [--port P] [--db FILE] [--token T] [--runs DIR]`: the live dashboard server."""
    from .dashboard.server import main as dashboard_main

    return dashboard_main(argv)


def main_plot(argv):
    """`cr-accel plot RUN_DIR [RUN_DIR ...] [--out curves.png]`: the curves of runs, in one PNG."""
    from .plot import main as plot_main

    return plot_main(argv)


def main_evaluate(argv):
    """`cr-accel evaluate RUN_DIR [--checkpoint best|last|PATH] [--split val|test] [section.key=value ...]`."""
    from .evaluate import main as evaluate_main

    return evaluate_main(argv)


def main_predict(argv):
    """`cr-accel predict RUN_DIR --input FILE --output FILE [--checkpoint ...] [--batch-size N]`."""
    from .predict import main as predict_main

    return predict_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`cr-accel <command>`: train, config, evaluate, predict, dashboard, plot; `cr-accel --help` lists them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": ("train from a YAML config, overriding any key as section.key=value",
                  lambda rest: main_train(rest, prog="cr-accel train")),
        "config": ("show the resolved config as YAML, or check it (parts built, one batch run) writing nothing",
                   main_config),
        "evaluate": ("score a run's checkpoint on its validation or test split (or other data) with its loss and "
                     "metrics; print them as JSON", main_evaluate),
        "predict": ("run a run's model on the inputs in a .npz/.safetensors/.pt file and write its outputs",
                    main_predict),
        "dashboard": ("serve the live dashboard that runs with dashboard.enabled=true report to", main_dashboard),
        "plot": ("draw runs' loss, learning rate and validation metrics against the step into one PNG", main_plot),
    }
    return _dispatch("cr-accel", commands, argv, version=True)


# ---------------------------------------------------------------- commands besides train


def _dispatch(prog, commands, argv, version=False):
    """Run `commands[argv[0]]` (name -> (one line of help, fn(rest) -> exit code)); help exits 0, a missing
    or unknown command exits 2 with the list."""
    width = max(map(len, commands))
    usage = (f"usage: {prog} {{{','.join(commands)}}} ...\n\ncommands:\n"
             + "".join(f"  {name:<{width}}  {line}\n" for name, (line, _) in commands.items())
             + f"\n{prog} <command> --help shows a command's options"
             + ("; --version prints the version" if version else ""))
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if version and argv and argv[0] == "--version":
        from . import __version__

        print(f"cr_accel {__version__}")
        return 0
    if not argv or argv[0] not in commands:
        import difflib

        close = difflib.get_close_matches(argv[0], commands, n=1) if argv else []
        problem = f"unknown command `{argv[0]}`" if argv else "no command given"
        hint = f"; did you mean `{close[0]}`?" if close else ""
        print(f"{usage}\n\nerror: {problem}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    return commands[argv[0]][1](argv[1:])


def main_config(argv):
    """`cr-accel config show|check --config F [overrides]`."""
    actions = {
        "show": ("print the resolved config (file, then overrides, then defaults) as YAML", _config_show),
        "check": ("validate the config: build its parts and run one batch of each split through model, "
                  "loss and metrics; writes nothing", _config_check),
    }
    runners = {name: functools.partial(_config_action, name, line, fn) for name, (line, fn) in actions.items()}
    return _dispatch("cr-accel config", {name: (actions[name][0], run) for name, run in runners.items()}, argv)


def _config_action(name, description, action, argv):
    p = argparse.ArgumentParser(prog=f"cr-accel config {name}", description=description,
                                epilog="example: %(prog)s --config configs/default.yaml training.epochs=5")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = p.parse_intermixed_args(argv)
    try:
        return action(args)
    except UserError as exc:
        _error(str(exc))
        return EXIT_USER_ERROR


def _config_show(args):
    import yaml

    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _config_check(args):
    """What `train` checks before it writes its first file, without training: the config, the parts, the
    preflight batch. Trackers and the dashboard are left out (they would contact servers or create files)."""
    import dataclasses

    from . import preflight
    from .config import load_config, metric_names
    from .models import count_parameters
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    preflight.check_parts(cfg)
    quiet = dataclasses.replace(cfg, dashboard=dataclasses.replace(cfg.dashboard, enabled=False),
                                output=dataclasses.replace(cfg.output, trackers=[]))
    trainer = Trainer(quiet)
    preflight.run(trainer)
    meta, data = trainer.data.metadata, trainer.data
    shapes = (f"; inputs {meta['input_shape']} {meta.get('input_dtype', '')}, targets {meta['target_shape']} "
              f"{meta.get('target_dtype', '')}" if "input_shape" in meta and "target_shape" in meta else "")
    test = f" / {len(data.test)} test" if data.test is not None else ""
    ran = "one batch of each split ran through model, loss and metrics" if preflight.enabled() else "preflight off"
    print(f"config OK: {args.config}: model {cfg.model.name} "
          f"({count_parameters(trainer.accelerator.unwrap_model(trainer.model)):,} parameters), "
          f"data {cfg.data.name} ({len(data.train)} train / {len(data.val)} val{test}{shapes}), loss {cfg.loss.name}, "
          f"metrics [{', '.join(metric_names(cfg.training.metrics))}]; {ran}")
    return 0
