"""Asynchronous checkpoint saves: the same files as a synchronous save, training goes on while they are
written, and a crash or a signal during the write loses nothing."""

import json
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cr_accel import checkpoint
from cr_accel.config import config_from_dict, parse_yaml
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from cr_accel.trainer import Trainer
from tests.runners import PROBE, ROOT, finish, read_lines_until, run_1_process, start_1_process
from tests.test_checkpoint import assert_resumed_equals_straight, assert_same_tensors


def raw_config(out):
    """48 samples, batch 8, accumulation 2 -> 3 optimizer steps per epoch, 3 epochs; dropout on."""
    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(dropout=0.2, base_channels=4)
    raw["data"].update(num_train=48, num_val=12, batch_size=8)
    raw["training"].update(epochs=3, gradient_accumulation_steps=2, log_every=1)
    raw["scheduler"].update(warmup_steps=2)
    raw["checkpoint"].update(save_every=1, keep_last_n=None)
    raw["output"]["dir"] = str(out)
    return raw


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "async.yaml"
    path.write_text(yaml.safe_dump(raw_config("unused")))
    return path


@pytest.fixture(scope="module")
def straight_run(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_1_process(PROBE, "--config", config_file, "--probe", out / "p.json", f"output.dir={out / 'run'}",
                           "checkpoint.async_save=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def folder_contents(folder):
    """What a checkpoint holds, read back: tensors, optimizer state and RNG states, trainer state."""
    from accelerate.utils.other import load

    files = sorted(checkpoint.files.list_files(folder))
    return {
        "files": [f for f in files if f != "manifest.json"],
        "model": load_file(folder / "model.safetensors"),
        "optimizer": torch.load(folder / "optimizer.bin", weights_only=True),
        "rng": load(folder / "random_states_0.pkl"),
        "state": json.loads((folder / "trainer_state.json").read_text()),
    }


def test_async_and_sync_saves_write_the_same_checkpoint(tmp_path):
    for mode in ("sync", "async"):
        raw = raw_config(tmp_path / mode)
        raw["checkpoint"]["async_save"] = mode == "async"
        raw["checkpoint"]["save_every_steps"] = 2  # mid-epoch saves too (RNG and data position inside an epoch)
        trainer = Trainer(config_from_dict(raw))
        assert trainer.async_save == (mode == "async")
        assert trainer.train() == "finished"
    for name in ("step_00000002", "step_00000004", "last", "best"):
        sync, asynchronous = (folder_contents(tmp_path / m / "checkpoints" / name) for m in ("sync", "async"))
        assert sync["files"] == asynchronous["files"], name
        for key in ("model", "optimizer", "state"):
            assert_same_tensors(sync[key], asynchronous[key], f"{name}.{key}")
        assert torch.equal(sync["rng"]["torch_manual_seed"], asynchronous["rng"]["torch_manual_seed"]), name
        assert sync["rng"]["random_state"] == asynchronous["rng"]["random_state"], name
        checkpoint.verify(tmp_path / "async/checkpoints" / name)
    log = (tmp_path / "async/train.log").read_text()
    assert "started in the background" in log


@pytest.mark.parametrize("kill_after_steps", [0, 2])
def test_sigkill_during_a_background_write_resumes_exactly(config_file, straight_run, tmp_path, kill_after_steps):
    """The epoch-2 checkpoint (step 6) is being written slowly in the background while training goes on;
    kill -9 lands 0 or 2 optimizer steps after its write started."""
    run = f"output.dir={tmp_path / 'run'}"
    proc = start_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                           "--slow-save", 30, "--slow-save-step", 6)
    read_lines_until(proc, lambda line: line.startswith("WRITING-MANIFEST") and "step_00000006" in line, 120)
    for step in range(7, 7 + kill_after_steps):  # training goes on while the checkpoint is written
        read_lines_until(proc, lambda line, s=step: f" step {s}/" in line, 60)
    proc.kill()
    finish(proc, 30)
    assert proc.returncode == -signal.SIGKILL
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / ".tmp-step_00000006").is_dir()  # half written, never visible
    assert checkpoint.read_state(ckpts / "last")["trainer"]["global_step"] == 3  # the previous one is in use

    resumed = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", run,
                            "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "run/train.log").read_text()
    assert f"resumed from {ckpts / 'last'}: epoch 2, batch 0, step 3" in log
    assert_resumed_equals_straight(straight_run, tmp_path)


def test_sigterm_with_a_write_in_flight_exits_75_after_it_is_published(config_file, straight_run, tmp_path):
    """Step 3's checkpoint takes 4 s to publish; a SIGTERM meanwhile must wait for it, then write and publish
    the stopping step's, and only then exit 75."""
    run = f"output.dir={tmp_path / 'run'}"
    proc = start_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "first.json", run,
                           "--slow-save", 4, "--slow-save-step", 3)
    # Step 3's checkpoint is in its 4 s manifest write: the signal comes while it is in flight.
    read_lines_until(proc, lambda line: line.startswith("WRITING-MANIFEST") and "step_00000003" in line, 120)
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc, 90)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    ckpts = tmp_path / "run/checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # nothing half written left behind
    assert {"best", "last", "step_00000003"} <= set(names)  # the one in flight was published
    stopped_at = checkpoint.read_state(ckpts / "last")["trainer"]["global_step"]
    assert stopped_at > 3  # a later step's checkpoint, written after the one in flight, is `last`
    log = (tmp_path / "run/train.log").read_text()
    assert f"saving a checkpoint at step {stopped_at}" in log
    for folder in ckpts.iterdir():
        checkpoint.verify(folder)
    resumed = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", run,
                            "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_equals_straight(straight_run, tmp_path)


class TiedNet(torch.nn.Module):
    """One convolution registered under two names (`mid`, `mid_again`): tied weights, as in language models
    whose output layer shares the embedding."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.mid = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.mid_again = self.mid
        self.out = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return self.out(self.mid_again(torch.relu(self.mid(torch.relu(self.inp(x))))))


def test_a_snapshot_of_tied_weights_writes_what_a_synchronous_save_writes(tmp_path):
    from accelerate import Accelerator

    from cr_accel.checkpoint.async_writer import take_snapshot

    acc = Accelerator(cpu=True)
    model = acc.prepare(TiedNet())
    optimizer = acc.prepare(torch.optim.AdamW(model.parameters(), lr=0.1))
    model(torch.randn(2, 1, 8, 8)).square().mean().backward()
    optimizer.step()
    acc.save_state(str(tmp_path / "sync"))
    snapshot = take_snapshot(acc)
    assert snapshot.model_states[0]["mid.weight"] is snapshot.model_states[0]["mid_again.weight"]
    (tmp_path / "async").mkdir()
    snapshot.write(tmp_path / "async")
    sync, asynchronous = (load_file(tmp_path / m / "model.safetensors") for m in ("sync", "async"))
    assert len(sync) == 6 and sync.keys() == asynchronous.keys()  # one of the two tied names, in both
    assert_same_tensors(sync, asynchronous)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    acc.load_state(str(tmp_path / "async"))  # both names come back, still one tensor
    assert_same_tensors(model.state_dict(), trained)
    assert model.mid.weight is model.mid_again.weight
