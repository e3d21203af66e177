"""What a run records, through the one metrics path (cr_accel/sinks): step records in steps.csv every
`log_every` optimizer steps, loss terms per step and per epoch, values a callback logs, memory, the pictures of
validation, and TensorBoard read back with its own reader -- also across a crash and a resume."""

import csv
import math
import time
from pathlib import Path

import pytest
import torch

from cr_accel.callbacks import Callback, TrainingState
from cr_accel.config import config_from_dict
from cr_accel.trainer import Trainer
from tests.runners import metric_rows

# 48 samples, batch 8: 6 optimizer steps an epoch, 3 epochs; a step record every 2 steps.
STEPS_PER_EPOCH, EPOCHS, LOG_EVERY = 6, 3, 2


def config(out, **sections):
    raw = {
        "model": {"name": "conv_autoencoder", "base_channels": 4, "depth": 1, "dropout": 0.1},
        "loss": {"name": "weighted", "terms": {"mse": 1.0, "l1": 0.5}},
        "data": {"name": "synthetic_cr", "batch_size": 8, "num_train": 48, "num_val": 12},
        "training": {"epochs": EPOCHS, "log_every": LOG_EVERY, "metrics": ["psnr"]},
        "checkpoint": {"save_every": 1, "save_every_steps": 3, "keep_last_n": None, "async_save": False},
        "output": {"dir": str(out), "trackers": ["tensorboard"], "histograms_every": 2},
    }
    for name, values in sections.items():
        if name == "loss":
            raw["loss"] = values  # another loss: its own options only
        else:
            raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Logs(Callback):
    """A user's callback: its own values through trainer.log, and what the hooks were given."""

    def __init__(self):
        self.step_states, self.epoch_states = [], []

    def on_step_end(self, trainer, state):
        self.step_states.append(state)
        if state.step % LOG_EVERY == 0:
            trainer.log({"my_step_value": state.step * 10})

    def on_validation_end(self, trainer, metrics):
        trainer.log({"my_epoch_value": trainer.epoch + 100})

    def on_epoch_end(self, trainer, state):
        self.epoch_states.append(state)


class Crash(Exception):
    pass


class CrashAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, state):
        if state.step == self.step:
            raise Crash(f"crash after step {state.step}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    logs = Logs()
    assert Trainer(config(out), callbacks=[logs]).train() == "finished"
    return out, logs


def test_steps_csv_has_a_row_every_log_every_steps_with_each_loss_term(straight):
    out, _ = straight
    steps = rows(out / "steps.csv")
    assert list(steps[0])[:5] == ["step", "epoch", "loss", "lr", "grad_norm"]
    assert [int(r["step"]) for r in steps] == list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))
    assert [int(r["epoch"]) for r in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for row in steps:  # the weighted total is the sum of its terms' means
        total = float(row["loss/mse"]) + 0.5 * float(row["loss/l1"])
        assert float(row["loss"]) == pytest.approx(total, rel=1e-6)
        assert float(row["my_step_value"]) == int(row["step"]) * 10  # trainer.log in on_step_end
    epochs = rows(out / "metrics.csv")
    for column in ("train_loss/mse", "train_loss/l1", "val_loss/mse", "val_loss/l1", "cpu_rss_mb", "val_psnr"):
        assert all(math.isfinite(float(r[column])) for r in epochs), column
    assert [float(r["my_epoch_value"]) for r in epochs] == [100.0, 101.0, 102.0]  # trainer.log in validation
    # An epoch's train_loss is the mean over its micro-batches; a step record's over its two steps' micro-batches.
    first_epoch = [float(r["loss"]) for r in steps[:3]]
    assert float(epochs[0]["train_loss"]) == pytest.approx(sum(first_epoch) / 3, rel=1e-6)


def test_hooks_receive_the_training_state(straight):
    _, logs = straight
    steps = logs.step_states
    assert [s.step for s in steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [s.epoch for s in steps[:7]] == [1] * 6 + [2]
    assert isinstance(steps[0], TrainingState) and isinstance(steps[0].loss, torch.Tensor)
    assert set(steps[0].loss_terms) == {"mse", "l1"} and steps[0].metrics is None
    assert steps[-1].lr == 0.0 and steps[0].lr > 0  # cosine down to min_lr_ratio 0
    epochs = logs.epoch_states
    assert [s.epoch for s in epochs] == [1, 2, 3] and [s.step for s in epochs] == [6, 12, 18]
    assert epochs[-1].metrics["epoch"] == 3 and epochs[-1].loss == epochs[-1].metrics["train_loss"]
    assert set(epochs[-1].loss_terms) == {"mse", "l1"}


def test_validation_pictures_are_written_with_the_dashboard_off(straight):
    from PIL import Image

    out, _ = straight
    pictures = sorted(p.name for p in (out / "samples").iterdir())
    assert pictures == ["epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]
    picture = Image.open(out / "samples/epoch_0003.png")
    # 4 samples of 32x32, drawn 4x, in 4 panels (input, output, target, difference), 1-pixel separators
    assert picture.size == (4 * 32 * 4 + 5, 4 * 32 * 4 + 5)


def tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "trackers" / "cr_accel"), size_guidance={"scalars": 0, "images": 0,
                                                                                "histograms": 0})
    events.Reload()
    return events


def test_tensorboard_reads_step_and_epoch_scalars_images_and_histograms(straight):
    out, _ = straight
    events = tensorboard(out)
    steps, epochs = rows(out / "steps.csv"), rows(out / "metrics.csv")
    for name in ("loss", "lr", "grad_norm", "loss/mse", "loss/l1", "my_step_value"):
        logged = events.Scalars(f"train/{name}")
        assert [e.step for e in logged] == [int(r["step"]) for r in steps], name
        assert [e.value for e in logged] == pytest.approx([float(r[name]) for r in steps], rel=1e-6), name
    for name in ("train_loss", "val_loss", "val_psnr", "val_loss/l1", "lr", "best_val", "cpu_rss_mb"):
        logged = events.Scalars(f"epoch/{name}")
        assert [e.step for e in logged] == [6, 12, 18], name
        assert [e.value for e in logged] == pytest.approx([float(r[name]) for r in epochs], rel=1e-6), name
    assert [e.step for e in events.Images("images/samples")] == [6, 12, 18]
    tags = events.Tags()["histograms"]
    assert "weights/head.weight" in tags and "gradients/head.weight" in tags
    assert [e.step for e in events.Histograms("gradients/head.weight")] == [12]  # histograms_every 2
    import cr_accel

    weight = cr_accel.load_model(out / "checkpoints/step_00000012").state_dict()["head.weight"]
    histogram = events.Histograms("weights/head.weight")[0].histogram_value
    assert histogram.num == weight.numel()
    assert (histogram.min, histogram.max) == pytest.approx((float(weight.min()), float(weight.max())))
    assert histogram.sum == pytest.approx(float(weight.double().sum()), rel=1e-6)


class GradientsBeforeStep(Callback):
    """The clipped gradients every optimizer step is about to apply, by the step's number (from 1)."""

    def __init__(self):
        self.gradients = {}

    def on_before_optimizer_step(self, trainer, state):
        self.gradients[state.step + 1] = trainer.model.head.weight.grad.detach().clone()


def test_gradient_histograms_show_a_histogram_epochs_first_step_and_cost_no_hook_in_other_steps(tmp_path):
    from cr_accel.callbacks import Event
    from cr_accel.callbacks.histograms import Histograms

    out = tmp_path / "run"
    cfg = config(out, training={"epochs": 2}, output={"samples_every": 0})
    plain = Trainer(cfg)
    assert any(isinstance(cb, Histograms) for cb in plain.callbacks.callbacks)
    assert not plain.callbacks.has(Event.ON_BEFORE_OPTIMIZER_STEP)  # nothing runs before every step for them
    seen = GradientsBeforeStep()
    assert Trainer(cfg, callbacks=[seen]).train() == "finished"
    first_of_epoch_2 = seen.gradients[STEPS_PER_EPOCH + 1]
    [logged] = tensorboard(out).Histograms("gradients/head.weight")
    assert logged.step == 2 * STEPS_PER_EPOCH
    histogram = logged.histogram_value
    assert histogram.num == first_of_epoch_2.numel()
    assert (histogram.min, histogram.max) == pytest.approx((float(first_of_epoch_2.min()),
                                                            float(first_of_epoch_2.max())))
    assert histogram.sum == pytest.approx(float(first_of_epoch_2.double().sum()), rel=1e-6)
    later = seen.gradients[STEPS_PER_EPOCH + 2]
    assert histogram.sum != pytest.approx(float(later.double().sum()), rel=1e-6)


def test_a_crash_and_a_resume_continue_every_record_without_a_step_twice(straight, tmp_path):
    """The run crashes after step 11: its newest checkpoint is step 9's (save_every_steps 3), mid-epoch and in
    the middle of a step record's interval (log_every 2), and step 10's record was logged after it. The resumed
    run continues from step 9; TensorBoard hides what came after it, the CSVs move it aside, and every record
    equals the uninterrupted run's (step 10's interval too, step 9 included)."""
    straight_out, _ = straight
    out = tmp_path / "run"
    with pytest.raises(Crash):
        Trainer(config(out), callbacks=[Logs(), CrashAfter(11)]).train()
    assert int(rows(out / "steps.csv")[-1]["step"]) == 10  # logged before the crash
    # TensorBoard reads a folder's event files in the order of their names: the time in whole seconds, the host,
    # the process, then a counter of the process's writers as text ("10" < "9"). Runs of two processes (as after a
    # real crash) are ordered by time; these two share a process, so they must not share a second.
    time.sleep(1.0)
    assert Trainer(config(out), callbacks=[Logs()]).train(resume_from_checkpoint="latest") == "finished"
    assert f"resumed from {out / 'checkpoints/step_00000009'}: epoch 2, batch 3, step 9" in (out / "train.log").read_text()
    assert rows(out / "steps.csv") == rows(straight_out / "steps.csv")
    assert metric_rows(out) == metric_rows(straight_out)
    assert [r["step"] for r in rows(out / "steps.csv.superseded")] == ["10"]
    events = tensorboard(out)
    for tag in ("train/loss", "train/lr", "epoch/val_loss", "epoch/train_loss"):
        logged = [e.step for e in events.Scalars(tag)]
        assert logged == sorted(set(logged)), (tag, logged)  # no step twice
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [float(r["loss"]) for r in rows(straight_out / "steps.csv")], rel=1e-6)


