"""tensor_files on data that stays on disk (.safetensors files, folders of .npy pairs): the same samples, splits
and metadata as the whole-loaded formats, shard folders, bad shards, bounded memory, DataLoader workers."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from cr_accel.data import tensor_files
from cr_accel.data.tensor_store import FileColumn, TensorStore
from cr_accel.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _samples(n, start=0, classification=False, dtype=torch.float32):
    """Inputs (n, 2, 3, 3) whose first value is the sample id; targets twice the inputs, or labels 0..4."""
    inputs = torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(n + start)).to(dtype)
    inputs[:, 0, 0, 0] = torch.arange(start, start + n).to(dtype)
    targets = torch.arange(start, start + n) % 5 if classification else inputs * 2
    return inputs, targets


def _write(path, inputs, targets):
    """`path` as .pt (loaded whole), .safetensors, or a folder of inputs.npy/targets.npy (no suffix)."""
    path = Path(path)
    if path.suffix == ".pt":
        torch.save({"inputs": inputs, "targets": targets}, path)
    elif path.suffix == ".safetensors":
        save_file({"inputs": inputs.contiguous(), "targets": targets.contiguous()}, str(path))
    else:
        path.mkdir(parents=True)
        np.save(path / "inputs.npy", inputs.numpy())
        np.save(path / "targets.npy", targets.numpy())
    return path


def _without_source(metadata):
    return {k: v for k, v in metadata.items() if k != "source"}


def _assert_same_splits(on_disk, loaded):
    assert _without_source(on_disk.metadata) == _without_source(loaded.metadata)
    for split in ("train", "val", "test"):
        ours, theirs = getattr(on_disk, split), getattr(loaded, split)
        assert isinstance(ours, TensorStore)
        assert len(ours) == len(theirs)
        for a, b in zip(ours.tensors, theirs.tensors):
            assert a.dtype == b.dtype and torch.equal(a, b)
        for i in (0, len(ours) // 2, -1):
            for a, b in zip(ours[i], theirs[i]):
                assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["d.safetensors", "d"])
@pytest.mark.parametrize("classification", [False, True])
def test_on_disk_files_give_the_samples_splits_and_metadata_of_the_loaded_ones(tmp_path, layout, classification):
    data = _samples(2100, classification=classification)  # more than one 1024-sample chunk of the metadata pass
    _write(tmp_path / "d.pt", *data)
    on_disk_path = _write(tmp_path / layout, *data)
    kwargs = {"val_ratio": 0.2, "test_ratio": 0.1}
    on_disk = tensor_files(seed=3, path=str(on_disk_path), **kwargs)
    _assert_same_splits(on_disk, tensor_files(seed=3, path=str(tmp_path / "d.pt"), **kwargs))
    assert on_disk.metadata["source"]["train"] == [str(on_disk_path.resolve())]
    assert all(isinstance(column, FileColumn) for column in on_disk.train.parts[0])


def test_half_precision_and_a_val_path(tmp_path):
    train, val = _samples(40, dtype=torch.bfloat16), _samples(7, start=100, dtype=torch.bfloat16)
    _write(tmp_path / "t.pt", *train)
    _write(tmp_path / "v.pt", *val)
    _write(tmp_path / "t.safetensors", *train)
    _write(tmp_path / "v.safetensors", *val)
    on_disk = tensor_files(seed=0, path=str(tmp_path / "t.safetensors"), val_path=str(tmp_path / "v.safetensors"))
    loaded = tensor_files(seed=0, path=str(tmp_path / "t.pt"), val_path=str(tmp_path / "v.pt"))
    assert on_disk.metadata["input_dtype"] == "bfloat16"
    assert _without_source(on_disk.metadata) == _without_source(loaded.metadata)
    assert torch.equal(on_disk.val.tensors[0], val[0]) and torch.equal(on_disk.train[5][1], train[1][5])


def test_a_folder_of_shards_is_one_sequence_in_name_order(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    parts = {"a.safetensors": _samples(5), "b": _samples(3, start=10), "c.safetensors": _samples(4, start=20),
             "d.npz": _samples(2, start=30)}  # fmt: skip
    for name, pair in parts.items():
        if name.endswith(".npz"):
            np.savez(folder / name, inputs=pair[0].numpy(), targets=pair[1].numpy())
        else:
            _write(folder / name, *pair)
    (folder / "notes.txt").write_text("not data")
    (folder / "empty").mkdir()
    whole = [torch.cat([pair[k] for pair in parts.values()]) for k in (0, 1)]
    _write(tmp_path / "all.pt", *whole)
    on_disk = tensor_files(seed=1, path=str(folder), val_ratio=0.25)
    loaded = tensor_files(seed=1, path=str(tmp_path / "all.pt"), val_ratio=0.25)
    assert [Path(f).name for f in on_disk.metadata["source"]["train"]] == list(parts)
    assert _without_source(on_disk.metadata) == _without_source(loaded.metadata)
    for split in ("train", "val"):
        for a, b in zip(getattr(on_disk, split).tensors, getattr(loaded, split).tensors):
            assert torch.equal(a, b)
        assert [int(getattr(on_disk, split)[i][0][0, 0, 0]) for i in range(len(getattr(loaded, split)))] == (
            getattr(loaded, split).tensors[0][:, 0, 0, 0].long().tolist()
        )


def _truncated_safetensors(folder):
    path = _write(folder / "cut.safetensors", *_samples(6))
    path.write_bytes(path.read_bytes()[:-40])
    return path


def _truncated_npy(folder):
    path = _write(folder / "cut", *_samples(6))
    data = (path / "targets.npy").read_bytes()
    (path / "targets.npy").write_bytes(data[:-40])
    return path / "targets.npy"


def _dtype_mismatch(folder):
    inputs, targets = _samples(4, start=50)
    return _write(folder / "z.safetensors", inputs.double(), targets)


def _shape_mismatch(folder):
    inputs, targets = _samples(4, start=50)
    return _write(folder / "z", inputs[:, :1], targets)


def _missing_targets(folder):
    path = _write(folder / "z", *_samples(4, start=50))
    (path / "targets.npy").unlink()
    return path


def _fortran_order(folder):
    path = _write(folder / "z", *_samples(4, start=50))
    np.save(path / "inputs.npy", np.asfortranarray(_samples(4, start=50)[0].numpy()))
    return path / "inputs.npy"


@pytest.mark.parametrize("make, message", [
    (_truncated_safetensors, r"`.*cut\.safetensors` is cut off or corrupt: its header puts `targets`"),
    (_truncated_npy, r"`.*cut/targets\.npy` is cut off or corrupt"),
    (_dtype_mismatch, r"`.*z\.safetensors` has inputs \(`inputs`\) with per-sample shape \(2, 3, 3\) and dtype "
                      r"float64, but `.*a\.safetensors` has \(2, 3, 3\) and float32"),
    (_shape_mismatch, r"`.*z` has inputs \(`inputs`\) with per-sample shape \(1, 3, 3\)"),
    (_missing_targets, r"`.*z` has no `targets` tensor \(keys present: inputs\); set data\.target_key"),
    (_fortran_order, r"`.*z/inputs\.npy` is stored in Fortran order"),
])  # fmt: skip
def test_a_bad_shard_is_one_user_error_naming_it(tmp_path, make, message):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write(folder / "a.safetensors", *_samples(4))
    make(folder)
    with pytest.raises(UserError, match=message):
        tensor_files(seed=0, path=str(folder))


def test_a_lone_npy_file_says_how_to_pair_it(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(UserError, match=r"`.*x\.npy` is one \.npy file.*inputs\.npy and targets\.npy in one folder"):
        tensor_files(seed=0, path=str(tmp_path / "x.npy"))


def test_rows_are_copies_and_the_dataset_pickles_without_its_open_files(tmp_path):
    data = _samples(20)
    splits = tensor_files(seed=0, path=str(_write(tmp_path / "d.safetensors", *data)), val_ratio=0.2)
    x, _ = splits.train[0]  # opens the file in this process
    x += 1  # writable, and its own memory
    assert torch.equal(splits.train[0][0], data[0][0])
    again = pickle.loads(pickle.dumps(splits.train))
    assert all(column._handle is None for pair in again.parts for column in pair)
    assert torch.equal(again[3][1], splits.train[3][1])


def test_two_workers_give_the_batches_of_none(tmp_path):
    splits = tensor_files(seed=0, path=str(_write(tmp_path / "d", *_samples(64))), val_ratio=0.25)
    splits.train[0]  # a file opened before the workers start must not matter

    def batches(workers):
        loader = DataLoader(splits.train, batch_size=5, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(7))
        return list(loader)

    for (x0, y0), (x2, y2) in zip(batches(0), batches(2), strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


# Runs train.py in this process and reports its peak resident memory: VmHWM, which starts again at exec (ru_maxrss
# would keep the peak of the forked copy of the test process, a test process that just wrote 205 MB).
_PEAK_RSS_OF_TRAIN_PY = """
import re, runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
with open("/proc/self/status") as status:
    print("PEAK_RSS_MB", int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) / 1024, file=sys.stderr)
