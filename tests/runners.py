"""Starting real training processes from tests: one process, or an `accelerate launch` pair on CPU."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "probe_train.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    # Scripts under tests/ would otherwise import the installed cr_accel, which may be another checkout's.
    return dict(env, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch_2_cpu_processes(script, *args, timeout=300):
    """The CPU recipe from ACCELERATE_NOTES: --cpu would start one process; this starts a gloo pair."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_1_process(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def start_1_process(script, *args):
    """A running process whose stdout can be read line by line (for signals at a chosen moment)."""
    return subprocess.Popen([sys.executable, "-u", str(script), *map(str, args)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
