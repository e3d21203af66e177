"""Resume with another config: refused unless it changes nothing that matters, or --allow-config-change says
so; then the LR schedule goes on from where it was. Real `train.py` processes on a tiny config."""

import hashlib
import json
import math
import shutil

import pytest
import yaml

from cr_accel.config import config_from_dict
from cr_accel.config_diff import changed_keys, check_config, describe, is_harmless
from cr_accel.errors import CheckpointError
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from tests.runners import PROBE, ROOT, run_1_process, small_config_file

LR, MIN_RATIO, WARMUP = 0.001, 0.1, 2
STEPS_PER_EPOCH, EPOCHS, STOP = 3, 3, 5  # 48 samples, batch 8, accumulation 2; stopped after step 5


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return small_config_file(tmp_path_factory.mktemp("cfg"), "change.yaml",
                             model={"dropout": 0.2, "base_channels": 4},
                             data={"num_train": 48, "num_val": 12, "batch_size": 8}, optimizer={"lr": LR},
                             training={"epochs": EPOCHS, "gradient_accumulation_steps": 2, "log_every": 2},
                             scheduler={"warmup_steps": WARMUP, "min_lr_ratio": MIN_RATIO},
                             checkpoint={"save_every": 1, "keep_last_n": None})


@pytest.fixture(scope="module")
def stopped_run(config_file, tmp_path_factory):
    """A run preempted after optimizer step 5 (mid-epoch 2); its checkpoints/last is at step 5."""
    out = tmp_path_factory.mktemp("stopped")
    result = run_1_process(PROBE, "--config", config_file, "--probe", out / "first.json", f"output.dir={out / 'run'}",
                           "--stop-at-step", STOP)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    return out


def probe(config_file, out, *args):
    result = run_1_process(PROBE, "--config", config_file, "--probe", out / "p.json", f"output.dir={out / 'run'}",
                           *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "p.json").read_text())["lrs"], (out / "run/train.log").read_text()


