"""Crashes at the worst moments of checkpointing, and what the next start makes of them.

One process, in this process (a Trainer per run): a crash is an exception raised at the chosen point, which
leaves the files exactly as a killed process would (no checkpoint is written on the way out of a failed run).
"""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from cr_accel import checkpoint
from cr_accel.callbacks import Callback
from cr_accel.config import config_from_dict, parse_yaml
from cr_accel.trainer import Trainer
from tests.runners import ROOT, metric_rows, newest_checkpoints, resumed_from

# 32 samples, batch 8: 4 optimizer steps per epoch, 3 epochs. Saves: every 3 steps (3, 6, 9, 12) and at every
# epoch end (4, 8, 12: periodic + last, best when val_loss improved); the pool keeps the newest 3.
POOL_AT_THE_END = ["step_00000008", "step_00000009", "step_00000012"]


def cfg_for(run_dir):
    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4, dropout=0.2)
    raw["data"].update(num_train=32, num_val=16, batch_size=8)
    raw["training"].update(epochs=3)
    raw["checkpoint"].update(save_every=1, save_every_steps=3, keep_last_n=3)
    raw["output"]["dir"] = str(run_dir)
    return config_from_dict(raw)


def fresh_accelerate_state():
    """Between two Trainers in one test, as between two processes (conftest does it between tests)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class Crash(Exception):
    pass


class CrashAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, state):
        step = state.step
        if step == self.step:
            raise Crash(f"crash after optimizer step {step}")


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def listing(ckpts):
    return sorted(p.name for p in ckpts.iterdir())


def step_of(folder):
    checkpoint.verify(folder)
    return checkpoint.read_state(folder)["trainer"]["global_step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    fresh_accelerate_state()
    run = tmp_path_factory.mktemp("straight") / "run"
    trainer = Trainer(cfg_for(run))
    assert trainer.train() == "finished" and trainer.global_step == 12
    result = {"weights": weights(trainer), "rows": metric_rows(run), "listing": listing(run / "checkpoints")}
    fresh_accelerate_state()
    return result


def resume_and_check(run, straight, expected_step):
    """Resume `latest` in a new Trainer: it must start from the newest checkpoint (at `expected_step`) and
    end like the straight run."""
    newest = newest_checkpoints(run / "checkpoints")
    assert {step_of(p) for p in newest} == {expected_step}
    fresh_accelerate_state()
    resumed = Trainer(cfg_for(run))
    assert resumed.train(resume_from_checkpoint="latest") == "finished"
    [start] = resumed_from((run / "train.log").read_text())
    assert start in newest, (start, newest)
    assert resumed.global_step == 12
    ours = weights(resumed)
    assert ours.keys() == straight["weights"].keys()
    for k in ours:
        assert torch.equal(ours[k], straight["weights"][k]), k
    assert metric_rows(run) == straight["rows"]
    assert listing(run / "checkpoints") == straight["listing"]


# ---------------------------------------------------------------- a crash inside a publish of last/


def crash_between_the_renames(monkeypatch):
    """`last` -> `.old-last` done, `.tmp-step_N` -> `last` not yet: no `last/` on disk."""
    rename = Path.rename

    def crashing_rename(self, target):
        target = Path(target)
        if self.name.startswith(".tmp-step_") and target.name == "last" and (target.parent / ".old-last").exists():
            raise Crash("between the two renames of publishing last/")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crashing_rename)


def crash_before_the_old_one_is_discarded(monkeypatch):
    """Both renames done: the new `last/` (complete) and `.old-last` side by side."""
    discard = checkpoint.store._discard

    def crashing_discard(folder):
        if folder.name == ".old-last":
            raise Crash("after the renames, before .old-last was discarded")
        return discard(folder)

    monkeypatch.setattr(checkpoint.store, "_discard", crashing_discard)


@pytest.mark.parametrize("crash, last_on_disk, survivor_step", [
    (crash_between_the_renames, None, 4),
    (crash_before_the_old_one_is_discarded, "complete", 8),
    # The same, and then last/ lost its manifest: an incomplete last/ must give way to .old-last.
    (crash_before_the_old_one_is_discarded, "incomplete", 4),
], ids=["no-last", "complete-last", "incomplete-last"])
def test_recover_after_a_crash_while_publishing_last(straight, tmp_path, monkeypatch, crash, last_on_disk,
                                                     survivor_step):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    crashed = Trainer(cfg_for(run))
    with monkeypatch.context() as patch:  # the epoch-2 save (step 8) is the first to replace a last/
        crash(patch)
        with pytest.raises(Crash):
            crashed.train()
    assert step_of(ckpts / ".old-last") == 4  # epoch 1's, moved aside
    assert step_of(ckpts / "step_00000008") == 8  # published before last/ in the same save
    if last_on_disk is None:
        assert not (ckpts / "last").exists()
        assert (ckpts / ".tmp-step_00000008" / checkpoint.MANIFEST).is_file()  # complete, never renamed
    else:
        assert step_of(ckpts / "last") == 8
        if last_on_disk == "incomplete":
            (ckpts / "last" / checkpoint.MANIFEST).unlink()

    crashed.checkpoints.recover()
    assert not [name for name in listing(ckpts) if name.startswith(".")], listing(ckpts)
    assert step_of(ckpts / "last") == survivor_step

    # The newest is step 8: step_00000008/ (and best/ when epoch 2 improved), or last/ where it survived.
    if survivor_step == 8:
        assert newest_checkpoints(ckpts) == {ckpts / "last"}
    resume_and_check(run, straight, expected_step=8)


# ---------------------------------------------------------------- save_every_steps, rotation, mid-epoch resume


def test_step_checkpoints_rotate_and_a_crash_resumes_from_the_newest_mid_epoch(straight, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    assert straight["listing"] == ["best", "last", *POOL_AT_THE_END]
    with pytest.raises(Crash):
        Trainer(cfg_for(run), callbacks=[CrashAtStep(10)]).train()
    # Saved at steps 3, 4, 6, 8, 9: the newest three are kept; last/ is epoch 2's (step 8).
    assert listing(ckpts) == ["best", "last", "step_00000006", "step_00000008", "step_00000009"]
    assert step_of(ckpts / "last") == 8
    newest = checkpoint.read_state(ckpts / "step_00000009")["trainer"]
    assert (newest["epoch"], newest["batch_in_epoch"], newest["global_step"]) == (2, 1, 9)  # inside epoch 3
    for name in listing(ckpts):
        checkpoint.verify(ckpts / name)

    assert newest_checkpoints(ckpts) == {ckpts / "step_00000009"}  # newer than last/ (step 8)
    resume_and_check(run, straight, expected_step=9)
