"""Elastic resume: a checkpoint written by N processes continues on M, keeping the global batch.

Real `accelerate launch` pairs (gloo on CPU) and single processes, stopped by SIGTERM mid-epoch."""

import json

import pytest
from safetensors.torch import load_file

from cr_accel import checkpoint
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from tests.runners import (PROBE, ROOT, launch_2_cpu_processes, root_cause_rank, run_1_process, small_config_file,
                           worker_exit_codes)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """48 samples, batch 8: 6 batches an epoch, which 1 and 2 processes split evenly; no dropout (the RNG
    streams are re-derived on another world size, so dropout masks would differ)."""
    return small_config_file(tmp_path_factory.mktemp("cfg"), "elastic.yaml",
                             model={"dropout": 0.0, "base_channels": 4},
                             data={"num_train": 48, "num_val": 12, "batch_size": 8},
                             training={"epochs": 3, "log_every": 1}, scheduler={"warmup_steps": 2},
                             checkpoint={"save_every": 1, "keep_last_n": None})


def launch(processes, *args):
    runner = launch_2_cpu_processes if processes == 2 else run_1_process
    return runner(PROBE, *args)


def assert_close_weights(a, b, tol=1e-4):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"largest parameter difference {worst:.3g}"
    return worst


@pytest.mark.parametrize("before, after, accumulation", [(2, 1, 1), (1, 2, 2)], ids=["2->1", "1->2"])
def test_resume_on_another_number_of_processes_keeps_the_run(config_file, tmp_path, before, after, accumulation):
    common = ["--config", config_file, f"training.gradient_accumulation_steps={accumulation}"]
    straight = launch(before, *common, "--probe", tmp_path / "s/p.json", f"output.dir={tmp_path / 's/run'}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = f"output.dir={tmp_path / 'r/run'}"
    first = launch(before, *common, "--probe", tmp_path / "r/first.json", run, "--stop-at-step", 4)
    assert json.loads((tmp_path / "r/first.json").read_text())["status"] == "preempted", first.stderr[-3000:]
    if before == 1:
        assert first.returncode == PREEMPTED_EXIT_CODE
    saved = checkpoint.read_state(tmp_path / "r/run/checkpoints/last")["trainer"]
    assert saved["world_size"] == before and saved["batch_in_epoch"] > 0  # mid-epoch

    second = launch(after, *common, "--probe", tmp_path / "r/p.json", run, "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    log = (tmp_path / "r/run/train.log").read_text()
    new_accumulation = accumulation * before // after
    assert (f"this run has {after}: gradient_accumulation_steps {accumulation} -> {new_accumulation} keeps the "
            f"global batch") in log
    expected_batch = saved["batch_in_epoch"] * before // after
    assert f"resumed from {tmp_path / 'r/run/checkpoints/last'}: epoch 2, batch {expected_batch}, step" in log
    probe = json.loads((tmp_path / "r/p.json").read_text())
    assert probe["world_size"] == after and probe["global_step"] == 9  # the same 3 steps per epoch
    straight_lrs = json.loads((tmp_path / "s/p.json").read_text())["lrs"]
    assert probe["lrs"] == straight_lrs[-len(probe["lrs"]):]  # the LR schedule goes on unchanged
    assert_close_weights(tmp_path / "s/p.safetensors", tmp_path / "r/p.safetensors")
    final = checkpoint.read_state(tmp_path / "r/run/checkpoints/last")["trainer"]
    assert (final["world_size"], final["gradient_accumulation_steps"]) == (after, new_accumulation)


def test_a_global_batch_the_new_processes_cannot_split_is_refused(config_file, tmp_path):
    run = f"output.dir={tmp_path / 'run'}"
    first = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                          "training.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    listing = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    log_before = (tmp_path / "run/train.log").read_text()
    refused = launch_2_cpu_processes(ROOT / "train.py", "--config", config_file, run, "training.epochs=2",
                                     "--resume_from_checkpoint", tmp_path / "run/checkpoints/last")
    # The first process to end exits 2; torchrun's agent then stops the other one (it may not get to exit 2).
    codes = worker_exit_codes(refused.stderr)
    assert refused.returncode != 0 and codes[root_cause_rank(refused.stderr)] == 2, codes
    message = "written by 1 process(es) with gradient_accumulation_steps=1 (1 micro-batches per optimizer step)"
    assert message in refused.stderr and "Resume with 1 process(es)" in refused.stderr
    assert refused.stderr.count("error: ") == 1  # said once, by the main process
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == listing
    assert (tmp_path / "run/train.log").read_text() == log_before
