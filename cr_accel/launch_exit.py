"""Exit codes that survive the launcher: `accelerate launch` (torchrun's agent) turns every worker's
non-zero exit into its own exit 1 with a ~40-line ChildFailedError traceback, so a user error (2) or a
preemption (75) of a multi-process run would look like a crash. This module fixes that in two halves.

Workers (`train.py`): `recorded(main)` runs the trainer's main and, when `CR_ACCEL_EXIT_DIR` is set,
writes `rank<RANK>.json` there with its exit code and the time, just before the process exits -- and the
one-line message of a training failure the CLI explained (`note_message`: out of memory), which the
main process alone prints.

Launcher: `python -m cr_accel.launch_exit [accelerate launch options] train.py ...` (what `launch.sh`
runs) is `accelerate launch` run in this process, with a fresh `CR_ACCEL_EXIT_DIR`. Afterwards the
workers' records decide the exit code: the earliest non-zero record is the root cause (the agent
SIGTERMs the other workers once one has exited, so later codes are consequences); 2 and 75 pass
through, anything else is 1. A 75 is only ever recorded after the trainer's final agreement between all
processes, so the checkpoint is complete whatever the other workers did next. A 1 whose root cause
recorded a message was explained: no traceback either, and the message is printed here when the main
process did not say it (it was another process that ran out of memory). Without records (a
script that does not call `recorded`) the root cause torchrun reports is used the same way. For 2 and
75 the agent's traceback and its log lines about stopping workers are not shown (the trainer has said
what happened, once); for any other failure they are printed, as `accelerate launch` would.

Why files and not torchrun's output: the ChildFailedError summary is text meant for people (its format
changes between torch versions), it stamps failures to the second (so ties hide the root cause), and
when the agent itself is signalled (SLURM, Ctrl-C) it reports nothing about the workers' codes at all.
"""

import json
import os
import sys
import time
from pathlib import Path

EXIT_DIR_ENV = "CR_ACCEL_EXIT_DIR"
# torchrun's agent passes on only these signals by default; the trainer also checkpoints on SIGUSR1
# (SLURM's warning signal), which would otherwise kill the agent and orphan the workers.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
_message = None  # the failure this process explained, for its record


def note_message(message):
    """This process's training failure, in the one line the CLI says (recorded with the exit code)."""
    global _message
    _message = message


# ---------------------------------------------------------------- the workers' half


def recorded(main, *args):
    """main(*args)'s exit code, recorded under $CR_ACCEL_EXIT_DIR (when set) before it is returned;
    an exception or sys.exit() is recorded too, and propagates."""
    code = 1  # an exception: the interpreter exits 1 after printing it
    try:
        code = main(*args)
        return code
    except SystemExit as exc:  # argparse errors exit 2, like every other user error
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    finally:
        _record(0 if code is None else code)


def _record(code):
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    path = Path(folder) / f"rank{rank}.json"
    try:  # write, then rename: the launcher never reads half a record
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        record = {"rank": int(rank), "code": int(code), "time": time.time()}
        if _message is not None and code != 0:
            record["message"] = _message
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except (OSError, ValueError):
        pass  # the launcher then falls back to what torchrun reports


def read_records(folder):
    """[(time, rank, code)] of every well-formed record in `folder`, oldest first."""
    return sorted(record[:3] for record in _read(folder))


def read_messages(folder):
    """{rank: the failure it explained} of the records that hold one."""
    return {rank: message for _, rank, _, message in _read(folder) if isinstance(message, str)}


def _read(folder):
    found = []
    for path in Path(folder).glob("rank*.json"):
        try:
            r = json.loads(path.read_text())
            found.append((float(r["time"]), int(r["rank"]), int(r["code"]), r.get("message")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return found


def explained_failure(records, messages):
    """(whether the run failed with a message its root cause explained, the line to print here or None): the
    main process prints its own; a message only another process recorded is printed by the launcher."""
    failed = [(rank, code) for _, rank, code in records if code != 0]
    if not failed or failed[0][0] not in messages:
        return False, None
    return True, (None if 0 in messages else f"error: {messages[failed[0][0]]}")


# ---------------------------------------------------------------- the launcher's half


def exit_code(records, error):
    """The launcher's exit code from the workers' records and what `launch_command` raised (or None)."""
    from .cli import EXIT_TRAINING_FAILED, EXIT_USER_ERROR
    from .preemption import PREEMPTED_EXIT_CODE

    passed = (EXIT_USER_ERROR, PREEMPTED_EXIT_CODE)
    failed = [code for _, _, code in records if code != 0]
    if failed:
        return failed[0] if failed[0] in passed else EXIT_TRAINING_FAILED
    if error is None:
        return 0
    reported = _reported_code(error)
    if reported == 0:
        return 0
    return reported if reported in passed else EXIT_TRAINING_FAILED


def _reported_code(error):
    """The exit code the launcher itself knows: torchrun's root cause, the one process's, or sys.exit's."""
    import subprocess

    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    if isinstance(error, subprocess.CalledProcessError):  # accelerate's one-process launcher
        return error.returncode
    get_first_failure = getattr(error, "get_first_failure", None)  # torchrun's ChildFailedError
    if get_first_failure is not None:
        return get_first_failure()[1].exitcode
    return None


class _HeldLogs:
    """Holds the log records of torchrun's agent (`torch.distributed.elastic`: workers failing, being
    stopped) while it runs; `release()` prints them the way they would have been printed."""

    NAME = "torch.distributed.elastic"

    def __enter__(self):
        import logging

        class Hold(logging.Handler):
            def emit(handler, record):
                self.records.append(record)

        self.records, self.logger, self.handler = [], logging.getLogger(self.NAME), Hold()
        self.propagate = self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.propagate

    def release(self):
        for record in self.records:
            self.logger.handle(record)
        self.records = []


def launch(argv):
    """`accelerate launch argv...` in this process; returns the exit code that tells the truth."""
    import shutil
    import tempfile
    import traceback

    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)  # bad options: accelerate's own message, exit 2
    exit_dir = tempfile.mkdtemp(prefix="cr_accel-exit-")
    os.environ[EXIT_DIR_ENV] = exit_dir
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", SIGNALS_TO_HANDLE)
    error = None
    try:
        with _HeldLogs() as held:
            launch_command(args)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # ChildFailedError, SignalException, ...
        error = exc
    finally:
        records, messages = read_records(exit_dir), read_messages(exit_dir)
        shutil.rmtree(exit_dir, ignore_errors=True)
    code = exit_code(records, error)
    explained, line = explained_failure(records, messages)
    if line is not None:
        print(line, file=sys.stderr)
    if code not in (2, 75) and not explained:
        held.release()
        if error is not None and not isinstance(error, SystemExit):
            traceback.print_exception(error)
    sys.stderr.flush()
    return code


def main(argv=None):
    return launch(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run by path (launch.sh): import this checkout's cr_accel, not another
        sys.path[0] = str(Path(__file__).resolve().parents[1])  # and never shadow the standard library
        from cr_accel.launch_exit import main
    sys.exit(main())
