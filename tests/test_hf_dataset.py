"""data.name=hf_dataset: Hugging Face datasets saved with save_to_disk, Parquet and Arrow files, read a row at a
time with their stored dtypes, images decoded like image_folder's, splits by name or by seeded ratio, nothing
downloaded, every bad input refused before training naming the split, row or column, and a real training run with
DataLoader workers."""

import io
import json
import math
import os
import pickle
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import cr_accel.data.hf as hf
from cr_accel.errors import UserError
from tests.runners import PROBE, ROOT, clean_env, metric_rows, own_data_config, run_1_process

hf_dataset = hf.hf_dataset
SHARED_KEYS = {
    "dataset", "task", "input_shape", "target_shape", "input_dtype", "target_dtype",
    "num_train", "num_val", "num_test", "data_range", "normalization", "source",
}  # fmt: skip


def numbers(seed, shape, dtype=np.float32):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return (rng.random(shape) * 4 - 1).astype(dtype)  # a range other than [0, 1]
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def pairs(n=20, seed=0):
    """uint8 inputs (Array3D) and float32 targets (nested lists) of per-sample shape 1 x 4 x 5."""
    x, y = numbers(seed, (n, 1, 4, 5), np.uint8), numbers(seed + 1, (n, 1, 4, 5))
    features = datasets.Features({"inputs": datasets.Array3D((1, 4, 5), "uint8"),
                                  "targets": datasets.List(datasets.List(datasets.List(datasets.Value("float32"))))})
    return datasets.Dataset.from_dict({"inputs": x, "targets": y}, features=features), x, y


