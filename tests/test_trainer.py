"""The training loop, in process: learning, clipping, schedule, precision, non-finite losses, callbacks."""

import csv
import json
import math
import os
import sys

import pytest
import torch

from cr_accel.callbacks import Callback, Event, hook_names
from cr_accel.cli import main_train
from cr_accel.config import config_from_dict
from cr_accel.schedule import SCHEDULES
from cr_accel.step_stats import NonFiniteLossError
from cr_accel.trainer import Trainer


def regression_files(tmp_path, n=10, d_in=8, d_out=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / "data.pt"
    torch.save({"inputs": torch.randn(n, d_in, generator=g), "targets": scale * torch.randn(n, d_out, generator=g)}, path)
    return str(path)


def mlp_config(tmp_path, data_path, **overrides):
    raw = {
        "model": {"name": "mlp", "in_features": 8, "out_features": 4, "hidden_sizes": [64, 64]},
        "loss": {"name": "mse"},
        "data": {"name": "tensor_files", "path": data_path, "batch_size": 10, "val_ratio": 0.2},
        "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
        "scheduler": {"name": "constant", "warmup_ratio": 0.0},
        "training": {"epochs": 3, "log_every": 1000},
        "output": {"dir": str(tmp_path / "run")},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_overfits_ten_samples(tmp_path):
    # val_path = the same file: all 10 samples train, and validation sees them too.
    data = regression_files(tmp_path)
    cfg = mlp_config(tmp_path, data, data__val_path=data, training__epochs=300, training__eval_every=100)
    Trainer(cfg).train()
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 300
    assert float(rows[0]["train_loss"]) > 0.5  # it really started far off
    assert float(rows[-1]["train_loss"]) < 0.01
    assert float(rows[-1]["val_loss"]) < 0.01


def test_clipping_bounds_the_update_and_records_the_true_norm(tmp_path):
    data = regression_files(tmp_path, scale=1e4)  # huge targets -> huge gradients
    cfg = mlp_config(tmp_path, data, data__val_path=data, optimizer__name="sgd", optimizer__momentum=0.0,
                     optimizer__lr=1.0, training__epochs=1, training__grad_clip=0.5)
    trainer = Trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = [p.detach().clone() for p in model.parameters()]
    # The true pre-clip norm, computed independently on a copy with the same batch (all 10 samples).
    reference = type(model)(8, 4, [64, 64])
    reference.load_state_dict(model.state_dict())
    inputs, targets = trainer.data.train.tensors
    torch.nn.functional.mse_loss(reference(inputs), targets).backward()
    true_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()

    trainer.train()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    recorded = float(read_csv(tmp_path / "run" / "metrics.csv")[0]["grad_norm"])
    assert true_norm > 1000
    assert recorded == pytest.approx(true_norm, rel=1e-4)
    assert update <= 0.5 * (1 + 1e-5)  # SGD with lr 1: the update is the clipped gradient
    assert update == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_peaks_after_warmup_and_ends_at_min_lr(name):
    factor = SCHEDULES.resolve(name)(num_training_steps=100, num_warmup_steps=10, min_lr_ratio=0.1)
    values = [factor(s) for s in range(100)]
    assert values[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))  # warm-up rises
    assert values[10] == pytest.approx(1.0)  # peak at the end of warm-up
    expected_last = 1.0 if name == "constant" else 0.1
    assert values[-1] == pytest.approx(expected_last)
    if name != "constant":
        assert all(a >= b for a, b in zip(values[10:], values[11:]))  # then never rises again


def test_trainer_steps_the_schedule_once_per_optimizer_step(tmp_path):
    data = regression_files(tmp_path, n=40)
    cfg = mlp_config(tmp_path, data, data__batch_size=4, scheduler__name="cosine", scheduler__warmup_steps=5,
                     scheduler__min_lr_ratio=0.1, training__epochs=2, training__gradient_accumulation_steps=2)
    lrs = []

    class Record(Callback):
        def on_step_end(self, trainer, state):
            lrs.append(trainer.schedule.lr_of_last_step()[0])

    trainer = Trainer(cfg, callbacks=[Record()])
    trainer.train()
    # 32 train samples / batch 4 = 8 batches, 2 per optimizer step -> 4 steps per epoch, 8 in total.
    assert trainer.total_steps == 8 and trainer.global_step == 8 and len(lrs) == 8
    assert lrs[5] == pytest.approx(1e-2)  # step index 5 = end of the 5-step warm-up: the peak
    assert lrs[-1] == pytest.approx(1e-3)  # min_lr_ratio * lr at the last step


def test_max_steps_stops_mid_epoch(tmp_path):
    data = regression_files(tmp_path, n=50)
    cfg = mlp_config(tmp_path, data, data__batch_size=4, training__epochs=10, training__max_steps=5)
    trainer = Trainer(cfg)
    assert trainer.train() == "finished"
    assert trainer.global_step == 5
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 1 and rows[0]["step"] == "5" and rows[0]["val_loss"]


def test_bf16_autocast_on_cpu(tmp_path):
    data = regression_files(tmp_path)
    cfg = mlp_config(tmp_path, data, training__mixed_precision="bf16", training__epochs=2)
    dtypes = set()

    class WatchDtype(Callback):
        def on_train_start(self, trainer):
            first_linear = trainer.accelerator.unwrap_model(trainer.model)[1]
            first_linear.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))

    Trainer(cfg, callbacks=[WatchDtype()]).train()
    assert dtypes == {torch.bfloat16}
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["mixed_precision"] == "bf16"
    assert all(math.isfinite(float(r["train_loss"])) for r in read_csv(tmp_path / "run" / "metrics.csv"))