sys.exit(code)
"""


def _peak_rss_of_training_on(path, out):
    args = ["--config", "configs/own_data_classification.yaml", f"data.path={path}", f"output.dir={out}",
            "training.epochs=1", "model.in_features=2048", "model.hidden_sizes=[16]", "model.out_features=4",
            "data.batch_size=256", "data.val_ratio=0.02"]
    # glibc's dynamic mmap threshold keeps freed large blocks in the heap, moving the peak by +-20 MB from run to
    # run whatever the data; fixed thresholds (as bench/overhead.py uses) leave what the data path itself holds
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_TRAIN_PY, *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (Path(out) / "metrics.csv").read_text().count("\n") == 2  # the header and the one epoch
    return float(done.stderr.rpartition("PEAK_RSS_MB ")[2])


def _features_file(path, rows):
    """`rows` samples of 2,048 float32 features (8 KB each) and 4 class labels, written a block at a time."""
    inputs = torch.empty(rows, 2048)
    for start in range(0, rows, 5_000):
        inputs[start : start + 5_000].uniform_(generator=torch.Generator().manual_seed(start))
    save_file({"inputs": inputs, "targets": torch.arange(rows) % 4}, str(path))
    return path


def test_training_on_a_file_10x_larger_keeps_the_same_peak_memory(tmp_path):
    """train.py on 20 MB and on 205 MB of safetensors: the peak RSS of the whole run (build, statistics, an epoch,
    validation, checkpoints) barely moves, where loading the file would add its 185 MB."""
    small = _peak_rss_of_training_on(_features_file(tmp_path / "small.safetensors", 2_500), tmp_path / "small")
    big = _peak_rss_of_training_on(_features_file(tmp_path / "big.safetensors", 25_000), tmp_path / "big")
    assert big - small < 20, (small, big)  # measured: 364.0 and 364.3 MB


def test_large_samples_take_smaller_chunks_and_keep_the_statistics(tmp_path):
    # 32 KB a sample: the metadata passes take 512 samples at a time (STATS_BYTES), so the float64 sums may
    # differ from those of the whole tensor in the last bits; everything else is exact
    inputs = torch.rand(600, 2, 64, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 3.0]).view(
        1, 2, 1, 1)
    targets = inputs[:, :1, :2, :2] - 2
    splits = tensor_files(seed=0, path=str(_write(tmp_path / "d.safetensors", inputs, targets)), val_ratio=0.1)
    train_inputs, train_targets = splits.train.tensors
    stats = splits.metadata["normalization"]
    assert stats["mean"] == pytest.approx(train_inputs.double().mean(dim=(0, 2, 3)).tolist(), rel=1e-12)
    assert stats["std"] == pytest.approx(train_inputs.double().std(dim=(0, 2, 3), correction=0).tolist(), rel=1e-12)
    assert splits.metadata["data_range"] == [float(train_targets.min()), float(train_targets.max())]


def test_a_spawned_worker_opens_the_files_itself(tmp_path):
    # spawn pickles the dataset into the worker (fork would copy it): the parent's open file must not travel
    splits = tensor_files(seed=0, path=str(_write(tmp_path / "d.safetensors", *_samples(12))), val_ratio=0.25)
    splits.train[0]
    loader = DataLoader(splits.train, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([x for x, _ in loader]), splits.train.tensors[0])
