"""LR schedules beyond the run-long curves (cr_accel/schedule.py): `step`, `multistep` and `cosine_restarts` give
torch's own schedulers' LRs; `plateau` lowers the LR exactly as torch's ReduceLROnPlateau does, after the warm-up,
following a validation metric; a `torch.optim.lr_scheduler:Name` target runs per step or per epoch; each resumes
exactly from a checkpoint taken in the middle of it; configs that cannot work are refused before anything runs."""

import json

import pytest
import torch

from cr_accel import checkpoint, schedule
from cr_accel.config import config_from_dict, parse_yaml
from cr_accel.errors import ConfigError, UserError
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from cr_accel.trainer import Trainer
from tests.runners import PROBE, ROOT, assert_same_weights, metric_rows, run_1_process, small_config_file

LR = 0.1


def lrs_of(sched, steps, epoch_every=None):
    """The LR each of `steps` optimizer steps uses; the schedule is told of an epoch end every `epoch_every`."""
    seen = []
    for i in range(steps):
        seen.append(sched.optimizer.param_groups[0]["lr"])
        sched.step()
        if epoch_every and (i + 1) % epoch_every == 0:
            sched.epoch_end()
    return seen


def optimizer():
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=LR)


def ours(name, total=40, warmup=0, steps_per_epoch=4, **kwargs):
    builder = schedule.SCHEDULES.resolve(name)
    return schedule.StepSchedule(optimizer(), lambda n, w: builder(num_training_steps=n, num_warmup_steps=w,
                                                                   steps_per_epoch=steps_per_epoch, **kwargs),
                                 total, warmup)


def torch_lrs(make, steps, per):
    """torch's scheduler, stepped every `per` optimizer steps, read before each step."""
    opt = optimizer()
    sched = make(opt)
    seen = []
    for i in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        if (i + 1) % per == 0:
            sched.step()
    return seen


def test_step_and_multistep_by_epoch_and_by_step_are_torchs():
    lr_sched = torch.optim.lr_scheduler
    assert lrs_of(ours("step", step_size=3, gamma=0.5), 40) == pytest.approx(
        torch_lrs(lambda o: lr_sched.StepLR(o, 3, 0.5), 40, per=4))
    assert lrs_of(ours("step", step_size=3, gamma=0.5, interval="step"), 40) == pytest.approx(
        torch_lrs(lambda o: lr_sched.StepLR(o, 3, 0.5), 40, per=1))
    assert lrs_of(ours("multistep", milestones=[2, 5, 7], gamma=0.3), 40) == pytest.approx(
        torch_lrs(lambda o: lr_sched.MultiStepLR(o, [2, 5, 7], 0.3), 40, per=4))
    floor = lrs_of(ours("multistep", milestones=[1, 2, 3], gamma=0.1, min_lr_ratio=0.05), 40)
    assert min(floor) == pytest.approx(LR * 0.05)


def test_cosine_restarts_is_torchs_sgdr_and_counts_epochs_in_steps():
    per_step = lrs_of(ours("cosine_restarts", cycle_length=5, cycle_mult=2, min_lr_ratio=0.1), 40)
    expected = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 5, 2, eta_min=LR * 0.1),
                         40, per=1)
    assert per_step == pytest.approx(expected)
    # Cycles of 2 epochs of 4 steps are cycles of 8 steps.
    assert lrs_of(ours("cosine_restarts", cycle_length=2, interval="epoch"), 40) == pytest.approx(
        lrs_of(ours("cosine_restarts", cycle_length=8), 40))


def test_warm_up_comes_first():
    lrs = lrs_of(ours("step", warmup=4, step_size=100), 6)
    assert lrs == pytest.approx([LR / 5, 2 * LR / 5, 3 * LR / 5, 4 * LR / 5, LR, LR])


