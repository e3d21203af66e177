"""`python train.py ARGS` for many short runs, each a real process forked from one that has imported torch.

A run refused by its config spends ~1.3 of its ~1.6 s importing torch and accelerate. Tests that start dozens
of them (the bad-config table) start this server once instead: it imports what `train.py` imports, then for
every request forks a child that runs `train.py` as `__main__` -- the same file, arguments, working directory,
environment and exit path as `python train.py` (its own stdout/stderr files, `sys.exit`'s code, atexit
handlers) -- so what the test asserts (exit code, messages, files on disk) is what the command does.

    with TrainServer() as server:
        rc, stdout, stderr = server.run("--config", path, "output.dir=...", timeout=60)

`run` is thread-safe: children run side by side, one per request in flight.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.runners import ROOT, clean_env


class TrainServer:
    """The forking server, as seen from the test process."""

    def __init__(self) -> None:
        self._proc = None
        self._lock = threading.Lock()
        self._results: dict[int, int] = {}
        self._done: dict[int, threading.Event] = {}
        self._next_id = 0
        self._outputs = Path(tempfile.mkdtemp(prefix="train_server_"))

    def __enter__(self) -> "TrainServer":
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.forked_train"], cwd=ROOT, env=clean_env(),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._proc.stdout.readline().strip()
        assert ready == "ready", f"the train server did not start: {ready!r}"
        threading.Thread(target=self._read_results, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        shutil.rmtree(self._outputs, ignore_errors=True)

    def run(self, *args, timeout: float = 120) -> tuple[int, str, str]:
        """(returncode, stdout, stderr) of `python train.py ARGS` from the repo root."""
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            self._done[request_id] = threading.Event()
            out, err = self._outputs / f"{request_id}.out", self._outputs / f"{request_id}.err"
            request = {"id": request_id, "args": [str(a) for a in args], "stdout": str(out), "stderr": str(err)}
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        if not self._done[request_id].wait(timeout):
            raise AssertionError(f"`train.py {' '.join(map(str, args))}` did not finish in {timeout} s\n"
                                 f"stderr: {err.read_text() if err.exists() else ''}")
        return self._results[request_id], out.read_text(), err.read_text()

    def _read_results(self) -> None:
        for line in self._proc.stdout:
            request_id, returncode = map(int, line.split())
            self._results[request_id] = returncode
            self._done[request_id].set()


# ---------------------------------------------------------------- the server process


def _serve() -> None:
    import select

    import cr_accel.cli  # noqa: F401  what train.py imports, and what it imports on the way to a config check
    import cr_accel.preflight  # noqa: F401
    import cr_accel.trainer  # noqa: F401

    children: dict[int, int] = {}  # pid -> request id
    print("ready", flush=True)
    open_input = True
    while open_input or children:
        readable, _, _ = select.select([sys.stdin] if open_input else [], [], [], 0.02)
        if readable:
            line = sys.stdin.readline()
            if not line:
                open_input = False
            else:
                request = json.loads(line)
                children[_fork_run(request)] = request["id"]
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print(children.pop(pid), os.waitstatus_to_exitcode(status), flush=True)


def _fork_run(request: dict) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = _run_train_py(request)
    finally:
        os._exit(code)


def _run_train_py(request: dict) -> int:
    """In the child: train.py as `python train.py ARGS` would run it; its exit code."""
    import atexit
    import runpy
    import traceback

    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(0)
    sys.argv = ["train.py", *request["args"]]
    sys.path[0] = str(ROOT)  # as for a script: its folder first
    code = 0
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    _serve()
