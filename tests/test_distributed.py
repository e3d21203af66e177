"""Real multi-process runs: `accelerate launch` with 2 CPU processes (gloo), as a user would start them."""

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cr_accel import components
from cr_accel.config import load_config
from tests.runners import PROBE, ROOT, launch_2_cpu_processes, run_1_process


@pytest.fixture
def small_config(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["data"].update(num_train=64, num_val=37, batch_size=8, val_batch_size=8)  # 37: uneven over 2 ranks
    raw["training"].update(epochs=2, log_every=1)
    raw["scheduler"].update(warmup_steps=3)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def evaluate_single_process(config_path, overrides, weights):
    """The validation loss and PSNR of `weights`, computed by plain PyTorch in this one process."""
    cfg = load_config(config_path, overrides)
    model = components.build_model(cfg)
    model.load_state_dict(load_file(weights))
    model.eval()
    data = components.build_datasets(cfg)
    val = data.val
    loss_fn = components.build_loss(cfg)
    psnr = components.build_metrics(cfg, data.metadata)["psnr"]
    loss_sum = psnr_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(val), 5):
            inputs, targets = val[i:i + 5]
            outputs = model(inputs)
            loss_sum += float(loss_fn(outputs, targets)) * len(targets)
            psnr_sum += float(psnr(outputs, targets).sum())
    return loss_sum / len(val), psnr_sum / len(val)


def test_two_process_run_logs_once_and_validates_exactly(small_config, tmp_path):
    out = tmp_path / "run2"
    overrides = [f"output.dir={out}"]
    result = launch_2_cpu_processes(PROBE, "--config", str(small_config), "--probe", str(tmp_path / "p2.json"),
                                    *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads((tmp_path / "p2.json").read_text())
    assert probe["world_size"] == 2
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 2 and env["distributed_type"] == "DistributedType.MULTI_CPU"

    # One log, no line written twice (each process would duplicate every line).
    lines = [line.split(" ", 2)[2] for line in (out / "train.log").read_text().splitlines() if line[:4].isdigit()]
    assert len(lines) == len(set(lines)), "duplicated log lines"
    assert sum("| train_loss" in line for line in lines) == 2
    rows = read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # 64 samples / (2 processes x batch 8) = 4 optimizer steps per epoch
    assert [r["step"] for r in rows] == ["4", "8"]
    # A step record every step (log_every 1), written once; its loss is the mean over both processes'
    # micro-batches, so an epoch's train_loss is the mean of its 4 step records.
    steps = read_csv(out / "steps.csv")
    assert [r["step"] for r in steps] == [str(s) for s in range(1, 9)]
    assert [r["epoch"] for r in steps] == ["1"] * 4 + ["2"] * 4
    for epoch, row in enumerate(rows):
        losses = [float(r["loss"]) for r in steps[4 * epoch:4 * epoch + 4]]
        assert float(row["train_loss"]) == pytest.approx(sum(losses) / 4, rel=1e-6)

    val_loss, val_psnr = evaluate_single_process(small_config, overrides, tmp_path / "p2.safetensors")
    assert float(rows[-1]["val_loss"]) == pytest.approx(val_loss, abs=1e-6)
    assert float(rows[-1]["val_psnr"]) == pytest.approx(val_psnr, abs=1e-4)


def test_lr_per_step_is_the_same_for_2_processes_and_for_accumulation_2(small_config, tmp_path):
    # Same global batch of 16: 2 processes x 8, or 1 process x 8 x 2 accumulated micro-batches.
    two = launch_2_cpu_processes(PROBE, "--config", str(small_config), "--probe", str(tmp_path / "two.json"),
                                 f"output.dir={tmp_path / 'two'}", "training.epochs=3")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_1_process(PROBE, "--config", str(small_config), "--probe", str(tmp_path / "one.json"),
                        f"output.dir={tmp_path / 'one'}", "training.epochs=3",
                        "training.gradient_accumulation_steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    lrs_two = json.loads((tmp_path / "two.json").read_text())["lrs"]
    lrs_one = json.loads((tmp_path / "one.json").read_text())["lrs"]
    assert len(lrs_two) == 12  # 3 epochs x 4 optimizer steps
    assert lrs_one == lrs_two
    assert lrs_two[3] == pytest.approx(1e-3)  # peak right after the 3 warm-up steps
    assert lrs_two[-1] == pytest.approx(0.0)  # cosine down to min_lr_ratio 0 at the last step
    # The step records agree too: a step's loss is the mean of the same two micro-batches either way.
    steps_two, steps_one = read_csv(tmp_path / "two/steps.csv"), read_csv(tmp_path / "one/steps.csv")
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one] == [str(s) for s in range(1, 13)]
    assert [float(r["loss"]) for r in steps_two] == pytest.approx([float(r["loss"]) for r in steps_one], rel=1e-5)