class NanOnCall:
    """A user loss (loaded by `module:Name` target) that turns NaN on its n-th training call."""

    def __init__(self, nan_on_call: int = 7):
        self.nan_on_call = nan_on_call
        self.calls = 0

    def to(self, device):
        return self

    def __call__(self, outputs, targets):
        loss = torch.nn.functional.mse_loss(outputs, targets)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.nan_on_call:
                return loss * float("nan")
        return loss


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    data = regression_files(tmp_path, n=50)
    cfg = mlp_config(tmp_path, data, data__batch_size=4, loss__name="tests.test_trainer:NanOnCall")
    with pytest.raises(NonFiniteLossError, match=r"not finite at optimizer step 7\b"):
        Trainer(cfg).train()
    assert not (tmp_path / "run" / "metrics.csv").exists()  # no epoch finished on NaN weights


def test_nonfinite_loss_exits_1_through_the_cli(tmp_path, capsys):
    data = regression_files(tmp_path, n=50)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "model": {"name": "mlp", "in_features": 8, "out_features": 4},
        "loss": {"name": "tests.test_trainer:NanOnCall", "nan_on_call": 3},
        "data": {"name": "tensor_files", "path": data, "batch_size": 4},
        "training": {"epochs": 2}, "output": {"dir": str(tmp_path / "cli")},
    }))
    assert main_train(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "optimizer step 3" in err and "skip_nonfinite" in err and "Traceback" not in err


def test_skip_nonfinite_skips_the_step_and_keeps_training(tmp_path):
    data = regression_files(tmp_path, n=50)
    cfg = mlp_config(tmp_path, data, data__batch_size=4, loss__name="tests.test_trainer:NanOnCall",
                     training__skip_nonfinite=True, training__epochs=2)
    trainer = Trainer(cfg)
    assert trainer.train() == "finished"
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [r["skipped_steps"] for r in rows] == ["1", "0"]
    assert trainer.global_step == 2 * 10 - 1  # 10 batches per epoch, one step skipped
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_early_stopping_after_patience(tmp_path):
    data = regression_files(tmp_path, n=20)
    # An improvement must beat the best by 1e9: nothing after the first validation counts.
    cfg = mlp_config(tmp_path, data, training__epochs=50, training__early_stopping_patience=3,
                     training__early_stopping_min_delta=1e9)
    trainer = Trainer(cfg)
    assert trainer.train() == "stopped_early"
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 4
    assert "early stopping" in (tmp_path / "run" / "train.log").read_text()


def test_the_checkpoint_policy_and_early_stopping_are_callbacks_a_run_replaces(tmp_path):
    """A run's own CheckpointPolicy takes the built-in one's place (best/ then follows its monitor, and no second
    policy saves beside it); an EarlyStopping with its own monitor stops the run on that metric alone."""
    from cr_accel import checkpoint
    from cr_accel.callbacks.checkpointing import CheckpointPolicy, EarlyStopping

    class BestOfEpochTwo(CheckpointPolicy):
        def on_validation_end(self, trainer, metrics):
            self.improved = metrics["epoch"] == 2  # "best" is whatever this policy says

    data = regression_files(tmp_path, n=20)
    cfg = mlp_config(tmp_path, data, training__epochs=6)
    trainer = Trainer(cfg, callbacks=[BestOfEpochTwo(save_every=100), EarlyStopping("train_loss", patience=1, min_delta=1e9)])
    assert [type(cb) for cb in trainer.callbacks.of_type(CheckpointPolicy)] == [BestOfEpochTwo]
    assert trainer.train() == "stopped_early"  # train_loss can never beat itself by 1e9: stops at epoch 2
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 2
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last"]
    assert checkpoint.read_state(ckpts / "best")["trainer"]["epoch"] == 2
    assert "early stopping: train_loss has not improved for 1 validations" in (tmp_path / "run" / "train.log").read_text()


def test_callbacks_function_and_object_see_every_epoch_in_order(tmp_path):
    data = regression_files(tmp_path, n=20)
    cfg = mlp_config(tmp_path, data, training__epochs=3, data__batch_size=5)
    seen, events = [], []

    def on_epoch(epoch, train_loss, val_loss, model, optimizer, **metrics):
        seen.append((epoch, train_loss, val_loss, "lr" in metrics, isinstance(model, torch.nn.Module)))

    class Events(Callback):
        def on_train_start(self, trainer):
            events.append("start")

        def on_step_end(self, trainer, state):
            step = state.step
            events.append(f"step{step}")

        def on_validation_start(self, trainer):
            events.append("val-start")

        def on_validation_end(self, trainer, metrics):
            events.append("val")

        def on_epoch_end(self, trainer, state):
            metrics = state.metrics
            events.append(f"epoch{metrics['epoch']}")

        def on_train_end(self, trainer, status):
            events.append(status)

    trainer = Trainer(cfg)
    trainer.add_callback(on_epoch)
    trainer.add_callback(Events())
    trainer.train()
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [s[0] for s in seen] == [1, 2, 3]
    assert [s[1] for s in seen] == [float(r["train_loss"]) for r in rows]
    assert [s[2] for s in seen] == [float(r["val_loss"]) for r in rows]
    assert all(s[3] and s[4] for s in seen)
    # 16 train samples / batch 5 = 4 steps per epoch
    assert events[:8] == ["start", "step1", "step2", "step3", "step4", "val-start", "val", "epoch1"]
    assert events[-1] == "finished" and events.count("val") == 3


def test_every_callback_hook_is_an_event():
    """A hook without an event would never fire; an event without a hook could not be overridden."""
    assert hook_names() == {e.value for e in Event}


def test_log_file_and_csv(tmp_path):
    data = regression_files(tmp_path, n=20)
    cfg = mlp_config(tmp_path, data, training__epochs=3, training__eval_every=2, training__metrics=[])
    Trainer(cfg).train()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "hyperparameters:" in log and "lr: 0.01" in log
    epoch_lines = [line for line in log.splitlines() if "| train_loss" in line]
    assert [line.split(" epoch ")[1].split(" ")[0] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["val_loss"] == "" and rows[1]["val_loss"] != ""  # eval_every 2; the last epoch always
    for column in ("train_loss", "grad_norm", "lr", "best_val", "samples_per_s", "epoch_time", "step"):
        assert rows[-1][column] != "", column


@pytest.mark.parametrize("ema_decay", [None, 0.99], ids=["plain", "ema"])
def test_no_host_device_sync_per_step(tmp_path, monkeypatch, ema_decay):
    """The trainer and accelerate read tensors on the host (item, bool, float, tolist, cpu) per log
    interval, not per step; so does the EMA of the weights. (torch's Adam reads its step counter, a CPU
    tensor even for CUDA parameters, with .item(): not a device sync, and the hand-written loop does the
    same, so torch's own frames are not counted.)"""
    data = regression_files(tmp_path, n=200)
    cfg = mlp_config(tmp_path, data, data__batch_size=2, data__val_ratio=0.5, training__epochs=1,
                     training__ema_decay=ema_decay)
    trainer = Trainer(cfg)
    counts = {"n": 0}
    for name in ("item", "__bool__", "__float__", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, **k):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}cr_accel{os.sep}" in caller or f"{os.sep}accelerate{os.sep}" in caller:
                counts["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer.train()
    assert trainer.global_step == 50
    assert counts["n"] < 15, counts  # 50 steps; a per-step read would be >= 50


def test_eval_every_steps_validates_mid_epoch_into_steps_csv_and_best_follows(tmp_path):
    """training.eval_every_steps: validations at those steps, their metrics in that step's row of steps.csv,
    the checkpoint policy sees them (best/ may be a mid-epoch step); a validation at an epoch's last step is
    not run again for the epoch's row, which shows the same values."""
    from cr_accel import checkpoint

    data = regression_files(tmp_path, n=20)  # 16 train samples, batch 4: 4 steps per epoch
    cfg = mlp_config(tmp_path, data, training__epochs=3, training__eval_every_steps=3, data__batch_size=4,
                     optimizer__lr=3e-2, checkpoint__save_every=100)
    starts = []

    class CountValidations(Callback):
        def on_validation_start(self, trainer):
            starts.append((trainer.global_step, trainer.validation_at_epoch_end))

    trainer = Trainer(cfg, callbacks=[CountValidations()])
    assert trainer.train() == "finished"
    # steps 3, 6, 9, 12 from eval_every_steps; the ends of epochs 1 and 2 (steps 4 and 8); epoch 3 ends at 12
    assert starts == [(3, False), (4, True), (6, False), (8, True), (9, False), (12, False)]
    steps = read_csv(tmp_path / "run" / "steps.csv")
    validated = {int(r["step"]): float(r["val_loss"]) for r in steps if r["val_loss"]}
    assert sorted(validated) == [3, 6, 9, 12]
    assert all(math.isfinite(float(r["loss"])) for r in steps)
    epochs = read_csv(tmp_path / "run" / "metrics.csv")
    assert float(epochs[2]["val_loss"]) == validated[12]
    everything = {**validated, 4: float(epochs[0]["val_loss"]), 8: float(epochs[1]["val_loss"])}
    best_step = min(everything, key=everything.get)
    assert best_step % 4, "this data and LR make the best a mid-epoch validation"
    best = checkpoint.read_state(tmp_path / "run" / "checkpoints" / "best")
    assert best["trainer"]["global_step"] == best_step
    assert best["callbacks"]["checkpoint_policy"]["best"] == everything[best_step]


def test_val_sets_are_validated_by_name_monitored_and_checked_before_anything_runs(tmp_path):
    """data.val_sets: each set's metrics as val/<name>/<metric> in metrics.csv, equal to the loss of the model on
    that set computed here; one of them monitored for best/; a bad name, an unknown monitor and a set whose
    samples do not fit the model are refused before training."""
    from cr_accel import checkpoint
    from cr_accel.errors import ConfigError, UserError

    data = regression_files(tmp_path, n=20)
    g = torch.Generator().manual_seed(3)
    other = {"inputs": torch.randn(6, 8, generator=g), "targets": torch.randn(6, 4, generator=g)}
    torch.save(other, tmp_path / "other.pt")
    sets = {"other": {"val_path": str(tmp_path / "other.pt")}}
    cfg = mlp_config(tmp_path, data, data__val_sets=sets, checkpoint__monitor="val/other/loss")
    trainer = Trainer(cfg)
    assert trainer.train() == "finished"
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model(other["inputs"]), other["targets"]).item()
    assert float(rows[-1]["val/other/loss"]) == pytest.approx(expected, rel=1e-6)
    assert rows[-1]["val_loss"] != rows[-1]["val/other/loss"]
    by_epoch = {int(r["epoch"]): float(r["val/other/loss"]) for r in rows}
    best = checkpoint.read_state(tmp_path / "run" / "checkpoints" / "best")
    assert best["trainer"]["epoch"] == min(by_epoch, key=by_epoch.get)
    assert best["callbacks"]["checkpoint_policy"]["best"] == min(by_epoch.values())  # the set's, not val_loss

    with pytest.raises(ConfigError, match="not a usable set name"):
        mlp_config(tmp_path, data, data__val_sets={"a b": {}})
    with pytest.raises(ConfigError, match="did you mean `val/other/loss`"):
        mlp_config(tmp_path, data, data__val_sets=sets, checkpoint__monitor="val/other/los")
    torch.save({"inputs": torch.randn(6, 5), "targets": torch.randn(6, 4)}, tmp_path / "narrow.pt")
    narrow = mlp_config(tmp_path, data, data__val_sets={"narrow": {"val_path": str(tmp_path / "narrow.pt")}},
                        output__dir=str(tmp_path / "narrow_run"))
    with pytest.raises(UserError, match="data.val_sets.narrow"):
        Trainer(narrow).train()
    assert not (tmp_path / "narrow_run").exists()
