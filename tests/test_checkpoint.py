"""Checkpoints and resume as a user meets them: real processes, real signals, real files on disk."""

import csv
import json
import shutil
import signal
import time

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from cr_accel import checkpoint
from cr_accel.callbacks import Callback
from cr_accel.checkpoint import load_model
from cr_accel.config import config_from_dict, load_config, parse_yaml
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from cr_accel.trainer import Trainer
from tests.runners import (PROBE, ROOT, finish, launch_2_cpu_processes, newest_checkpoints, read_lines_until,
                           resumed_from, run_1_process, start_1_process)

LOSS_COLUMNS = ("epoch", "step", "train_loss", "grad_norm", "val_loss", "val_psnr", "best_val", "lr", "skipped_steps")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """48 samples, batch 8, accumulation 2 -> 6 batches, 3 optimizer steps per epoch; dropout on."""
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(dropout=0.2, base_channels=4)
    raw["data"].update(num_train=48, num_val=12, batch_size=8)
    raw["training"].update(epochs=3, gradient_accumulation_steps=2, log_every=2)
    raw["scheduler"].update(warmup_steps=2)
    raw["checkpoint"].update(save_every=1, keep_last_n=None)
    path = tmp_path_factory.mktemp("cfg") / "resume.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: r[k] for k in LOSS_COLUMNS} for r in csv.DictReader(f)]


def optimizer_state(ckpt):
    return torch.load(ckpt / "optimizer.bin", weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def straight_run(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_1_process(PROBE, "--config", config_file, "--probe", out / "p.json", f"output.dir={out / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_resumed_equals_straight(straight, resumed):
    assert_same_tensors(load_file(straight / "p.safetensors"), load_file(resumed / "p.safetensors"), "weights")
    assert_same_tensors(optimizer_state(straight / "run/checkpoints/last"),
                        optimizer_state(resumed / "run/checkpoints/last"), "optimizer")
    assert rows(straight / "run") == rows(resumed / "run")


@pytest.mark.parametrize("stop_at_step", [4, 6], ids=["mid-epoch", "last-step-of-epoch"])
def test_exact_resume_after_sigterm_one_process(config_file, straight_run, tmp_path, stop_at_step):
    run = f"output.dir={tmp_path / 'run'}"
    first = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                          "--stop-at-step", stop_at_step)
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stderr[-3000:]
    state = checkpoint.read_state(tmp_path / "run/checkpoints/last")["trainer"]
    assert state["global_step"] == stop_at_step and state["batch_in_epoch"] > 0
    assert json.loads((tmp_path / "first.json").read_text())["status"] == "preempted"

    second = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", run,
                           "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_resumed_equals_straight(straight_run, tmp_path)
    log = (tmp_path / "run/train.log").read_text()
    assert f"resumed from {tmp_path / 'run/checkpoints/last'}" in log and "SIGTERM received" in log


def test_exact_resume_from_an_epoch_end_checkpoint(config_file, straight_run, tmp_path):
    """Run into epoch 3, then go back to the periodic checkpoint written at the end of epoch 1 (step 3)."""
    run = f"output.dir={tmp_path / 'run'}"
    first = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                          "--stop-at-step", 7)
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stderr[-3000:]
    epoch_end = tmp_path / "run/checkpoints/step_00000003"
    assert checkpoint.read_state(epoch_end)["trainer"]["batch_in_epoch"] == 0
    second = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", run,
                           "--resume_from_checkpoint", epoch_end)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_resumed_equals_straight(straight_run, tmp_path)
    assert (tmp_path / "run/metrics.csv.superseded").exists()  # epoch 2 was logged, then re-run


