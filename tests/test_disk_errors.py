"""When the disk says no: a read-only output folder and a disk that fills up during a checkpoint, for real (a
read-only bind mount and a small tmpfs in a mount namespace of the test's own, `unshare -rm`). Each ends in
one line naming the path (and for a full disk the free space and the checkpoint's size), exit 2, no
traceback, and the earlier checkpoint intact and resumable."""

import shutil
import subprocess
import sys

import pytest

from cr_accel import checkpoint
from tests.runners import PROBE, ROOT, clean_env, run_1_process, small_config_file

PYTHON = sys.executable


def in_mount_namespace(script, timeout=180):
    """`bash -c script` as root of a user and mount namespace of its own: mounts made there vanish with it."""
    unshare = shutil.which("unshare")
    assert unshare, "the disk tests need util-linux's unshare (Debian package util-linux)"
    return subprocess.run([unshare, "--user", "--map-root-user", "--mount", "bash", "-euc", script], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return small_config_file(tmp_path_factory.mktemp("cfg"), "disk.yaml",
                             data={"num_train": 64, "num_val": 16}, training={"epochs": 3},
                             checkpoint={"save_every": 1})


def test_a_read_only_output_dir_is_refused_before_anything_runs(config_file, tmp_path):
    (tmp_path / "ro").mkdir()
    out = tmp_path / "ro/runs/first"
    result = in_mount_namespace(
        f"mount --bind {tmp_path / 'ro'} {tmp_path / 'ro'}; mount -o remount,bind,ro {tmp_path / 'ro'}; "
        f"{PYTHON} train.py --config {config_file} output.dir={out} && echo EXIT 0 || echo EXIT $?")
    assert result.stdout.strip().endswith("EXIT 2"), result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stderr.strip() == (f"error: output.dir `{out}` cannot be written: `{tmp_path / 'ro'}` is not writable "
                                     "(read-only file system); choose a folder you can write to, e.g. "
                                     "output.dir=runs/new"), result.stderr[-3000:]
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_full_disk_during_a_checkpoint_exits_2_and_keeps_the_earlier_one(config_file, tmp_path, async_save):
    """The epoch-1 checkpoint (step 2) is written; then the disk fills up (probe --fill-disk-after-step 3) and
    the epoch-2 checkpoint cannot be: exit 2, one line with the free space and the checkpoint's size, the
    half-written folder gone, step 2's checkpoint intact, and a resume from it finishes the run."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    result = in_mount_namespace(
        f"mount -t tmpfs -o size=8m tmpfs {disk}; "
        f"{PYTHON} {PROBE} --config {config_file} --probe {tmp_path / 'first.json'} output.dir={disk / 'run'} "
        f"checkpoint.async_save={str(async_save).lower()} --fill-disk-after-step 3 && echo EXIT 0 || echo EXIT $?; "
        f"cp -a {disk / 'run'} {kept}")
    assert result.stdout.strip().endswith("EXIT 2"), result.stdout[-2000:] + result.stderr[-3000:]
    assert "DISK-FILLED" in result.stdout
    error = result.stderr.strip()
    assert "Traceback" not in error and error.count("error:") == 1, error[-3000:]
    size_mb = sum(e["size"] for e in checkpoint.verify(kept / "checkpoints/last")["files"].values()) / 2**20
    assert error.startswith(f"error: the checkpoint of step 4 could not be written: the disk holding "
                            f"`{disk / 'run/checkpoints'}` is full ("), error
    assert f" MB free; it needs about {size_mb:.1f} MB). Free some space there, or point output.dir at a larger " \
           "disk. The earlier checkpoints are intact: resume with --resume_from_checkpoint latest once there is " \
           "room" in error, error
    ckpts = kept / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last", "step_00000002"]  # no .tmp-* left
    assert checkpoint.read_state(ckpts / "last")["trainer"]["global_step"] == 2

    resumed = run_1_process(PROBE, "--config", config_file, "--probe", tmp_path / "p.json", f"output.dir={kept}",
                            "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (kept / "train.log").read_text()
    assert f"resumed from {ckpts / 'last'}: epoch 2, batch 0, step 2" in log
    assert "training finished after 3 epochs, 6 optimizer steps" in log