def labelled(n, labels, seed=0, names=("ant", "bee", "cat", "dog")):
    features = datasets.Features({"features": datasets.List(datasets.Value("float64")),
                                  "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"features": numbers(seed, (n, 3), np.float64), "label": labels},
                                      features=features)


# ---------------------------------------------------------------- the builder's contract


def test_importing_cr_accel_needs_neither_datasets_nor_pyarrow():
    code = ("import sys; sys.modules['datasets'] = sys.modules['pyarrow'] = None; "
            "import cr_accel, cr_accel.data, cr_accel.cli; print(sorted(cr_accel.data.DATASETS.names()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hf_dataset" in result.stdout


def test_without_datasets_installed_the_error_names_the_extra(tmp_path, monkeypatch):
    pairs(4)[0].save_to_disk(tmp_path / "d")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if it were not installed
    with pytest.raises(UserError, match=r"`datasets` library, which is not installed: pip install -e '\.\[hf\]'"):
        hf_dataset(seed=0, path=str(tmp_path / "d"))


# ---------------------------------------------------------------- save_to_disk


def test_reconstruction_pairs_keep_their_stored_dtypes_and_split_by_a_seeded_ratio(tmp_path):
    dataset, x, y = pairs(20)
    dataset.save_to_disk(tmp_path / "d")
    splits = hf_dataset(seed=3, path=str(tmp_path / "d"), val_ratio=0.25)
    meta = splits.metadata
    assert SHARED_KEYS <= meta.keys() and json.loads(json.dumps(meta)) == meta
    assert (meta["task"], meta["input_shape"], meta["target_shape"]) == ("reconstruction", [1, 4, 5], [1, 4, 5])
    assert (meta["input_dtype"], meta["target_dtype"], meta["normalization"]) == ("uint8", "float32", None)
    assert (meta["num_train"], meta["num_val"], meta["num_test"]) == (15, 5, 0) == (15, len(splits.val), 0)
    assert meta["source"]["split"] == {"val_ratio": 0.25, "seed": 3} and meta["source"]["format"] == "save_to_disk"
    rows = {}
    for part in (splits.train, splits.val):
        for i, (a, b) in enumerate(samples(part)):
            row = part.row(i)
            assert a.dtype == torch.uint8 and b.dtype == torch.float32
            assert torch.equal(a, torch.from_numpy(x[row])) and torch.equal(b, torch.from_numpy(y[row]))
            rows[row] = part is splits.val
    assert sorted(rows) == list(range(20))  # a partition of the rows
    train_rows = [splits.train.row(i) for i in range(15)]
    assert meta["data_range"] == [float(y[train_rows].min()), float(y[train_rows].max())]  # training targets only
    again, other = (hf_dataset(seed=s, path=str(tmp_path / "d"), val_ratio=0.25) for s in (3, 4))
    assert torch.equal(again.val.index, splits.val.index) and not torch.equal(other.val.index, splits.val.index)
    assert hf_dataset(seed=3, path=str(tmp_path / "d"), data_range=[-1, 3]).metadata["data_range"] == [-1.0, 3.0]


def test_a_datasetdict_validates_on_its_validation_split_and_classifies_by_classlabel(tmp_path):
    dd = datasets.DatasetDict({"train": labelled(12, [0, 1, 2] * 4), "validation": labelled(4, [2, 1, 0, 1], 1),
                               "test": labelled(3, [1, 1, 2], 2)})
    dd.save_to_disk(tmp_path / "d")
    splits = hf_dataset(seed=0, path=str(tmp_path / "d"), input_column="features", target_column="label",
                        test_split="test")
    meta = splits.metadata
    assert (meta["task"], meta["target_shape"], meta["target_dtype"], meta["data_range"]) == (
        "classification", [], "int64", None)
    assert meta["num_classes"] == 4 and meta["classes"] == ["ant", "bee", "cat", "dog"]  # the ClassLabel's, not max+1
    assert (meta["num_train"], meta["num_val"], meta["num_test"]) == (12, 4, 3)
    assert meta["source"]["split"] == {"val_split": "validation"}
    assert meta["source"]["test_split"] == {"test_split": "test"}
    assert [int(label) for _, label in samples(splits.val)] == [2, 1, 0, 1]
    x, label = splits.test[2]
    assert label.dtype == torch.int64 and label.shape == () and int(label) == 2
    assert x.dtype == torch.float64 and torch.equal(x, torch.from_numpy(numbers(2, (3, 3), np.float64)[2]))
    ratio = hf_dataset(seed=0, path=str(tmp_path / "d"), input_column="features", target_column="label",
                       val_ratio=0.25)  # a ratio given: held out of train, the validation split left alone
    assert (ratio.metadata["num_train"], ratio.metadata["num_val"]) == (9, 3)


def test_plain_integer_labels_count_classes_and_a_test_ratio_leaves_validation_as_it_was(tmp_path):
    labels = np.arange(30, dtype=np.int32) % 5
    datasets.Dataset.from_dict({"inputs": numbers(0, (30, 2, 3)), "targets": labels}).save_to_disk(tmp_path / "d")
    without = hf_dataset(seed=1, path=str(tmp_path / "d"), val_ratio=0.2)
    split = hf_dataset(seed=1, path=str(tmp_path / "d"), val_ratio=0.2, test_ratio=0.3)
    assert torch.equal(split.val.index, without.val.index)  # the test set comes after validation in the shuffle
    train, val, test = (set(s.index.tolist()) for s in (split.train, split.val, split.test))
    assert (len(train), len(val), len(test)) == (15, 6, 9) and not (train & val or train & test or val & test)
    meta = split.metadata
    assert (meta["task"], meta["num_classes"], meta["target_dtype"], meta["num_test"]) == (
        "classification", 5, "int64", 9)
    assert "classes" not in meta and meta["source"]["test_split"] == {"test_ratio": 0.3, "seed": 1}
    assert split.train[0][1].dtype == torch.int64 and without.metadata["num_test"] == 0 and without.test is None


def test_a_single_dataset_without_a_validation_split_holds_out_a_tenth(tmp_path):
    pairs(20)[0].save_to_disk(tmp_path / "d")
    meta = hf_dataset(seed=0, path=str(tmp_path / "d")).metadata
    assert (meta["num_train"], meta["num_val"], meta["source"]["split"]) == (18, 2, {"val_ratio": 0.1, "seed": 0})


# ---------------------------------------------------------------- images


def test_image_columns_are_decoded_and_scaled_like_image_folder(tmp_path):
    gray8, deep16 = numbers(0, (6, 5, 7), np.uint8), numbers(1, (6, 5, 7), np.uint16)
    rgb = numbers(2, (6, 5, 7, 3), np.uint8)
    features = datasets.Features({"noisy": datasets.Image(), "clean": datasets.Image(), "color": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"noisy": [{"bytes": png(a), "path": None} for a in gray8],
            "clean": [{"bytes": png(a), "path": None} for a in deep16],
            "color": [{"bytes": png(a), "path": None} for a in rgb], "label": [0, 1] * 3}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "d")
    splits = hf_dataset(seed=0, path=str(tmp_path / "d"), input_column="noisy", target_column="clean",
                        val_ratio=0.5)
    meta = splits.metadata
    assert (meta["task"], meta["input_shape"], meta["target_shape"], meta["data_range"]) == (
        "reconstruction", [1, 5, 7], [1, 5, 7], [0.0, 1.0])
    assert meta["source"]["stored"] == {"inputs": "uint8 images", "targets": "uint16 images"}
    x, y = splits.train[1]
    row = splits.train.row(1)
    assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape == (1, 5, 7)
    assert torch.equal(x[0], torch.from_numpy(gray8[row].astype(np.float32)) / 255)
    assert torch.equal(y[0], torch.from_numpy(deep16[row].astype(np.float32)) / 65535)
    classes = hf_dataset(seed=0, path=str(tmp_path / "d"), input_column="color", target_column="label",
                         val_ratio=0.5)
    image, label = classes.val[0]
    assert image.shape == (3, 5, 7) and classes.metadata["input_shape"] == [3, 5, 7] and label.dtype == torch.int64
    assert torch.equal(image, torch.from_numpy(rgb[classes.val.row(0)].astype(np.float32)).permute(2, 0, 1) / 255)


# ---------------------------------------------------------------- Parquet and Arrow files


def test_parquet_files_named_by_split_are_converted_into_the_cache_only(tmp_path):
    folder, cache = tmp_path / "pq" / "data", tmp_path / "cache"
    folder.mkdir(parents=True)
    cache.mkdir()
    dataset, x, y = pairs(24)
    dataset.select(range(10)).to_parquet(folder / "train-00000-of-00002.parquet")
    dataset.select(range(10, 20)).to_parquet(folder / "train-00001-of-00002.parquet")
    dataset.select(range(20, 24)).to_parquet(folder / "validation-00000-of-00001.parquet")
    before = sorted(p.name for p in (tmp_path / "pq").rglob("*"))
    splits = hf_dataset(seed=0, path=str(tmp_path / "pq"), cache_dir=str(cache))
    assert (len(splits.train), len(splits.val)) == (20, 4)  # the validation files, found by name
    assert all(torch.equal(a, torch.from_numpy(x[i])) and torch.equal(b, torch.from_numpy(y[i]))
               for i, (a, b) in enumerate(samples(splits.train) + samples(splits.val)))
    assert (splits.metadata["source"]["format"], splits.metadata["source"]["cache_dir"]) == ("parquet", str(cache))
    assert sorted(p.name for p in (tmp_path / "pq").rglob("*")) == before  # nothing written next to the data
    assert len(list(cache.rglob("*.arrow"))) == 2  # one per split read, memory-mapped from there
    again = hf_dataset(seed=0, path=str(tmp_path / "pq"), cache_dir=str(cache))
    assert len(list(cache.rglob("*.arrow"))) == 2 and len(again.train) == 20  # converted once
    datasets.Dataset.from_dict({"inputs": x[:3], "targets": y[:3]}, features=dataset.features).to_parquet(
        folder / "train-00001-of-00002.parquet")  # the same name, other rows: converted again
    assert len(hf_dataset(seed=0, path=str(tmp_path / "pq"), cache_dir=str(cache)).train) == 13


def test_one_parquet_file_and_loose_arrow_files(tmp_path):
    dataset, x, y = pairs(10)
    dataset.to_parquet(tmp_path / "one.parquet")
    single = hf_dataset(seed=0, path=str(tmp_path / "one.parquet"), cache_dir=str(tmp_path), val_ratio=0.2)
    assert len(single.train) + len(single.val) == 10 and torch.equal(single.val[0][1], torch.from_numpy(
        y[single.val.row(0)]))
    dataset.select(range(6)).save_to_disk(tmp_path / "a")
    dataset.select(range(6, 10)).save_to_disk(tmp_path / "b")
    (tmp_path / "arrow").mkdir()
    for name in "ab":  # the Arrow file save_to_disk writes, alone: memory-mapped where it lies
        (tmp_path / name / "data-00000-of-00001.arrow").rename(tmp_path / "arrow" / f"{name}.arrow")
    splits = hf_dataset(seed=0, path=str(tmp_path / "arrow"), val_ratio=0.2)
    assert splits.metadata["source"]["format"] == "arrow" and len(splits.train) + len(splits.val) == 10
    assert torch.equal(splits.train[5][0], torch.from_numpy(x[splits.train.row(5)]))  # a.arrow, then b.arrow


# ---------------------------------------------------------------- workers, pickling, offline


def test_rows_pickle_small_and_load_in_worker_processes(tmp_path):
    pairs(20)[0].save_to_disk(tmp_path / "d")
    train = hf_dataset(seed=0, path=str(tmp_path / "d")).train
    copy = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 20_000  # the files' paths, not their rows
    expected = samples(train)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(expected, samples(copy)))
    loader = DataLoader(train, batch_size=4, num_workers=1, multiprocessing_context="spawn")  # pickled to it
    inputs = torch.cat([x for x, _ in loader])
    assert torch.equal(inputs, torch.stack([x for x, _ in expected]))


def test_loading_runs_with_the_offline_switches_on_and_puts_them_back(tmp_path, monkeypatch):
    pairs(4)[0].save_to_disk(tmp_path / "d")
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    seen, load = [], datasets.load_from_disk

    def recording(*args, **kwargs):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), os.environ["HF_DATASETS_OFFLINE"],
                     datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE, kwargs.get("keep_in_memory")))
        return load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_from_disk", recording)
    before = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    hf_dataset(seed=0, path=str(tmp_path / "d"), val_ratio=0.5)
    assert seen == [("1", "1", True, True, False)]  # offline, and memory-mapped rather than read into memory
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE) == before


