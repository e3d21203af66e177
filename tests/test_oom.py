"""Out of memory: one clear message and exit 1 with the last checkpoint intact; `training.auto_batch_size` finding
the largest micro-batch that fits, keeping the global batch, and keeping its choice across a resume.

The "device" is the CPU: `Greedy` raises torch.OutOfMemoryError itself, as CUDA would, for batches above its limit.
"""

import json
import sys

import pytest
import torch

from cr_accel import checkpoint
from cr_accel.auto_batch import candidates
from cr_accel.config import config_from_dict
from cr_accel.launch_exit import explained_failure
from cr_accel.oom import OutOfMemory
from cr_accel.trainer import Trainer
from tests.runners import assert_same_weights, metric_rows, run_1_process

TRAIN = ["train.py"]


class Greedy(torch.nn.Module):
    """An MLP (with dropout, so a probe that drew random numbers would show) that "runs out of memory" on
    training batches above `limit` once it has run `oom_after` training batches, and on batches without gradients
    (preflight, validation) above `val_limit`. `refused` counts the refusals in this process, over instances."""

    refused = 0

    def __init__(self, limit: int = 8, val_limit: int = 1_000_000, oom_after: int = 0):
        super().__init__()
        self.limit, self.val_limit, self.oom_after, self.calls = limit, val_limit, oom_after, 0
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled()
        if training:
            self.calls += 1
        too_big = len(x) > self.limit and self.calls > self.oom_after if training else len(x) > self.val_limit
        if too_big:
            type(self).refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.15 GiB of which 1.06 GiB is free.")
        return self.net(x)


def refusals():
    """Greedy.refused of the class the trainer builds (imported by its target, which may be another module object
    than this test file's)."""
    from cr_accel.models import MODELS

    return MODELS.resolve("tests.test_oom:Greedy").refused


def data_file(tmp_path, n):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "data.pt"
    torch.save({"inputs": torch.randn(n, 8, generator=g), "targets": torch.randn(n, 4, generator=g)}, path)
    return str(path)


