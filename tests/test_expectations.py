"""Expectations written out by hand, never computed by the code under test.

A test that compares the written config.yaml with `Config.to_dict()`, or checks only a schedule's end points,
passes when to_dict drops a section or when cosine turns linear: the code checks itself. Here the expected
values are literals or short formulas copied from the documentation:
- the resolved config of configs/default.yaml, every section and key, against what `python train.py`
  writes into output.dir/config.yaml and against `Config.to_dict`;
- the LR of every optimizer step of short cosine / linear / constant runs (tests/probe_train.py), against
  the formula in cr_accel/schedule.py's docstring, and at a few interior steps against numbers worked out
  by hand;
- PSNR and accuracy of small literal tensors against hand-computed values;
- the test environment itself: launcher variables removed, the CPU pinned in process and in subprocesses.
"""

import dataclasses
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cr_accel.config import Config, load_config, parse_yaml
from cr_accel.metrics import METRICS, accuracy, psnr
from tests.runners import PROBE, ROOT, clean_env, run_1_process

DEFAULT = ROOT / "configs" / "default.yaml"

# ---------------------------------------------------------------------------------------------------------
# 1. The resolved default config, written out by hand. When a key is added to the config, add it here too:
#    this literal is the documentation of what a run records, checked against the code.

DEFAULT_RESOLVED = {
    "model": {"name": "conv_autoencoder", "in_channels": 1, "out_channels": 1, "base_channels": 8, "depth": 2},
    "loss": {"name": "mse"},
    "data": {"name": "synthetic_cr", "batch_size": 32, "val_batch_size": None, "num_workers": 0,
             "persistent_workers": False, "prefetch_factor": None, "pin_memory": None, "normalize": None, "val_sets": {}, "num_train": 256, "num_val": 64},
    "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.005},
    "scheduler": {"name": "cosine", "warmup_ratio": 0.05, "warmup_steps": None, "min_lr_ratio": 0.0,
                  "interval": None},
    "training": {"epochs": 300, "max_steps": None, "gradient_accumulation_steps": 1, "auto_batch_size": False,
                 "grad_clip": 1.0,
                 "use_amp": True, "mixed_precision": None, "eval_every": 1, "eval_every_steps": None, "log_every": 50,
                 "ema_decay": None, "ema_start_step": 0, "ema_every": 1,
                 "early_stopping_patience": None, "early_stopping_min_delta": 0.0, "skip_nonfinite": False,
                 "deterministic": False, "metrics": ["psnr"], "compile": False},
    "checkpoint": {"save_every": 10, "save_every_steps": None, "keep_last_n": 3, "monitor": "val_loss",
                   "mode": "min", "async_save": True},
    "output": {"dir": "runs/default", "log_file": "train.log", "metrics_file": "metrics.csv", "steps_file": "steps.csv",
               "trackers": [], "samples_every": 1, "histograms_every": 10},
    "dashboard": {"enabled": True, "url": "http://127.0.0.1:8765", "token": None},
    "seed": 42,
    "stages": [],
}


def typed(value):
    """`value` with every leaf paired with its type: 1 and 1.0, or True and 1, do not compare equal."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def with_changes(base, **changes):
    """A copy of `base` with `section__key=value` changes."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        out[section][key] = value
    return out


def test_literal_covers_every_section_and_key_of_the_config():
    """The literal above is complete: a section or key added to Config must be added to it."""
    for f in dataclasses.fields(Config):
        assert f.name in DEFAULT_RESOLVED, f"section `{f.name}` is missing from DEFAULT_RESOLVED"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys = {g.name for g in dataclasses.fields(f.default_factory) if g.name != "kwargs"}
            missing = keys - set(DEFAULT_RESOLVED[f.name])
            assert not missing, f"keys of `{f.name}` missing from DEFAULT_RESOLVED: {sorted(missing)}"
    assert set(DEFAULT_RESOLVED) == {f.name for f in dataclasses.fields(Config)}