# ---------------------------------------------------------------- bad data: one line naming the problem


def saved(rows, features=None):
    def make(root):
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(root / "d")
    return make


def saved_dict(**splits):
    def make(root):
        datasets.DatasetDict({name: datasets.Dataset.from_dict(rows) for name, rows in splits.items()}).save_to_disk(
            root / "d")
    return make


def parquet_files(**splits):
    def make(root):
        (root / "d").mkdir()
        for name, rows in splits.items():
            datasets.Dataset.from_dict(rows).to_parquet(root / "d" / f"{name}.parquet")
    return make


def not_a_dataset(root):
    (root / "d").mkdir()
    (root / "d" / "notes.txt").write_text("")


RAGGED = {"inputs": [[1.0, 2.0], [3.0, 4.0], [5.0], [6.0, 7.0]], "targets": [0, 1, 0, 1]}
TRAIN_TEST = {"train": {"x": [[1.0]] * 10, "y": [0, 1] * 5}, "test": {"x": [[1.0]] * 2, "y": [1, -1]}}
BAD = {
    "unknown-column": (saved({"pixels": [[1.0]] * 4, "label": [0] * 4}), {"target_column": "label"},
                       r"data\.input_column `inputs`: no such column in split `train` of `.*/d` \(its columns: "
                       r"pixels, label\); set data\.input_column"),
    "unknown-split": (saved_dict(train={"inputs": [[1.0]] * 4, "targets": [0] * 4},
                                 valid={"inputs": [[1.0]] * 2, "targets": [0] * 2}), {"val_split": "validaton"},
                      r"data\.val_split `validaton` is not a split of `.*/d`; did you mean `valid`\? \(its splits: "
                      r"train, valid\)"),
    "split-of-a-single-dataset": (saved(RAGGED), {"split": "test"},
                                  r"data\.split is `test`, but `.*/d` holds one dataset without splits"),
    "not-a-dataset-folder": (not_a_dataset, {}, r"`.*/d` is not a saved dataset \(no dataset_dict\.json or "
                                                r"state\.json\) and holds no \.parquet or \.arrow files \(it holds: "
                                                r"notes\.txt\)"),
    "a-url": (lambda root: None, {"path": "hf://datasets/user/name"}, r"is a URL; hf_dataset reads local data only"),
    "a-hub-name": (lambda root: None, {"path": "user/name"},
                   r"`user/name` does not exist .*never a Hub name: save a Hub dataset once"),
    "rows-of-varying-shape": (saved(RAGGED), {},
                              r'/d\["train"\]\[2\]\["inputs"\] has 1 entries along dimension 0, but '
                              r'.*/d\["train"\]\[0\]\["inputs"\] \(shape \[2\]\) has 2'),
    "a-missing-value": (saved({"inputs": [[1.0], None, [2.0]], "targets": [0.5, 1.0, 2.0]}), {},
                        r'd\["train"\]\[1\]\["inputs"\] holds a missing value'),
    "a-text-column": (saved({"inputs": ["a", "b"], "targets": [0, 1]}), {}, r"column `inputs` holds string values"),
    "an-empty-saved-split": (saved_dict(train={"inputs": [[1.0]] * 4, "targets": [0] * 4},
                                        validation={"inputs": [], "targets": []}), {},
                             r"split `validation` of `.*/d` has no rows"),
    "an-empty-parquet-split": (parquet_files(train={"inputs": [[1.0]] * 4, "targets": [0.0] * 4},
                                             test={"inputs": [], "targets": []}), {"test_split": "test"},
                               r"split `test` of `.*/d` has no rows"),
    "val-split-and-ratio": (saved_dict(**TRAIN_TEST), {"val_split": "test", "val_ratio": 0.2},
                            r"data\.val_split and data\.val_ratio are both set"),
    "unlabelled-test-rows": (saved_dict(**TRAIN_TEST), {"input_column": "x", "target_column": "y",
                                                        "test_split": "test"},
                             r'd\["test"\]\[1\]\["y"\] has label -1, but class labels must be >= 0'),
    "validating-on-the-training-split": (saved_dict(**TRAIN_TEST), {"val_split": "train"},
                                         r"data\.val_split is `train`, the split of data\.split too"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_data_is_one_user_error_naming_the_problem(tmp_path, case):
    make, kwargs, message = BAD[case]
    make(tmp_path)
    kwargs = {"path": str(tmp_path / "d"), "cache_dir": str(tmp_path), **kwargs}
    with pytest.raises(UserError, match=message) as error:
        hf_dataset(seed=0, **kwargs)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- training


def run_config(folder, data_root, **data):
    return own_data_config(folder, {"name": "hf_dataset", "path": str(data_root), "val_ratio": 0.2, "batch_size": 4,
                                    **data})


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    """20 float32 1x8x8 pairs, saved with save_to_disk."""
    root = tmp_path_factory.mktemp("hf") / "pairs"
    x, y = numbers(0, (20, 1, 8, 8)), numbers(1, (20, 1, 8, 8))
    datasets.Dataset.from_dict({"inputs": x, "targets": y}).save_to_disk(root)
    return root


def test_a_run_trains_with_rows_read_by_2_workers(tmp_path, train_folder):
    """The whole path: the config's data section, the preflight, DataLoader workers reading rows (forked), two
    epochs validated with the metadata's data_range."""
    result = run_1_process(PROBE, "--config", run_config(tmp_path, train_folder, num_workers=2), "--probe",
                           tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metric_rows(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["val_loss"])) and float(r["val_psnr"]) > 0 for r in rows)
    environment = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert environment["dataset"]["dataset"] == "hf_dataset" and environment["dataset"]["num_train"] == 16
    assert json.loads((tmp_path / "p.json").read_text())["status"] == "finished"