@pytest.mark.parametrize("mode, threshold_mode", [("min", "rel"), ("min", "abs"), ("max", "rel"), ("max", "abs")])
def test_plateau_lowers_the_lr_as_torchs_reduce_lr_on_plateau(mode, threshold_mode):
    values = [1.0, 0.9, 0.95, 0.96, 0.97, 0.89, 0.9, 0.91, 0.92, 0.93, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, -0.2, -0.1]
    opt = optimizer()
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=2, threshold=0.01,
                                                           threshold_mode=threshold_mode, cooldown=1, min_lr=LR * 0.1)
    ours_ = schedule.StepSchedule(optimizer(), lambda n, w: schedule.plateau(
        n, w, min_lr_ratio=0.1, monitor="val_loss", mode=mode, factor=0.5, patience=2, threshold=0.01,
        threshold_mode=threshold_mode, cooldown=1), 100, 0)
    for value in values:
        ours_.step()  # an epoch of one step, then its validation
        reference.step(value)
        ours_.observe(value)
        assert ours_.optimizer.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] < LR  # the values did lower it
    # A reduction starts at the next step: the LR the steps before used is still read back.
    assert ours_.lr_of_last_step()[0] >= ours_.optimizer.param_groups[0]["lr"]


def test_a_torch_scheduler_runs_after_the_warm_up_per_step_or_per_epoch():
    lr_sched = torch.optim.lr_scheduler
    by_step = schedule.TorchSchedule(optimizer(), lr_sched.OneCycleLR, {"max_lr": LR, "total_steps": 20}, "step",
                                     22, 2)
    reference = torch_lrs(lambda o: lr_sched.OneCycleLR(o, max_lr=LR, total_steps=20), 20, per=1)
    assert lrs_of(by_step, 22)[2:] == pytest.approx(reference)
    by_epoch = schedule.TorchSchedule(optimizer(), lr_sched.ExponentialLR, {"gamma": 0.5}, "epoch", 12, 0)
    assert lrs_of(by_epoch, 12, epoch_every=4) == pytest.approx([LR] * 4 + [LR / 2] * 4 + [LR / 4] * 4)


def test_a_torch_schedulers_state_is_json_and_resumes_exactly():
    make = lambda: schedule.TorchSchedule(optimizer(), torch.optim.lr_scheduler.CosineAnnealingLR,  # noqa: E731
                                          {"T_max": 7}, "step", 20, 3)
    straight = lrs_of(make(), 20)
    first = make()
    head = lrs_of(first, 9)
    state = json.loads(json.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    assert second.lr_of_last_step() == first.lr_of_last_step()
    assert head + lrs_of(second, 11) == pytest.approx(straight, abs=0, rel=0)


def raw_config(out, **scheduler):
    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4)
    raw["data"].update(num_train=32, num_val=8, batch_size=8)
    raw["training"].update(epochs=4, log_every=1)
    raw["output"].update(dir=str(out), samples_every=0)
    raw["dashboard"]["enabled"] = False
    raw["scheduler"] = {"warmup_ratio": 0.0, **scheduler}
    return raw


def test_plateau_in_a_run_lowers_the_lr_after_validations_that_do_not_improve(tmp_path):
    """An LR too small to move val_loss by 1e-4 of itself: every validation after the first is a bad one; with
    patience 1 the second bad one (epoch 3) halves the LR from the next step on, and the count starts again."""
    raw = raw_config(tmp_path / "run", name="plateau", patience=1, factor=0.5)
    raw["optimizer"]["lr"] = 1e-12
    assert Trainer(config_from_dict(raw)).train() == "finished"
    rows = metric_rows(tmp_path / "run")
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-12, 1e-12, 1e-12, 5e-13])
    log = (tmp_path / "run/train.log").read_text()
    assert log.count("LR schedule: val_loss has not improved") == 1 and "0.5 of its peak from step 13" in log
    saved = checkpoint.read_state(tmp_path / "run/checkpoints/last")["schedule"]["factor_state"]
    assert saved["reductions"] == [[12, pytest.approx(0.5)]] and saved["bad_validations"] == 1