def test_to_dict_of_the_default_config_is_the_literal(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert typed(load_config(DEFAULT).to_dict()) == typed(DEFAULT_RESOLVED)


def test_train_py_writes_the_literal_resolved_config(tmp_path, run_train, monkeypatch):
    out = tmp_path / "run"
    rc, stdout, stderr = run_train("--config", DEFAULT, "training.epochs=1", f"output.dir={out}")
    assert rc == 0, stderr[-3000:]
    expected = with_changes(DEFAULT_RESOLVED, training__epochs=1, output__dir=str(out))
    written = parse_yaml((out / "config.yaml").read_text())
    assert typed(written) == typed(expected)
    monkeypatch.chdir(ROOT)
    assert typed(load_config(DEFAULT, ["training.epochs=1", f"output.dir={out}"]).to_dict()) == typed(expected)
    assert typed(load_config(out / "config.yaml").to_dict()) == typed(expected)  # fed back, the same run


# ---------------------------------------------------------------------------------------------------------
# 2. The LR of every optimizer step, from the documented formula (cr_accel/schedule.py's docstring, README
#    "scheduler"): warm-up (s + 1) / (W + 1) for s < W, the peak at s = W; then with p = (s - W) / (T - 1 - W)
#    cosine m + (1 - m) * (1 + cos(pi * p)) / 2, linear 1 - (1 - m) * p, constant 1; lr * factor.

LR, MIN_LR_RATIO = 1e-3, 0.1
# 48 training samples / batch 4 = 12 optimizer steps per epoch, 2 epochs: T = 24 steps, W = 3 warm-up steps
# (cosine by warmup_ratio 0.125 * 24 = 3, the others by warmup_steps).
STEPS, WARMUP = 24, 3
SHORT_RUN = ("training.epochs=2", "data.num_train=48", "data.num_val=16", "data.batch_size=4",
             f"optimizer.lr={LR}", f"scheduler.min_lr_ratio={MIN_LR_RATIO}", "training.log_every=1000")
SCHEDULE_RUNS = {
    "cosine": ("scheduler.name=cosine", "scheduler.warmup_ratio=0.125"),
    "linear": ("scheduler.name=linear", f"scheduler.warmup_steps={WARMUP}"),
    "constant": ("scheduler.name=constant", f"scheduler.warmup_steps={WARMUP}"),
}


def expected_factor(name, s, total=STEPS, warmup=WARMUP, m=MIN_LR_RATIO):
    if s < warmup:
        return (s + 1) / (warmup + 1)
    p = (s - warmup) / (total - 1 - warmup)
    return {"cosine": m + (1 - m) * (1 + math.cos(math.pi * p)) / 2,
            "linear": 1 - (1 - m) * p,
            "constant": 1.0}[name]


# Worked out by hand (T = 24, W = 3, m = 0.1; p = 1/4, 1/2, 3/4 at steps 8, 13, 18; cos(pi/4) = 0.70710678...).
HAND_LRS = {
    "cosine": {0: 0.25e-3, 1: 0.5e-3, 2: 0.75e-3, 3: 1e-3, 8: 0.868198051533946e-3, 13: 0.55e-3,
               18: 0.231801948466054e-3, 23: 0.1e-3},
    "linear": {0: 0.25e-3, 3: 1e-3, 8: 0.775e-3, 13: 0.55e-3, 18: 0.325e-3, 23: 0.1e-3},
    "constant": {0: 0.25e-3, 2: 0.75e-3, 3: 1e-3, 13: 1e-3, 23: 1e-3},
}


@pytest.fixture(scope="module")
def schedule_probes(tmp_path_factory):
    """{schedule name: probe record} of the three short runs, two at a time."""
    root = tmp_path_factory.mktemp("schedules")

    def run(name):
        probe = root / name / "probe.json"
        probe.parent.mkdir()
        result = run_1_process(PROBE, "--config", DEFAULT, "--probe", probe, *SHORT_RUN, *SCHEDULE_RUNS[name],
                               f"output.dir={root / name / 'run'}", timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(probe.read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCHEDULE_RUNS, pool.map(run, SCHEDULE_RUNS)))


@pytest.mark.parametrize("name", sorted(SCHEDULE_RUNS))
def test_lr_at_every_step_follows_the_documented_formula(name, schedule_probes):
    record = schedule_probes[name]
    assert record["status"] == "finished" and record["global_step"] == STEPS
    lrs = record["lrs"]
    assert len(lrs) == STEPS
    expected = [LR * expected_factor(name, s) for s in range(STEPS)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", sorted(SCHEDULE_RUNS))
def test_lr_at_interior_steps_matches_numbers_worked_out_by_hand(name, schedule_probes):
    lrs = schedule_probes[name]["lrs"]
    assert {s: lrs[s] for s in HAND_LRS[name]} == pytest.approx(HAND_LRS[name], rel=1e-9)


def test_hand_numbers_agree_with_the_formula():
    """The two independent statements of the expectation agree with each other."""
    for name, points in HAND_LRS.items():
        for s, lr in points.items():
            assert LR * expected_factor(name, s) == pytest.approx(lr, rel=1e-12), (name, s)


# ---------------------------------------------------------------------------------------------------------
# 3. Metrics on literal tensors: PSNR = 10 log10(data_range^2 / MSE) per sample, the MSE over all pixels;
#    accuracy 1.0 where the arg-max class is the target.


def test_psnr_of_known_errors():
    targets = torch.tensor([
        [[[0.1, 0.1], [0.1, 0.1]]],   # every pixel off by 0.1: MSE 0.01 -> 20 dB
        [[[0.2, 0.0], [0.0, 0.0]]],   # one pixel off by 0.2: MSE 0.04 / 4 = 0.01 -> 20 dB (a mean, not a sum)
        [[[0.01, 0.01], [0.01, 0.01]]],  # MSE 1e-4 -> 40 dB
        [[[0.0, 0.0], [0.0, 0.0]]],   # a perfect match: capped at 100 dB (MSE floored at 1e-10)
    ])
    outputs = torch.zeros_like(targets)
    assert psnr(outputs, targets).tolist() == pytest.approx([20.0, 20.0, 40.0, 100.0], rel=1e-5)
    # data_range 2: 10 log10(4 / 0.01) = 10 log10(400) = 26.0206 dB
    assert psnr(outputs[:1], targets[:1], data_range=2.0).tolist() == pytest.approx([26.020599913279625], rel=1e-5)
    assert METRICS.resolve("psnr") is psnr


def test_accuracy_of_known_predictions():
    logits = torch.tensor([[2.0, 1.0, 0.0],    # predicts 0
                           [0.0, 3.0, 1.0],    # predicts 1
                           [1.0, 0.0, 5.0],    # predicts 2
                           [4.0, 0.0, 0.0],    # predicts 0
                           [0.1, 0.2, 0.3]])   # predicts 2
    targets = torch.tensor([0, 2, 2, 1, 2])
    assert accuracy(logits, targets).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # 3 of 5
    assert accuracy(logits, targets).mean().item() == pytest.approx(0.6)
    assert METRICS.resolve("accuracy") is accuracy


# ---------------------------------------------------------------------------------------------------------
# 4. The test environment: what an outer launcher set is removed, the CPU is pinned everywhere.

OUTER_LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def test_clean_env_removes_launcher_variables_and_pins_cpu_and_threads(monkeypatch):
    from conftest import cli_env

    for var in OUTER_LAUNCHER_VARS:
        monkeypatch.setenv(var, "7")
    for env in (clean_env(), cli_env()):
        assert not OUTER_LAUNCHER_VARS & set(env)
        assert env["ACCELERATE_USE_CPU"] == "1" and env["OMP_NUM_THREADS"] == "1"
        assert env["PYTHONPATH"] == str(ROOT)
    assert clean_env(OMP_NUM_THREADS="2")["OMP_NUM_THREADS"] == "2"


def test_in_process_tests_run_on_the_cpu():
    from accelerate import Accelerator

    from cr_accel.config import cuda_available

    assert os.environ["ACCELERATE_USE_CPU"] == "1"  # the autouse fixture, on every machine
    assert not cuda_available()
    assert Accelerator().device.type == "cpu"
