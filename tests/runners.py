"""Starting real training processes from tests: one process, or an `accelerate launch` pair on CPU.

Running processes (Popen) are read with `read_lines_until` and ended with `finish`: both have an overall
timeout and fail the test with the output so far, so a run that hangs never blocks the suite.
"""

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "probe_train.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set by an outer `accelerate launch`/torchrun for its ranks: inherited, they would turn a test's process into
# a rank of someone else's job.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra):
    """The environment of every process a test starts (train.py, probe scripts, launchers, servers).

    - the outer launcher's variables (LAUNCHER_VARS) removed;
    - ACCELERATE_USE_CPU=1: "this run has no GPU" is true on every machine, so CPU-only expectations
      (fp16 refused, precision `no`, device cpu, bitwise resume) hold on a GPU box too;
    - OMP_NUM_THREADS=1: each process computes with one thread whatever the machine's core count, and a
      pair of processes does not oversubscribe a 2-core machine;
    - PYTHONPATH=the repo root: scripts import this checkout's cr_accel (not whichever one is installed),
      and `tests.*` / `examples.*` targets named in configs.
    `extra` is set last. (Not called test_env: pytest would collect it in every module that imports it.)
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


_env = clean_env  # the earlier private name


def example_data_script():
    """scripts/make_example_data.py as a module (scripts/ is not a package): `write_example_data(out)`,
    `FILES`, `DEFAULT_OUT`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_example_data", ROOT / "scripts" / "make_example_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_2_cpu_processes(script, *args, timeout=300):
    """The CPU recipe from ACCELERATE_NOTES: --cpu would start one process; this starts a gloo pair."""
    return subprocess.run(_launch_cmd(script, args), cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def _launch_cmd(script, args, port=None, num_machines=1, machine_rank=0, distribution=("--multi_gpu",)):
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", *distribution, "--num_processes", "2", "--num_machines", str(num_machines),
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
    if num_machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return [*cmd, str(script), *map(str, args)]


def launch_fsdp2_on_cpu(state_dict_type, script, *args, timeout=300):
    """`accelerate launch --use_fsdp --fsdp_version 2` of a gloo pair running `script` as FSDP2 on the CPU
    (tests/fsdp_on_cpu.py); `state_dict_type` is SHARDED_STATE_DICT or FULL_STATE_DICT."""
    distribution = ("--use_fsdp", "--fsdp_version", "2", "--fsdp_state_dict_type", state_dict_type)
    cmd = _launch_cmd(ROOT / "tests" / "fsdp_on_cpu.py", (script, *args), distribution=distribution)
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def _start(cmd, **popen):
    """A process in its own session (so `kill_tree` can end it and everything it started), stdout read
    line by line. Not PYTHONUNBUFFERED: unbuffered, print() writes a line and its newline in two calls, and
    another training process on the same pipe can land between them; flushed buffers hold whole lines."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)
    proc.own_group = True
    _drains(proc)  # read from the start: a full pipe would stall the launcher
    return proc


def start_2_cpu_processes(script, *args):
    """`accelerate launch` of a gloo pair, running; stdout and stderr come merged on `proc.stdout`."""
    return _start(_launch_cmd(script, args), stderr=subprocess.STDOUT)


def start_2_machines(script, *args):
    """Two `accelerate launch` "machines" of one process each on loopback (machine ranks 0 and 1, one
    rendezvous port), running side by side; returns the two launchers, stdout and stderr merged."""
    port = free_port()
    return [_start(_launch_cmd(script, args, port=port, num_machines=2, machine_rank=rank), stderr=subprocess.STDOUT)
            for rank in (0, 1)]


def run_1_process(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def start_1_process(script, *args):
    """A running process whose stdout can be read line by line (for signals at a chosen moment)."""
    return subprocess.Popen([sys.executable, "-u", str(script), *map(str, args)], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- reading running processes


class _Drain:
    """Reads a stream to its end in a thread: every line is kept, and queued for `read_lines_until`."""

    def __init__(self, stream):
        self.lines = []
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream):
        for line in stream:
            self.lines.append(line)
            self.queue.put(line)
        self.queue.put(None)  # end of the stream

    def text(self):
        return "".join(self.lines)


def _drains(proc):
    """The drains of proc's stdout and stderr (started once; stderr is drained too so it never fills up)."""
    if not hasattr(proc, "_drains"):
        proc._drains = [_Drain(s) if s is not None else None for s in (proc.stdout, proc.stderr)]
    return proc._drains


def output_so_far(proc):
    out, err = _drains(proc)
    return out.text() + (f"\n--- stderr ---\n{err.text()}" if err is not None else "")


def kill_tree(proc):
    """SIGKILL proc and, when it has its own session (`_start`), every process it started."""
    try:
        if getattr(proc, "own_group", False):
            os.killpg(proc.pid, signal.SIGKILL)  # also the training processes a launcher started
        elif proc.poll() is None:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _fail(proc, message):
    import pytest

    kill_tree(proc)
    for d in _drains(proc):
        if d is not None:
            d.thread.join(timeout=10)
    pytest.fail(f"{message}\n--- output so far (last 6000 characters) ---\n{output_so_far(proc)[-6000:]}")


def read_lines_until(proc, predicate, timeout):
    """The next line of proc's stdout for which predicate(line) is true. The test fails (and the process is
    killed) when none comes within `timeout` seconds or the output ends first; the message shows the output."""
    out = _drains(proc)[0]
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = out.queue.get(timeout=max(remaining, 0)) if remaining > 0 else out.queue.get_nowait()
        except queue.Empty:
            _fail(proc, f"no matching line within {timeout} s")
        if line is None:
            out.queue.put(None)  # later calls see the end too
            _fail(proc, f"the output ended (exit code {proc.wait()}) before a matching line")
        if predicate(line):
            return line


def finish(proc, timeout):
    """Wait for proc to exit (at most `timeout` s, else the test fails); returns (stdout, stderr) as text
    (stderr is '' when it was not a pipe of its own)."""
    drains = _drains(proc)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _fail(proc, f"the process did not exit within {timeout} s")
    for d in drains:
        if d is not None:
            d.thread.join(timeout=30)
    out, err = drains
    return out.text(), err.text() if err is not None else ""


def child_pids(pid):
    """The direct children of `pid`, from /proc (children of every thread of it)."""
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return children


# ---------------------------------------------------------------- what the processes left behind


def resumed_from(log_text):
    """The checkpoint folders named by the trainer's `resumed from <path>: ...` log lines, in order."""
    return [Path(m) for m in re.findall(r"resumed from (.+?): epoch \d+, batch \d+, step \d+$", log_text, re.M)]


def worker_exit_codes(launcher_output):
    """{global rank: exit code} of the failed training processes that torchrun's agent reports (the
    ChildFailedError summary `accelerate launch` prints); "Root Cause" is listed as well as "Failures"."""
    found = re.findall(r"^\s*rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", launcher_output, re.M)
    return {int(rank): int(code) for rank, code in found}


def root_cause_rank(launcher_output):
    """The global rank the agent names as the first process to fail."""
    m = re.search(r"Root Cause \(first observed failure\):.*?^\s*rank\s*: (\d+)", launcher_output, re.M | re.S)
    return int(m.group(1)) if m else None


def newest_checkpoints(ckpts, exclude=()):
    """The complete checkpoint folders under `ckpts` that hold the highest global step (read from each one's
    trainer_state.json). One save published under several names (step_N/, last/, best/) ties: any of them is
    "the newest", except that last/ comes first among equals. Call it before the resume changes the folders."""
    from cr_accel import checkpoint

    steps = {}
    for path in ckpts.iterdir():
        if path.name in exclude or path.name.startswith(".") or not checkpoint.is_complete(path):
            continue
        steps[path] = checkpoint.read_state(path)["trainer"]["global_step"]
    top = max(steps.values())
    newest = {p for p, s in steps.items() if s == top}
    return {ckpts / "last"} if ckpts / "last" in newest else newest


# Columns that measure the machine (time, memory): they differ between any two runs.
MEASURED = ("samples_per_s", "epoch_time", "cpu_rss_mb", "gpu_mem_allocated_mb", "gpu_mem_reserved_mb", "peak_mem_mb")


def metric_rows(run_dir, file="metrics.csv"):
    """metrics.csv as dicts, without the columns that measure the machine."""
    import csv

    with open(Path(run_dir) / file, newline="") as f:
        return [{k: v for k, v in r.items() if k not in MEASURED} for r in csv.DictReader(f)]


def assert_same_weights(file_a, file_b):
    """Two safetensors files hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def small_config_file(folder, name, **sections):
    """configs/default.yaml with each named section's keys updated (e.g. `data={"num_train": 48}`), written
    to folder/name: the short runs the process-level tests launch."""
    import yaml

    from cr_accel.config import parse_yaml

    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(raw))
    return path


def own_data_config(folder, data, model=None, training=None):
    """configs/default.yaml turned into a short run on the user's own data, written to folder/config.yaml: the
    `data` section's synthetic keys replaced by `data`, a small model (`model` updates it), 2 epochs logging every
    step (`training` updates them), a checkpoint every epoch and all kept, output in folder/run, no pictures and no
    dashboard."""
    import yaml

    from cr_accel.config import parse_yaml

    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4, **(model or {}))
    for key in ("num_train", "num_val"):
        raw["data"].pop(key)
    raw["data"].update(data)
    raw["training"].update({"epochs": 2, "log_every": 1, "eval_every": 1, **(training or {})})
    raw["checkpoint"].update(save_every=1, keep_last_n=None)
    raw["output"].update(dir=str(Path(folder) / "run"), samples_every=0)
    raw["dashboard"]["enabled"] = False
    path = Path(folder) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path