@pytest.mark.parametrize("scheduler", [
    {"name": "plateau", "patience": 0, "threshold": 0.3, "monitor": "val_psnr", "mode": "max"},
    {"name": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.5, "warmup_steps": 2},
], ids=["plateau", "torch-StepLR-per-epoch"])
def test_a_run_stopped_mid_epoch_resumes_its_schedule_exactly(tmp_path, scheduler):
    """Stopped at step 10 (mid-epoch 3, after the LR was lowered twice), resumed with `latest`: the same LRs,
    records and weights as the run that was not stopped."""
    config = small_config_file(tmp_path, "c.yaml", data={"num_train": 32, "num_val": 8, "batch_size": 8},
                               training={"epochs": 4, "log_every": 1}, output={"samples_every": 0},
                               scheduler={"warmup_ratio": 0.0, **scheduler})
    straight = run_1_process(PROBE, "--config", config, "--probe", tmp_path / "s/p.json", f"output.dir={tmp_path / 's/run'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = f"output.dir={tmp_path / 'r/run'}"
    first = run_1_process(PROBE, "--config", config, "--probe", tmp_path / "r/first.json", run, "--stop-at-step", 10)
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stderr[-3000:]
    second = run_1_process(PROBE, "--config", config, "--probe", tmp_path / "r/p.json", run,
                           "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    lrs = json.loads((tmp_path / "s/p.json").read_text())["lrs"]
    assert len(set(lrs)) >= 3, lrs  # the schedule did change the LR during the run
    assert lrs == (json.loads((tmp_path / "r/first.json").read_text())["lrs"]
                   + json.loads((tmp_path / "r/p.json").read_text())["lrs"])
    assert_same_weights(tmp_path / "s/p.safetensors", tmp_path / "r/p.safetensors")
    assert metric_rows(tmp_path / "s/run") == metric_rows(tmp_path / "r/run")
    assert metric_rows(tmp_path / "s/run", "steps.csv") == metric_rows(tmp_path / "r/run", "steps.csv")


@pytest.mark.parametrize("scheduler, key, words", [
    ({"name": "cosine", "interval": "epoch"}, "scheduler.interval", "takes no interval"),
    ({"name": "plateau", "monitor": "val_psnrr", "mode": "max"}, "scheduler.monitor", "did you mean `val_psnr`"),
    ({"name": "plateau", "monitor": "val_psnr"}, "scheduler.mode", "set scheduler.mode=min"),
    ({"name": "step", "step_sise": 3}, "scheduler.step_sise", "did you mean `step_size`"),
    ({"name": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "last_epoch": 3}, "scheduler.last_epoch",
     "set by the trainer"),
])
def test_schedule_configs_that_cannot_work_are_refused(tmp_path, scheduler, key, words):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw_config(tmp_path / "run", **scheduler))
    assert any(p.startswith(f"`{key}`") and words in p for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("scheduler, words", [
    ({"name": "torch.optim.lr_scheduler:ReduceLROnPlateau"}, "use `scheduler.name: plateau`"),
    ({"name": "torch.optim.lr_scheduler:LambdaLR", "lr_lambda": "abs"}, "scheduler.lr_lambda"),
])
def test_torch_schedulers_that_cannot_run_here_are_refused_when_built(tmp_path, scheduler, words):
    with pytest.raises(UserError, match=words):
        Trainer(config_from_dict(raw_config(tmp_path / "run", **scheduler)))
    assert not (tmp_path / "run").exists()


def test_plateau_is_refused_within_stages(tmp_path):
    raw = raw_config(tmp_path / "run")
    raw["training"]["epochs"] = 2
    raw["stages"] = [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 1, "scheduler": {"name": "plateau"}}]
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert any(p.startswith("`stages[1].scheduler`") and "cannot run within stages" in p
               for p in caught.value.problems), caught.value.problems


def test_train_py_refuses_a_bad_schedule_with_one_line_and_exit_2(tmp_path):
    result = run_1_process(ROOT / "train.py", "--config", ROOT / "configs/default.yaml",
                           f"output.dir={tmp_path / 'run'}", "scheduler.name=plateau", "scheduler.monitor=val_acc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "scheduler.monitor" in result.stderr and not (tmp_path / "run").exists()