def test_exact_resume_two_processes(config_file, tmp_path):
    straight = launch_2_cpu_processes(PROBE, "--config", config_file, "--probe", tmp_path / "s/p.json",
                                      f"output.dir={tmp_path / 's/run'}", "training.gradient_accumulation_steps=1")
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = f"output.dir={tmp_path / 'r/run'}"
    first = launch_2_cpu_processes(PROBE, "--config", config_file, "--probe", tmp_path / "r/first.json", run,
                                   "training.gradient_accumulation_steps=1", "--stop-at-step", 1)
    assert json.loads((tmp_path / "r/first.json").read_text())["status"] == "preempted", first.stderr[-3000:]
    # The processes agree one step after the signal (an asynchronous all-reduce): they stop after step 2.
    state = checkpoint.read_state(tmp_path / "r/run/checkpoints/last")["trainer"]
    assert state["world_size"] == 2 and state["global_step"] == 2 and state["batch_in_epoch"] == 2, state
    second = launch_2_cpu_processes(PROBE, "--config", config_file, "--probe", tmp_path / "r/p.json", run,
                                    "training.gradient_accumulation_steps=1", "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_resumed_equals_straight(tmp_path / "s", tmp_path / "r")


def test_sigkill_while_writing_a_checkpoint_loses_nothing(config_file, straight_run, tmp_path):
    run = f"output.dir={tmp_path / 'run'}"
    proc = start_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                           "--slow-save", 30, "--slow-save-step", 6)
    # epoch 1's checkpoint (step 3) is written at full speed, epoch 2's (step 6) slowly
    read_lines_until(proc, lambda line: line.startswith("WRITING-MANIFEST") and "step_00000006" in line, timeout=120)
    proc.kill()  # the epoch-2 checkpoint is half written: its files are there, no manifest
    finish(proc, timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ckpts = tmp_path / "run/checkpoints"
    assert any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert checkpoint.read_state(ckpts / "last")["trainer"]["global_step"] == 3  # epoch 1's, untouched

    resumed = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", run,
                            "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in ckpts.iterdir())
    assert_resumed_equals_straight(straight_run, tmp_path)


def test_external_sigterm_saves_the_current_step_and_exits_75(config_file, straight_run, tmp_path):
    run = f"output.dir={tmp_path / 'run'}"
    proc = start_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                           "training.log_every=1")
    read_lines_until(proc, lambda line: " step 4/" in line, timeout=120)  # plain progress: "epoch 1 step 1/9 ..."
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc, timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    stopped_at = checkpoint.read_state(tmp_path / "run/checkpoints/last")["trainer"]["global_step"]
    assert 4 <= stopped_at < 9
    assert json.loads((tmp_path / "first.json").read_text())["global_step"] == stopped_at
    resumed = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", run,
                            "--resume_from_checkpoint", "latest", "training.log_every=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_equals_straight(straight_run, tmp_path)


def small_cfg(tmp_path, **training):
    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4)
    raw["data"].update(num_train=32, num_val=16, batch_size=8)
    raw["training"].update({"epochs": 10, **training})
    raw["checkpoint"].update(save_every=1, keep_last_n=2)
    raw["output"]["dir"] = str(tmp_path / "run")
    return config_from_dict(raw)


class CountEpochs(Callback):
    def __init__(self):
        self.seen = 0

    def on_epoch_end(self, trainer, state):
        metrics = state.metrics
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_retention_keeps_two_newest_periodic_plus_best_and_last(tmp_path):
    # A high LR makes the validation loss wander, so `best` is not simply the last epoch.
    cfg = small_cfg(tmp_path)
    cfg.optimizer.lr = 3e-2
    Trainer(cfg).train()
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last", "step_00000036", "step_00000040"]
    with open(tmp_path / "run/metrics.csv", newline="") as f:
        val = [(float(r["val_loss"]), int(r["epoch"])) for r in csv.DictReader(f)]
    best_loss, best_epoch = min(val)
    best = checkpoint.read_state(ckpts / "best")
    assert best["trainer"]["epoch"] == best_epoch and best["callbacks"]["checkpoint_policy"]["best"] == best_loss
    assert checkpoint.read_state(ckpts / "last")["trainer"]["epoch"] == 10
    for folder in ckpts.iterdir():
        checkpoint.verify(folder)