def fingerprint(folder):
    """Every path under `folder` with its size, mtime and (files) sha256."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------- the LR curve, by hand


def cosine_factor(phase):
    return MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * phase))


def planned_factor(step, total):
    """The configured schedule of a run of `total` steps: linear warm-up, then cosine to MIN_RATIO."""
    if step < WARMUP:
        return (step + 1) / (WARMUP + 1)
    return cosine_factor((step - WARMUP) / (total - 1 - WARMUP))


def extended_factor(step, old_total, new_total, resumed_at):
    """After a resume at `resumed_at` that changes the length: the rest of the old cosine's phase, from where
    the resume step was (p0) to 1, spread evenly over the steps left in the new run."""
    p0 = (resumed_at - WARMUP) / (old_total - 1 - WARMUP)
    return cosine_factor(p0 + (1 - p0) * (step - resumed_at) / (new_total - 1 - resumed_at))


# ---------------------------------------------------------------- in process: which keys count


def test_only_keys_that_change_the_run_count():
    base = config_from_dict({"training": {"gradient_accumulation_steps": 2}}, check_components=False)
    then = base.to_dict()
    harmless = {"output": {"dir": "elsewhere", "log_file": "b.log", "trackers": ["tensorboard"]},
                "dashboard": {"enabled": True, "url": "http://h:1"}, "training": {"log_every": 7, "compile": True},
                "data": {"num_workers": 3, "persistent_workers": True, "prefetch_factor": 4, "pin_memory": True,
                         "val_batch_size": 5},
                "checkpoint": {"save_every": 2, "save_every_steps": 4, "keep_last_n": 1, "async_save": False}}
    changed = {"optimizer": {"lr": 0.002}, "model": {"dropout": 0.3},  # a builder kwarg the old config lacks
               "training": {"gradient_accumulation_steps": 1, "eval_every": 2}, "seed": 7}
    now = yaml.safe_load(yaml.safe_dump(then))
    for section, values in [*harmless.items(), *changed.items()]:
        if isinstance(values, dict):
            now[section].update(values)
        else:
            now[section] = values
    diff = changed_keys(then, config_from_dict(now, check_components=False).to_dict())
    assert {k for k, _, _ in diff if is_harmless(k)} == {f"{s}.{k}" for s, v in harmless.items() for k in v}
    assert describe([c for c in diff if not is_harmless(c[0])]) == [
        "model.dropout: (unset) -> 0.3", "optimizer.lr: 0.001 -> 0.002", "training.gradient_accumulation_steps: 2 -> 1",
        "training.eval_every: 1 -> 2", "seed: 42 -> 7"]
    # Defaults written out on one side only compare equal.
    assert changed_keys(then, config_from_dict({}, check_components=False).to_dict()) == [
        ("training.gradient_accumulation_steps", 2, 1)]

    cfg = config_from_dict(now, check_components=False)
    with pytest.raises(CheckpointError, match=r"(?s)in 5 key\(s\).*scales the accumulation by itself"):
        check_config("ckpt", base, cfg, allow=False)
    assert len(check_config("ckpt", base, cfg, allow=True)) == 5


# ---------------------------------------------------------------- real processes


def test_a_changed_lr_is_refused_and_nothing_is_touched(config_file, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run / "run", run)
    before = fingerprint(run)
    result = run_1_process(ROOT / "train.py", "--config", config_file, f"output.dir={run}", "optimizer.lr=0.002",
                           "training.gradient_accumulation_steps=1", "--resume_from_checkpoint", "latest")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "optimizer.lr: 0.001 -> 0.002" in result.stderr
    assert "training.gradient_accumulation_steps: 2 -> 1" in result.stderr  # every changed key is listed
    assert "--allow-config-change" in result.stderr
    assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr
    assert fingerprint(run) == before  # `latest` did not fall back to an older checkpoint either


def test_harmless_changes_pass(config_file, stopped_run, tmp_path):
    lrs, log = probe(config_file, tmp_path, "--resume_from_checkpoint", stopped_run / "run/checkpoints/last",
                     "training.log_every=1", "checkpoint.save_every=2", "checkpoint.keep_last_n=1",
                     "dashboard.url=http://127.0.0.1:1", "output.metrics_file=m.csv")  # and output.dir
    assert "resumed from" in log and "config change" not in log and "LR schedule" not in log
    total = EPOCHS * STEPS_PER_EPOCH
    assert lrs == pytest.approx([LR * planned_factor(s, total) for s in range(STOP, total)], rel=1e-12)


def test_allowed_lr_change_is_logged_and_takes_effect(config_file, stopped_run, tmp_path):
    lrs, log = probe(config_file, tmp_path, "--resume_from_checkpoint", stopped_run / "run/checkpoints/last",
                     "optimizer.lr=0.002", "--allow-config-change")
    assert log.count("config change allowed by --allow-config-change: optimizer.lr: 0.001 -> 0.002\n") == 1
    assert log.count("config change") == 1  # output.dir changed too, but it is harmless
    total = EPOCHS * STEPS_PER_EPOCH
    assert lrs == pytest.approx([0.002 * planned_factor(s, total) for s in range(STOP, total)], rel=1e-12)


def test_more_epochs_continue_the_lr_curve_without_a_jump(config_file, stopped_run, tmp_path):
    old_total, new_total = EPOCHS * STEPS_PER_EPOCH, 2 * EPOCHS * STEPS_PER_EPOCH  # 9 -> 18 optimizer steps
    # Extended, stopped again after step 11, and resumed once more: the second resume (whose config now is
    # the checkpoint's) must follow the same curve, so the re-timing travels in the schedule's state.
    extend = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "a.json",
                           f"output.dir={tmp_path / 'run'}", "training.epochs=6", "--allow-config-change",
                           "--resume_from_checkpoint", stopped_run / "run/checkpoints/last", "--stop-at-step", 11)
    assert extend.returncode == PREEMPTED_EXIT_CODE, extend.stderr[-3000:]
    rest, log = probe(config_file, tmp_path, "--resume_from_checkpoint", "latest", "training.epochs=6")
    after = json.loads((tmp_path / "a.json").read_text())["lrs"] + rest
    before = json.loads((stopped_run / "first.json").read_text())["lrs"]
    assert "config change allowed by --allow-config-change: training.epochs: 3 -> 6" in log
    assert log.count("LR schedule: the run has 18 optimizer steps now, 9 when") == 1  # the first resume only
    assert len(before) == STOP and len(after) == new_total - STOP

    assert before == pytest.approx([LR * planned_factor(s, old_total) for s in range(STOP)], rel=1e-12)
    expected = [LR * extended_factor(s, old_total, new_total, STOP) for s in range(STOP, new_total)]
    assert after == pytest.approx(expected, rel=1e-12)
    # The resume step keeps the old schedule's LR: the last LR before it minus one ordinary step's decrement.
    decrement = planned_factor(STOP, old_total) - planned_factor(STOP - 1, old_total)
    assert after[0] - before[-1] == pytest.approx(LR * decrement)
    assert all(b <= a for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(MIN_RATIO * LR, rel=1e-12)

    # No jump, with a bound derived, not tuned: a step that moves the cosine's phase by d around phase x
    # changes the LR by LR(1-m)·sin(πx)·sin(πd/2). Before the resume d = 1/(9-1-2); the last decay step
    # before it (steps 3 -> 4) is centred at x = p0 - 1.5d. After it, d' = (1-p0)/(18-1-5) and sin(πx) <= 1.
    # So every change after the resume is at most sin(πd'/2) / (sin(πx)·sin(πd/2)) times that last change,
    # hence times the largest change before the resume (warm-up excluded).
    d = 1 / (old_total - 1 - WARMUP)
    p0 = (STOP - WARMUP) * d
    d_new = (1 - p0) / (new_total - 1 - STOP)
    factor = math.sin(math.pi * d_new / 2) / (math.sin(math.pi * (p0 - 1.5 * d)) * math.sin(math.pi * d / 2))
    largest_before = max(abs(b - a) for a, b in zip(before[WARMUP:], before[WARMUP + 1:]))
    assert factor < 1
    assert max(abs(b - a) for a, b in zip(after, after[1:])) <= factor * largest_before * (1 + 1e-9)
