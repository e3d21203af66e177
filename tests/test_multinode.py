"""Two "machines" on loopback: two `accelerate launch --num_machines 2` launchers of one process each,
side by side, sharing output.dir (as nodes share a file system). What a multi-node job needs: one rendezvous,
files written once (by the global main process), a stop that reaches both machines, and an exact resume.
"""

import json
import os
import re
import signal

import accelerate
import pytest
from packaging.version import Version

from cr_accel import checkpoint
from cr_accel.preemption import PREEMPTED_EXIT_CODE, VOTE_EVERY
from tests.runners import (PROBE, assert_same_weights, child_pids, finish, kill_tree, metric_rows, read_lines_until,
                           resumed_from, small_config_file, start_2_machines, worker_exit_codes)

STARTUP_TIMEOUT = 180
RUN_TIMEOUT = 180
SIGNAL_AFTER_STEP = 1  # and the stop comes at the first vote decided after it (preemption.py, VOTE_EVERY)
STOP_STEP = -(-(SIGNAL_AFTER_STEP + 1) // VOTE_EVERY) * VOTE_EVERY
# What `accelerate launch` exits with when it is signalled itself (commands/launch.py, _run_torchrun).
SIGNALLED_LAUNCHER_EXIT = 128 + signal.SIGTERM if Version(accelerate.__version__) >= Version("1.16") else 1


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """64 samples, batch 8, world size 2 -> 4 optimizer steps per epoch, 2 epochs; dropout on."""
    return small_config_file(tmp_path_factory.mktemp("cfg"), "multinode.yaml",
                             model={"dropout": 0.2, "base_channels": 4},
                             data={"num_train": 64, "num_val": 16, "batch_size": 8},
                             training={"epochs": 2, "log_every": 1}, scheduler={"warmup_steps": 2},
                             checkpoint={"save_every": 1, "keep_last_n": None})


def run_2_machines(*args):
    """Both launchers to their end; returns their exit codes and outputs (stdout and stderr merged)."""
    launchers = start_2_machines(PROBE, *args)
    try:
        outputs = [finish(proc, timeout=RUN_TIMEOUT)[0] for proc in launchers]
    finally:
        for proc in launchers:
            kill_tree(proc)
    return [proc.returncode for proc in launchers], outputs


@pytest.fixture(scope="module")
def straight(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    codes, outputs = run_2_machines("--config", config_file, "--probe", out / "p.json", f"output.dir={out / 'run'}")
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return out, outputs


def log_lines(run_dir):
    """train.log without its timestamps."""
    return [line.split(" ", 2)[2] for line in (run_dir / "train.log").read_text().splitlines() if line[:4].isdigit()]


def test_two_machines_train_as_one_run_and_only_the_global_main_process_writes(straight):
    out, (machine_0, machine_1) = straight
    env = json.loads((out / "run/environment.json").read_text())
    assert env["world_size"] == 2 and env["distributed_type"] == "DistributedType.MULTI_CPU"
    # Rank 1 is the local main process of machine 1: it prints progress there, but logs no file lines.
    lines = log_lines(out / "run")
    assert len(lines) == len(set(lines)), "duplicated log lines"
    assert sum(line.startswith("cr_accel run in") for line in lines) == 1
    assert "training finished after 2 epochs, 8 optimizer steps" in machine_0
    assert "training finished" not in machine_1 and "epoch 1 step 1/8" in machine_1
    rows = metric_rows(out / "run")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "4"), ("2", "8")]  # one row per epoch
    assert json.loads((out / "p.rank1.json").read_text()) == {"status": "finished", "global_step": 8, "signal": None}
    for name in ("last", "best", "step_00000004", "step_00000008"):
        manifest = checkpoint.verify(out / "run/checkpoints" / name)
        assert manifest["world_size"] == 2 and "random_states_1.pkl" in manifest["files"]


def test_sigterm_to_one_machines_launcher_stops_both_machines_and_resumes_exactly(config_file, straight, tmp_path):
    straight_out, _ = straight
    run = f"output.dir={tmp_path / 'run'}"
    launchers = start_2_machines(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                                 "--print-pid", "--await-signal", f"1:{SIGNAL_AFTER_STEP}")
    try:
        pid_line = read_lines_until(launchers[0], lambda line: re.search(r"\bPID 0 \d+$", line), STARTUP_TIMEOUT)
        worker_0 = int(pid_line.split()[-1])
        awaiting = read_lines_until(launchers[1], lambda line: re.search(r"\bAWAITING-SIGNAL 1 \d+ \d+$", line),
                                    STARTUP_TIMEOUT)
        worker_1 = int(awaiting.split()[-2])
        assert awaiting.split()[-1] == str(SIGNAL_AFTER_STEP)
        assert worker_0 in child_pids(launchers[0].pid) and worker_1 in child_pids(launchers[1].pid)
        # Machine 1's launcher, as a scheduler signals a node's task. torchrun's agent passes SIGTERM on to its
        # training process (after which it raises SignalException itself); machine 0 gets nothing.
        os.kill(launchers[1].pid, signal.SIGTERM)
        (out_0, _), (out_1, _) = [finish(proc, timeout=RUN_TIMEOUT) for proc in launchers]
    finally:
        for proc in launchers:
            kill_tree(proc)

    # Machine 0's launcher exits 1 because its trainer returned 75 (ChildFailedError); machine 1's was signalled
    # itself (SignalException), which accelerate >= 1.16 turns into 128 + SIGTERM, and earlier versions into a
    # traceback and 1. The trainers' 75 reaches neither caller (launch.sh and cr_accel.launch_exit pass it on).
    signalled = SIGNALLED_LAUNCHER_EXIT
    assert [proc.returncode for proc in launchers] == [1, signalled], out_0[-3000:] + out_1[-3000:]
    assert worker_exit_codes(out_0) == {0: PREEMPTED_EXIT_CODE}, out_0[-3000:]
    if signalled == 1:
        assert f"SignalException: Process {launchers[1].pid} got signal: {int(signal.SIGTERM)}" in out_1, out_1[-3000:]
    ranks = [json.loads((tmp_path / f"first.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == {"status": "preempted", "global_step": STOP_STEP, "signal": None}, ranks
    assert ranks[1] == {"status": "preempted", "global_step": STOP_STEP, "signal": "SIGTERM"}, ranks
    last = tmp_path / "run/checkpoints/last"
    state = checkpoint.read_state(last)["trainer"]
    assert (state["world_size"], state["global_step"], state["batch_in_epoch"]) == (2, STOP_STEP, STOP_STEP)
    assert sorted(checkpoint.verify(last)["files"]) == sorted(checkpoint.verify(
        straight_out / "run/checkpoints/last")["files"])  # rank 1's RNG state included

    codes, (again_0, again_1) = run_2_machines("--config", config_file, "--probe", tmp_path / "p.json", run,
                                               "--resume_from_checkpoint", "latest")
    assert codes == [0, 0], again_0[-3000:] + again_1[-3000:]
    log = (tmp_path / "run/train.log").read_text()
    assert resumed_from(log) == [last]
    assert log.count("cr_accel run in") == 2  # once per attempt, not once per machine
    assert log.count(f"received: saving a checkpoint at step {STOP_STEP}") == 1
    assert_same_weights(straight_out / "p.safetensors", tmp_path / "p.safetensors")
    assert metric_rows(tmp_path / "run") == metric_rows(straight_out / "run")  # one row per epoch, as straight