def raw_config(tmp_path, n=80, out="run", model=None, **sections):
    """n samples, 80% train: 64 train / 16 val by default."""
    raw = {
        "model": {"name": "tests.test_oom:Greedy", **(model or {})},
        "loss": {"name": "mse"},
        "data": {"name": "tensor_files", "path": data_file(tmp_path, n), "batch_size": 32, "val_ratio": 0.2},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "scheduler": {"name": "cosine", "warmup_steps": 1},
        "training": {"epochs": 2, "log_every": 1},
        "checkpoint": {"save_every": 1, "keep_last_n": None},
        "output": {"dir": str(tmp_path / out), "samples_every": 0},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def test_oom_in_training_exits_1_with_one_line_and_the_last_checkpoint_intact(tmp_path):
    # 16 training samples in one batch of 16 (limit 8): epochs 1 and 2 run, the third batch runs out of memory.
    raw = raw_config(tmp_path, n=20, model={"oom_after": 2}, data={"batch_size": 16}, training={"epochs": 5})
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(raw))
    result = run_1_process(*TRAIN, "--config", config, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = errors[0]
    assert line.startswith("error: out of memory in training at a micro-batch of 16 (`data.batch_size=16`, "
                           "gradient accumulation 1); torch: Tried to allocate 2.00 GiB: "), line
    assert "this process peaked at" in line and "GiB resident" in line  # what the CPU can tell
    for fix in ("`data.batch_size=8 training.gradient_accumulation_steps=2`", "`training.auto_batch_size=true`",
                "`training.mixed_precision=bf16`", "activation checkpointing"):
        assert fix in line, fix
    last = tmp_path / "run" / "checkpoints" / "last"
    checkpoint.verify(last)  # complete and every hash right
    assert checkpoint.read_state(last)["trainer"]["global_step"] == 2
    # Nothing half-written beside them (a folder of the failed epoch, a temporary one).
    assert sorted(p.name for p in last.parent.iterdir()) == ["best", "last", "step_00000001", "step_00000002"]
    assert "training failed after 2 epochs" in (tmp_path / "run" / "train.log").read_text()


def test_oom_in_validation_names_the_validation_batch(tmp_path):
    raw = raw_config(tmp_path, model={"val_limit": 4}, data={"batch_size": 8, "val_batch_size": 16},
                     training={"epochs": 1})
    with pytest.raises(OutOfMemory, match=r"^out of memory in validation at a micro-batch of 16 "
                                          r"\(`data.val_batch_size`.*a smaller `data.val_batch_size` \(e.g. 8;"):
        Trainer(config_from_dict(raw)).train()


def test_candidates_halve_through_divisors_of_the_batch():
    assert candidates(32) == [32, 16, 8, 4, 2, 1]
    assert candidates(24) == [24, 12, 6, 3, 1]
    assert candidates(10) == [10, 5, 2, 1]
    assert candidates(1) == [1]


def auto_and_hand_runs(tmp_path):
    """One run at batch 32 with auto_batch_size, one configured by hand at batch 8 with accumulation 4."""
    auto = Trainer(config_from_dict(raw_config(tmp_path, out="auto", training={"auto_batch_size": True})))
    refused = refusals()
    auto.train()
    assert refusals() - refused == 2  # 32 and 16 refused by the probe; training never went above 8
    hand = Trainer(config_from_dict(raw_config(tmp_path, out="hand", data={"batch_size": 8},
                                               training={"gradient_accumulation_steps": 4})))
    hand.train()
    return auto, hand


def test_auto_batch_size_trains_like_the_run_configured_by_hand(tmp_path):
    auto, hand = auto_and_hand_runs(tmp_path)
    log = (tmp_path / "auto" / "train.log").read_text()
    assert ("auto_batch_size: micro-batches 32, 16 do not fit, using 8 with gradient_accumulation_steps 4 "
            "(global batch 32 kept)") in log
    assert (auto.micro_batch_size, auto.accumulation, auto.steps_per_epoch) == (8, 4, 2)
    # The probe drew no random numbers and changed no state, so the runs agree bit for bit (dropout included).
    rows = metric_rows(tmp_path / "auto")
    assert rows == metric_rows(tmp_path / "hand") and len(rows) == 2
    assert_same_weights(tmp_path / "auto/checkpoints/step_00000002/model.safetensors",
                        tmp_path / "hand/checkpoints/step_00000002/model.safetensors")
    assert_same_weights(tmp_path / "auto/checkpoints/last/model.safetensors",
                        tmp_path / "hand/checkpoints/last/model.safetensors")
    state = checkpoint.read_state(tmp_path / "auto" / "checkpoints" / "last")
    assert state["auto_batch_size"] == {"micro_batch_size": 8}
    assert state["trainer"]["gradient_accumulation_steps"] == 4


def test_a_resume_uses_the_stored_choice_without_searching(tmp_path):
    raw = raw_config(tmp_path, out="auto", training={"auto_batch_size": True},
                     checkpoint={"save_every_steps": 1, "keep_last_n": None})
    Trainer(config_from_dict(raw)).train()
    run = tmp_path / "auto"
    straight = tmp_path / "straight.safetensors"
    straight.write_bytes((run / "checkpoints" / "last" / "model.safetensors").read_bytes())
    # Step 1 is mid-epoch: 4 of the epoch's 8 micro-batches of 8 done (at 32 it would be 1 of 2).
    assert checkpoint.read_state(run / "checkpoints" / "step_00000001")["trainer"]["batch_in_epoch"] == 4
    refused = refusals()
    resumed = Trainer(config_from_dict(raw))
    resumed.train(resume_from_checkpoint=run / "checkpoints" / "step_00000001")
    assert refusals() == refused  # no probe, and no batch of 32 either
    assert (resumed.micro_batch_size, resumed.accumulation, resumed.global_step) == (8, 4, 4)
    assert (run / "train.log").read_text().count("do not fit, using 8") == 1  # the first run's search only
    assert_same_weights(straight, run / "checkpoints" / "last" / "model.safetensors")


def test_nothing_fits_stops_before_anything_is_written(tmp_path):
    raw = raw_config(tmp_path, model={"limit": 0}, training={"auto_batch_size": True})
    with pytest.raises(OutOfMemory, match="not even a micro-batch of 1 fits"):
        Trainer(config_from_dict(raw)).train()
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_launcher_says_an_explained_failure_once():
    records = [(1.0, 1, 1), (2.0, 0, 1)]
    assert explained_failure(records, {0: "out of memory", 1: "out of memory"}) == (True, None)  # rank 0 said it
    assert explained_failure(records, {1: "out of memory"}) == (True, "error: out of memory")
    assert explained_failure(records, {}) == (False, None)  # a crash: the traceback is shown
    assert explained_failure([(1.0, 0, 0)], {}) == (False, None)