class Terms(torch.nn.Module):
    """A user's loss returning named terms with the total under `loss`."""

    def forward(self, outputs, targets):
        squared = (outputs - targets).pow(2).mean()
        absolute = (outputs - targets).abs().mean()
        return {"loss": squared + absolute, "squared": squared, "absolute": absolute}


def test_a_custom_loss_returning_terms_logs_them(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, loss={"name": "tests.test_records:Terms"}, training={"epochs": 1},
                 output={"trackers": [], "samples_every": 0})
    Trainer(cfg).train()
    steps = rows(out / "steps.csv")
    assert [c for c in steps[0] if c.startswith("loss/")] == ["loss/squared", "loss/absolute"]
    epoch = rows(out / "metrics.csv")[0]
    assert float(epoch["val_loss"]) == pytest.approx(float(epoch["val_loss/squared"]) + float(epoch["val_loss/absolute"]),
                                                     rel=1e-6)
    assert not (out / "samples").exists()  # samples_every 0


def test_a_classification_run_draws_its_confusion_matrix(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    data = tmp_path / "classes.pt"
    torch.save({"inputs": torch.randn(60, 8, generator=g), "targets": torch.arange(60) % 3}, data)
    out = tmp_path / "run"
    cfg = config_from_dict({
        "model": {"name": "mlp", "in_features": 8, "out_features": 3, "hidden_sizes": [16]},
        "loss": {"name": "cross_entropy"},
        "data": {"name": "tensor_files", "path": str(data), "batch_size": 10, "val_ratio": 0.5},
        "training": {"epochs": 2, "metrics": ["accuracy"]},
        "checkpoint": {"monitor": "val_accuracy", "mode": "max"},
        "output": {"dir": str(out)},
    })
    trainer = Trainer(cfg)
    trainer.train()
    counts = trainer.last_confusion
    assert counts.shape == (3, 3) and int(counts.sum()) == 30  # every validation sample once
    accuracy = float(rows(out / "metrics.csv")[-1]["val_accuracy"])
    assert int(counts.diagonal().sum()) == round(accuracy * 30)
    assert Image.open(out / "samples/epoch_0002.png").size == (3 * 40, 3 * 40)  # 3 classes, 40-pixel cells


def test_step_records_and_trainer_log_reach_the_dashboard(tmp_path):
    """A real dashboard server: the step records (with loss terms and a callback's values) and the epoch records
    arrive, as in the CSVs."""
    import json
    import threading
    import urllib.request

    from cr_accel.dashboard.server import make_server

    server = make_server("127.0.0.1", 0, tmp_path / "runs.sqlite")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    out = tmp_path / "run"
    try:
        cfg = config(out, training={"epochs": 2}, output={"trackers": [], "histograms_every": 0},
                     dashboard={"enabled": True, "url": server.url})
        Trainer(cfg, callbacks=[Logs()]).train()
        run_id = (out / "dashboard_run_id").read_text().strip()

        def get(path):
            with urllib.request.urlopen(f"{server.url}/api/runs/{run_id}/{path}", timeout=5) as answer:
                return json.loads(answer.read())

        series = get("steps?max_points=1000")["series"]
        epochs = get("epochs")["epochs"]
    finally:
        server.shutdown()
        server.server_close()
    steps = rows(out / "steps.csv")
    for name in ("loss", "loss/l1", "my_step_value"):
        assert series[name]["step"] == [int(r["step"]) for r in steps], name
        assert series[name]["value"] == pytest.approx([float(r[name]) for r in steps], rel=1e-9), name
    assert [e["metrics"]["my_epoch_value"] for e in epochs] == [100.0, 101.0]
    assert [e["metrics"]["val_loss/mse"] for e in epochs] == pytest.approx(
        [float(r["val_loss/mse"]) for r in rows(out / "metrics.csv")], rel=1e-9)