def test_callback_state_and_counters_travel_with_the_checkpoint(tmp_path):
    counter = CountEpochs()
    Trainer(small_cfg(tmp_path, epochs=3), callbacks=[counter]).train()
    assert counter.seen == 3
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    again = CountEpochs()
    trainer = Trainer(small_cfg(tmp_path, epochs=5), callbacks=[again])
    trainer.train(resume_from_checkpoint="latest", allow_config_change=True)  # 3 -> 5 epochs
    assert again.seen == 5 and trainer.global_step == 20
    with open(tmp_path / "run/metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3", "4", "5"]


class StopAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, state):
        step = state.step
        if step == self.step:
            trainer.should_stop = True


def test_stopping_inside_an_epoch_checkpoints_that_position(tmp_path):
    """A callback's should_stop (like max_steps) ends inside an epoch: resuming must train the rest of it."""
    straight = Trainer(small_cfg(tmp_path / "s", epochs=3))
    straight.train()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    Trainer(small_cfg(tmp_path / "r", epochs=3), callbacks=[StopAtStep(6)]).train()
    state = checkpoint.read_state(tmp_path / "r/run/checkpoints/last")["trainer"]
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 2, 6)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = Trainer(small_cfg(tmp_path / "r", epochs=3))
    resumed.train(resume_from_checkpoint="latest")
    assert resumed.global_step == straight.global_step == 12
    assert_same_tensors(straight.accelerator.unwrap_model(straight.model).state_dict(),
                        resumed.accelerator.unwrap_model(resumed.model).state_dict())
    assert rows(tmp_path / "r/run") == rows(tmp_path / "s/run")


def test_latest_skips_a_damaged_newest_checkpoint(finished_run):
    ckpts = finished_run / "checkpoints"
    last = ckpts / "last"
    # A new file in last/ only: writing into the old one would change the same file in step_00000008/ (the
    # folders of one save share their files as hard links) and leave only step 4 to resume from.
    (last / "optimizer.bin").unlink()
    (last / "optimizer.bin").write_bytes(b"damaged")
    newest = newest_checkpoints(ckpts, exclude={"last"})
    assert newest == {ckpts / "step_00000008"}
    result = resume_cli(finished_run, where="latest")
    assert result.returncode == 0, result.stderr[-2000:]
    log = (finished_run / "train.log").read_text()
    assert f"skipping checkpoint {last}:" in log and log.count("skipping checkpoint") == 1  # only last/
    assert resumed_from(log) == [ckpts / "step_00000008"]  # the newest that verifies, not any older one


def test_load_model_for_inference(tmp_path):
    trainer = Trainer(small_cfg(tmp_path, epochs=2))
    trainer.train()
    model = load_model(tmp_path / "run")  # the run folder: its best checkpoint
    best = load_file(tmp_path / "run/checkpoints/best/model.safetensors")
    assert_same_tensors(model.state_dict(), best)
    assert not model.training
    x = trainer.data.val.tensors[0][:2]
    assert model(x).shape == x.shape


@pytest.fixture
def finished_run(tmp_path):
    Trainer(small_cfg(tmp_path, epochs=2)).train()
    return tmp_path / "run"


def resume_cli(run_dir, *overrides, where=None):
    return run_1_process(ROOT / "train.py", "--config", run_dir / "config.yaml", "training.epochs=3",
                         *overrides, "--allow-config-change", "--resume_from_checkpoint",
                         where or run_dir / "checkpoints/last")


@pytest.mark.parametrize("tamper, message", [
    ("flip_byte", "does not match its checksum"),
    ("truncate", "truncated or changed"),
    ("remove_file", "is missing `optimizer.bin`"),
    ("extra_pickle", "unexpected file `custom_checkpoint_0.pkl`"),
    ("pickle_in_manifest", "never holds"),
    ("no_manifest", "incomplete or not a cr_accel checkpoint"),
])
def test_tampered_checkpoint_is_refused(finished_run, tamper, message):
    last = finished_run / "checkpoints/last"
    model_file = last / "model.safetensors"
    if tamper == "flip_byte":
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        model_file.write_bytes(bytes(data))
    elif tamper == "truncate":
        model_file.write_bytes(model_file.read_bytes()[:-100])
    elif tamper == "remove_file":
        (last / "optimizer.bin").unlink()
    elif tamper in ("extra_pickle", "pickle_in_manifest"):
        evil = last / "custom_checkpoint_0.pkl"
        evil.write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
        if tamper == "pickle_in_manifest":
            manifest = json.loads((last / "manifest.json").read_text())
            manifest["files"][evil.name] = {"size": evil.stat().st_size, "sha256": checkpoint.files.sha256(evil)}
            (last / "manifest.json").write_text(json.dumps(manifest))
    elif tamper == "no_manifest":
        (last / "manifest.json").unlink()
    before = (finished_run / "metrics.csv").read_bytes()
    result = resume_cli(finished_run)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert (finished_run / "metrics.csv").read_bytes() == before


