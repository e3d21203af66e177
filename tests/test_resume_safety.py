"""A run never silently starts over, and a damaged checkpoint is refused in one message, never executed.

The attacks here fix the manifest after tampering (an attacker who can write the folder can rewrite it),
so only the loading itself stands between the file and the process."""

import hashlib
import json
import os
import pickle

import pytest

from cr_accel import checkpoint
from cr_accel.config import config_from_dict, parse_yaml
from cr_accel.trainer import Trainer
from tests.runners import ROOT, run_1_process

MARKER = "/tmp/cr_accel_pwned_marker"


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    """A finished 3-epoch run: last/ at step 12, step_00000008/ and step_00000012/ in the pool."""
    out = tmp_path_factory.mktemp("pristine")
    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4)
    raw["data"].update(num_train=32, num_val=16, batch_size=8)
    raw["training"].update(epochs=3)
    raw["checkpoint"].update(save_every=1, keep_last_n=2)
    raw["output"]["dir"] = str(out / "run")
    assert Trainer(config_from_dict(raw)).train() == "finished"
    return out / "run"


@pytest.fixture
def run(pristine_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(pristine_run, copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(str(pristine_run), str(copy)))
    return copy


def refresh_manifest(folder):
    """Re-hash every file the manifest lists, and list new files: the tamperer's last step."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in checkpoint.files.list_files(folder):
        if name != "manifest.json":
            manifest["files"][name] = {"size": (folder / name).stat().st_size,
                                       "sha256": checkpoint.files.sha256(folder / name)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def plant_pickle(folder, name):
    with open(folder / name, "wb") as f:
        pickle.dump({"torch_manual_seed": Payload()}, f)
    refresh_manifest(folder)


def resume(run, where="latest", *overrides):
    return run_1_process(ROOT / "train.py", "--config", run / "config.yaml", "training.epochs=4", *overrides,
                         "--allow-config-change", "--resume_from_checkpoint", where)


def tree_fingerprint(root):
    """Every path under `root` with its bytes' hash and its mtime: "touches nothing" made checkable."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            stat = os.lstat(path)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "dir"
            found[os.path.relpath(path, root)] = (digest, stat.st_mtime_ns)
    return found


def resumed_from(run):
    lines = [line for line in (run / "train.log").read_text().splitlines() if " resumed from " in line]
    return lines[-1].split(" resumed from ")[1].split(":")[0]


@pytest.fixture(autouse=True)
def no_marker():
    if os.path.exists(MARKER):
        os.remove(MARKER)
    yield
    assert not os.path.exists(MARKER), "a planted pickle was executed"


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_latest_falls_back_past_a_malicious_pickle(run, name):
    ckpts = run / "checkpoints"
    for newest in ("last", "best", "step_00000012"):  # step 12 three times: all must be passed over
        plant_pickle(ckpts / newest, name)
    result = resume(run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_from(run) == str(ckpts / "step_00000008")
    log = (run / "train.log").read_text()
    for folder in ("last", "best", "step_00000012"):
        assert f"skipping checkpoint {ckpts / folder}:" in log
    assert "weights-only load refuses" in log


def test_an_explicit_path_to_a_malicious_checkpoint_exits_2_without_a_traceback(run):
    plant_pickle(run / "checkpoints/last", "random_states_0.pkl")
    before = tree_fingerprint(run)
    result = resume(run, run / "checkpoints/last")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert "random_states_0.pkl` cannot be loaded" in result.stderr
    assert tree_fingerprint(run) == before


def test_latest_with_every_checkpoint_damaged_exits_2_and_touches_nothing(run):
    ckpts = run / "checkpoints"
    plant_pickle(ckpts / "last", "optimizer.bin")
    (ckpts / "step_00000012/model.safetensors").write_bytes(b"garbage")  # checksum no longer matches
    (ckpts / "step_00000008/manifest.json").unlink()  # incomplete
    (ckpts / "best/trainer_state.json").write_text("{}")  # and fixed manifest: no format
    refresh_manifest(ckpts / "best")
    before = tree_fingerprint(run)
    result = resume(run)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert "none of the 4 entries" in err and "starting over would throw their work away" in err
    for reason in ("last: checkpoint", "weights-only", "step_00000012: checkpoint", "truncated or changed",
                   "step_00000008: incomplete", "best: checkpoint", "no format number"):
        assert reason in err, reason
    assert tree_fingerprint(run) == before


def test_latest_never_starts_over_when_the_folder_holds_anything(run):
    ckpts = run / "checkpoints"
    for folder in ckpts.iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    (ckpts / "notes.txt").write_text("mine")
    result = resume(run)
    assert result.returncode == 2 and "notes.txt: not a checkpoint folder" in result.stderr
    (ckpts / "notes.txt").unlink()
    result = resume(run)  # empty: this really is a fresh start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(it holds none at all): starting from scratch" in (run / "train.log").read_text()


@pytest.mark.parametrize("field, value", [("global_step", "12"), ("epoch", None), ("world_size", 1.5)])
def test_wrong_types_in_the_trainer_state_are_refused(run, field, value):
    last = run / "checkpoints/last"
    state = json.loads((last / "trainer_state.json").read_text())
    state["parts"]["trainer"][field] = value
    (last / "trainer_state.json").write_text(json.dumps(state))
    refresh_manifest(last)
    result = resume(run, last)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"`{field}` is {value!r}" in result.stderr


def test_a_symlinked_model_file_is_refused(run, tmp_path):
    last = run / "checkpoints/last"
    target = tmp_path / "elsewhere.safetensors"
    (last / "model.safetensors").rename(target)
    (last / "model.safetensors").symlink_to(target)
    result = resume(run, last)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "`model.safetensors` is a symbolic link" in result.stderr


def test_verify_walks_into_folders(run):
    last = run / "checkpoints/last"
    (last / "pytorch_model_fsdp_0").mkdir()
    (last / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="unexpected file `pytorch_model_fsdp_0/__0_0.distcp`"):
        checkpoint.verify(last)
    refresh_manifest(last)
    with pytest.raises(checkpoint.CheckpointError, match="never holds"):
        checkpoint.verify(last)  # listed, but not part of the plain layout the folder holds
