"""A signal that reaches ONE of two processes stops both at the same step, and the run resumes exactly.

A cluster does not always signal every process of a job (SLURM's `--signal` without `B:` goes to job steps,
an operator may `kill` one PID). Here a real `accelerate launch` pair (gloo on CPU) trains; the rank-1
process waits after optimizer step 2 until the test has sent a signal to its PID only (`--await-signal`,
so the moment is exact); the processes must agree through the all-reduce of the preemption flag, both
checkpoint step 3 (one step after the signal) and stop. Resuming with `--resume_from_checkpoint latest`
must then end with the weights of an uninterrupted 2-process run.
"""

import json
import os
import re
import signal

import pytest

from cr_accel import checkpoint
from cr_accel.preemption import PREEMPTED_EXIT_CODE, VOTE_EVERY
from tests.runners import (PROBE, assert_same_weights, child_pids, finish, kill_tree, launch_2_cpu_processes,
                           metric_rows, read_lines_until, resumed_from, root_cause_rank, small_config_file,
                           start_2_cpu_processes, worker_exit_codes)

SIGNAL_AFTER_STEP = 1  # rank 1 is signalled after this optimizer step, and both processes stop at the first
# vote decided after it: flags are posted one step before each decision, every VOTE_EVERY steps (preemption.py).
STOP_STEP = -(-(SIGNAL_AFTER_STEP + 1) // VOTE_EVERY) * VOTE_EVERY
STARTUP_TIMEOUT = 180  # seconds for `accelerate launch` to reach the step (4-6 s on an idle 2-core machine)
RUN_TIMEOUT = 180
# `accelerate launch` runs torchrun's agent, which reports any worker exit code other than 0 as a failure
# (ChildFailedError) and exits 1 itself: the trainers' 75 never reaches the caller (docs/slurm.md).
LAUNCHER_EXIT_AFTER_PREEMPTION = 1
# Once the first worker has exited, the agent SIGTERMs the other one; that one has passed the trainer's
# final barrier by then (its checkpoint and probe are written, its handlers uninstalled), so it exits with
# 75 or, when the SIGTERM arrives during interpreter shutdown, is killed by it (-15). Both were observed.
OTHER_WORKER_EXIT_CODES = (PREEMPTED_EXIT_CODE, -signal.SIGTERM)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """64 samples, batch 8, 2 processes -> 4 optimizer steps per epoch, 2 epochs; dropout on (RNG matters)."""
    return small_config_file(tmp_path_factory.mktemp("cfg"), "signals.yaml",
                             model={"dropout": 0.2, "base_channels": 4},
                             data={"num_train": 64, "num_val": 16, "batch_size": 8},
                             training={"epochs": 2, "log_every": 1}, scheduler={"warmup_steps": 2},
                             checkpoint={"save_every": 1, "keep_last_n": None})


@pytest.fixture(scope="module")
def straight(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = launch_2_cpu_processes(PROBE, "--config", config_file, "--probe", out / "p.json",
                                    f"output.dir={out / 'run'}", timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def launched():
    """Launchers started by a test; any still running at its end (a failed assertion) are killed."""
    procs = []
    yield procs
    for proc in procs:
        kill_tree(proc)


def wait_for_rank_1_to_await_the_signal(proc):
    """The worker PIDs (`PID <rank> <pid>` lines) up to rank 1's `AWAITING-SIGNAL <rank> <pid> <step>`."""
    pids = {}

    def seen(line):
        found = re.search(r"\bPID (\d+) (\d+)$", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
        return re.search(r"\bAWAITING-SIGNAL \d+ \d+ \d+$", line)

    awaiting = read_lines_until(proc, seen, timeout=STARTUP_TIMEOUT).split()[-3:]
    assert awaiting == ["1", str(pids.get(1)), str(SIGNAL_AFTER_STEP)], (awaiting, pids)
    assert sorted(pids) == [0, 1] and pids[0] != pids[1]
    # The PIDs are the launcher's own training processes (not, say, a stale process of another run).
    assert set(pids.values()) <= child_pids(proc.pid), (pids, child_pids(proc.pid))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(
        config_file, straight, tmp_path, launched, sig):
    run = f"output.dir={tmp_path / 'run'}"
    proc = start_2_cpu_processes(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                                 "--print-pid", "--await-signal", f"1:{SIGNAL_AFTER_STEP}")
    launched.append(proc)
    pids = wait_for_rank_1_to_await_the_signal(proc)
    os.kill(pids[1], sig)  # rank 1 only; rank 0 never gets a signal
    out, _ = finish(proc, timeout=RUN_TIMEOUT)

    assert proc.returncode == LAUNCHER_EXIT_AFTER_PREEMPTION, out[-4000:]
    codes = worker_exit_codes(out)
    first = root_cause_rank(out)
    assert sorted(codes) == [0, 1] and first in codes, out[-4000:]
    assert codes[first] == PREEMPTED_EXIT_CODE, codes
    assert codes[1 - first] in OTHER_WORKER_EXIT_CODES, codes

    # Each process records its own end: both preempted at the same step, only rank 1 was signalled.
    ranks = [json.loads((tmp_path / f"first.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == {"status": "preempted", "global_step": STOP_STEP, "signal": None}, ranks
    assert ranks[1] == {"status": "preempted", "global_step": STOP_STEP, "signal": sig.name}, ranks
    last = tmp_path / "run/checkpoints/last"
    checkpoint.verify(last)
    state = checkpoint.read_state(last)["trainer"]
    assert (state["world_size"], state["global_step"], state["epoch"], state["batch_in_epoch"]) == \
        (2, STOP_STEP, 0, STOP_STEP)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["last"]
    log = (tmp_path / "run/train.log").read_text()
    assert f"received: saving a checkpoint at step {STOP_STEP} (epoch 1, batch {STOP_STEP}) and stopping" in log

    resumed = launch_2_cpu_processes(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", run,
                                     "--resume_from_checkpoint", "latest", timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from((tmp_path / "run/train.log").read_text()) == [last]
    assert json.loads((tmp_path / "p.json").read_text())["status"] == "finished"
    assert_same_weights(straight / "p.safetensors", tmp_path / "p.safetensors")
    assert metric_rows(tmp_path / "run") == metric_rows(straight / "run")
