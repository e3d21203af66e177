"""The examples to start from: every config in configs/ trains one epoch, through `python train.py`, on the
example data that `scripts/make_example_data.py` writes; the example files are small and deterministic; the
configs mark the keys a user changes and point at the files the script writes by default."""

import csv
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cr_accel.config import parse_yaml
from tests.runners import ROOT, example_data_script

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.y*ml"))
SCRIPT = ROOT / "scripts" / "make_example_data.py"

# config -> the validation metric column its metrics.csv must have, beyond the ones every run writes.
EXAMPLES = {
    "own_images_reconstruction.yaml": "val_psnr",
    "own_data_classification.yaml": "val_accuracy",
    "own_model.yaml": "val_psnr",
    "own_image_folder.yaml": "val_psnr",
}
COMMON_COLUMNS = {"epoch", "step", "train_loss", "grad_norm", "val_loss", "best_val", "lr", "samples_per_s",
                  "epoch_time"}
MAX_BYTES = 300 * 1024  # "a few hundred KB at most", all files together


@pytest.fixture(scope="module")
def generated(tmp_path_factory, run_command):
    """The example data written by the script as a user runs it, into a fresh folder."""
    out = tmp_path_factory.mktemp("example_data")
    rc, stdout, stderr = run_command([sys.executable, SCRIPT, "--out", out], timeout=60)
    assert rc == 0, stderr
    return out


def read_header(metrics_csv):
    with open(metrics_csv, newline="") as f:
        return next(csv.reader(f))


def test_every_config_is_trained_here():
    """A new config in configs/ needs its row in EXAMPLES (the default job trains in test_config.py)."""
    assert set(CONFIGS) - {"default.yaml"} == set(EXAMPLES)


def contents(folder):
    """{path relative to `folder`: bytes} of every file under it."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_script_writes_small_deterministic_files(generated, tmp_path):
    files = sorted(p.name for p in generated.iterdir())
    assert files == sorted(example_data_script().FILES)
    assert sum(len(data) for data in contents(generated).values()) <= MAX_BYTES
    again = example_data_script().write_example_data(tmp_path)  # a second run, in process: the same bytes
    assert sorted(p.name for p in again) == files and contents(tmp_path) == contents(generated)

    with np.load(generated / "images.npz", allow_pickle=False) as archive:
        images = dict(archive)
        assert images["inputs"].shape == images["targets"].shape == (80, 1, 16, 16)
        assert images["inputs"].dtype == images["targets"].dtype == np.float32
        assert 0 <= images["targets"].min() and images["targets"].max() <= 1  # psnr's data range
    from PIL import Image

    pngs = generated / "image_folder"
    assert [len(list((pngs / side).glob("*.png"))) for side in ("inputs", "targets")] == [80, 80]
    for side in ("inputs", "targets"):  # images.npz's images, in 8 bits
        with Image.open(pngs / side / "007.png") as png:
            pixels = np.asarray(png)
        assert png.mode == "L" and np.array_equal(pixels, np.round(np.clip(images[side][7, 0], 0, 1) * 255))
    with np.load(generated / "features.npz", allow_pickle=False) as features:
        assert features["inputs"].shape == (300, 16) and features["inputs"].dtype == np.float32
        assert features["targets"].dtype == np.int64 and set(np.unique(features["targets"])) == {0, 1, 2}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_points_at_the_scripts_default_output_and_marks_what_to_change(name):
    text = (ROOT / "configs" / name).read_text()
    raw = parse_yaml(text)
    default_out = example_data_script().DEFAULT_OUT.relative_to(ROOT)
    path = Path(raw["data"]["path"])
    assert path.parent == default_out and path.name in example_data_script().FILES, raw["data"]["path"]
    assert text.startswith("# "), "a config starts with a comment saying what it is for"
    changed = re.findall(r"^\s*(\w+):.*# <- CHANGE", text, re.M)
    assert "path" in changed and 2 <= len(changed) <= 3, changed


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_trains_one_epoch_on_the_example_data(name, generated, tmp_path, run_train):
    data_file = generated / Path(parse_yaml((ROOT / "configs" / name).read_text())["data"]["path"]).name
    out = tmp_path / "run"
    rc, stdout, stderr = run_train("--config", f"configs/{name}", f"data.path={data_file}", f"output.dir={out}",
                                   "training.epochs=1")
    assert rc == 0, f"--- stderr ---\n{stderr[-3000:]}\n--- stdout ---\n{stdout[-2000:]}"
    header = read_header(out / "metrics.csv")
    assert COMMON_COLUMNS | {EXAMPLES[name]} <= set(header), header
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"]
    value = float(rows[0][EXAMPLES[name]])
    assert math.isfinite(value) and (value <= 1 if EXAMPLES[name] == "val_accuracy" else value > 0), value
    assert "training finished after 1 epochs" in stdout + stderr