def test_checkpoint_of_another_model_names_the_parameters(finished_run):
    result = resume_cli(finished_run, "model.base_channels=8")
    assert result.returncode == 2
    assert "does not fit the model" in result.stderr and "Traceback" not in result.stderr
    assert "`down.0.0.weight` has shape [8, 4, 3, 3] in the checkpoint, [16, 8, 3, 3] in the model" in result.stderr
    assert "and 11 more" in result.stderr


def test_older_checkpoint_without_newer_keys_loads_with_defaults(finished_run):
    """A format-1 trainer_state.json (flat keys, before the state registry) with only its required keys."""
    last = finished_run / "checkpoints/last"
    parts = json.loads((last / "trainer_state.json").read_text())["parts"]
    legacy = {"format": 1, "epoch": parts["trainer"]["epoch"], "global_step": parts["trainer"]["global_step"],
              "world_size": 1, "schedule": parts["schedule"]}
    assert legacy["epoch"] == 2 and legacy["global_step"] == 8
    (last / "trainer_state.json").write_text(json.dumps(legacy))
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = {"size": (last / "trainer_state.json").stat().st_size,
                                              "sha256": checkpoint.files.sha256(last / "trainer_state.json")}
    (last / "manifest.json").write_text(json.dumps(manifest))
    state = checkpoint.read_state(last)
    assert state["trainer"] == {"epoch": 2, "batch_in_epoch": 0, "global_step": 8, "world_size": 1,
                                "best_value": None, "bad_validations": 0}
    assert state["callbacks"] == {} and state["dataset"] == {} and "epoch_stats" not in state
    result = resume_cli(finished_run)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(finished_run / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_new_run_into_a_folder_with_checkpoints_is_refused(finished_run):
    shutil.copy(finished_run / "config.yaml", finished_run.parent / "c.yaml")
    listing = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    result = run_1_process(ROOT / "train.py", "--config", finished_run.parent / "c.yaml")
    assert result.returncode == 2
    assert "--resume_from_checkpoint latest" in result.stderr and "--overwrite" in result.stderr
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == listing


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    cfg = load_config(ROOT / "configs/default.yaml", ["model.base_channels=4", "data.num_train=16", "data.num_val=8",
                                                      "training.epochs=1", f"output.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    assert trainer.train(resume_from_checkpoint="latest") == "finished"
    assert "no complete checkpoint" in (tmp_path / "run/train.log").read_text()


def test_a_second_signal_aborts_at_once(config_file, tmp_path):
    """The first SIGTERM asks for a checkpoint; a second one while it is being written ends the run now,
    and the half-written checkpoint never becomes `last`."""
    # No checkpoint before the signal (no validation, no periodic save): only the preemption's is slowed.
    proc = start_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json",
                           f"output.dir={tmp_path / 'run'}", "training.eval_every=10", "checkpoint.save_every=10",
                           "--slow-save", 60, "--stop-at-step", 4)
    first_write = read_lines_until(proc, lambda line: line.startswith("WRITING-MANIFEST"), timeout=120)
    assert ".tmp-step_00000004" in first_write  # the first checkpoint is the preemption's, half written
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    finish(proc, timeout=30)
    assert time.time() - started < 10  # not the 60 s the manifest write was told to take
    assert proc.returncode == -signal.SIGTERM
    ckpts = tmp_path / "run/checkpoints"
    assert not (ckpts / "last").exists()  # the half-written one never became `last`
    assert [p.name for p in ckpts.iterdir()] == [".tmp-step_00000004"]  # removed at the next start
