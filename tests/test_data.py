"""Tests for cr_accel.data: the synthetic reconstruction task and the user's own tensor files."""

import hashlib
import inspect
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cr_accel.data import DATASETS, DatasetSplits, synthetic_cr, tensor_files
from cr_accel.errors import UserError
from cr_accel.registry import check_kwargs

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_KEYS = {
    "dataset", "task", "input_shape", "target_shape", "input_dtype", "target_dtype",
    "num_train", "num_val", "num_test", "data_range", "normalization", "source",
}  # fmt: skip


def tensors(dataset):
    return dataset.tensors


def psnr(estimate, target, data_range=1.0):
    mse = torch.mean((estimate.double() - target.double()) ** 2)
    return float(10 * torch.log10(data_range**2 / mse))


# ---------------------------------------------------------------------------------------------------
# Registry contract: what the trainer and the README rely on
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, required", [("synthetic_cr", {}), ("tensor_files", {"path": "data.npz"}),
                                            ("image_folder", {"path": "images/"}), ("hf_dataset", {"path": "data/x"})])
def test_builders_are_registered_with_defaults_and_documented_parameters(name, required):
    builder = DATASETS.resolve(name)
    # Only seed (from the trainer) and path may lack a default.
    assert check_kwargs(builder, required, injected=("seed",)) == []
    doc = inspect.getdoc(builder)
    for param in inspect.signature(builder).parameters:
        if param != "seed":
            assert re.search(rf"^\s*{param}:", doc, re.MULTILINE), f"{name} docstring does not document {param}"


# ---------------------------------------------------------------------------------------------------
# synthetic_cr
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_synthetic():
    return synthetic_cr(seed=0)


def test_synthetic_default_shapes_sizes_and_types(default_synthetic):
    splits = default_synthetic
    assert isinstance(splits, DatasetSplits)
    assert (len(splits.train), len(splits.val)) == (256, 64)
    x, y = splits.train[3]
    assert x.shape == y.shape == (1, 32, 32)
    assert x.dtype == y.dtype == torch.float32


def test_synthetic_values_in_unit_range_and_not_trivial(default_synthetic):
    for dataset in (default_synthetic.train, default_synthetic.val):
        inputs, targets = tensors(dataset)
        for t in (inputs, targets):
            assert t.min() >= 0 and t.max() <= 1
        # every image shows at least one shape well above the dark background
        assert (targets.amax(dim=(1, 2, 3)) >= 0.2).all()
        assert (targets.amin(dim=(1, 2, 3)) <= 0.1).all()
        # images differ from one another
        assert targets.std(dim=0).mean() > 0.05


def test_synthetic_same_seed_gives_identical_data_and_other_seed_differs(default_synthetic):
    again, other = synthetic_cr(seed=0), synthetic_cr(seed=1)
    for split in ("train", "val"):
        for a, b in zip(tensors(getattr(default_synthetic, split)), tensors(getattr(again, split))):
            assert torch.equal(a, b)
        for a, c in zip(tensors(getattr(default_synthetic, split)), tensors(getattr(other, split))):
            assert not torch.equal(a, c)
    assert default_synthetic.metadata == again.metadata


def _digest_in_subprocess(threads):
    code = (
        "import hashlib, torch\n"
        f"torch.set_num_threads({threads})\n"
        "from cr_accel.data import synthetic_cr\n"
        "s = synthetic_cr(seed=7, num_train=300, num_val=20, mask_ratio=0.2)\n"
        "h = hashlib.sha256()\n"
        "for d in (s.train, s.val):\n"
        "    for t in d.tensors: h.update(t.numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_synthetic_is_bit_identical_across_processes_and_thread_counts():
    splits = synthetic_cr(seed=7, num_train=300, num_val=20, mask_ratio=0.2)
    here = hashlib.sha256()
    for dataset in (splits.train, splits.val):
        for t in tensors(dataset):
            here.update(t.numpy().tobytes())
    assert _digest_in_subprocess(1) == _digest_in_subprocess(3) == here.hexdigest()


def test_synthetic_train_and_val_are_disjoint_streams():
    splits = synthetic_cr(seed=0, num_train=64, num_val=64)  # equal sizes: one shared stream would repeat
    train_targets = tensors(splits.train)[1].flatten(1)
    val_targets = tensors(splits.val)[1].flatten(1)
    equal_pairs = (train_targets[:, None, :] == val_targets[None, :, :]).all(dim=2)
    assert not equal_pairs.any()
    # no near-duplicates either: the closest train image to each val image is clearly different
    assert torch.cdist(val_targets, train_targets).min() > 0.5


def test_synthetic_val_does_not_depend_on_num_train(default_synthetic):
    bigger = synthetic_cr(seed=0, num_train=300)
    for a, b in zip(tensors(default_synthetic.val), tensors(bigger.val)):
        assert torch.equal(a, b)


def test_synthetic_degradation_degrades(default_synthetic):
    inputs, targets = tensors(default_synthetic.train)
    assert not torch.equal(inputs, targets)
    value = psnr(inputs, targets)
    assert math.isfinite(value) and 15 < value < 40
    noisier = synthetic_cr(seed=0, noise_std=0.2)
    assert psnr(*tensors(noisier.train)) < value - 3


def test_synthetic_without_degradation_inputs_equal_targets():
    inputs, targets = tensors(synthetic_cr(seed=3, blur_sigma=0.0, noise_std=0.0, mask_ratio=0.0).train)
    assert torch.equal(inputs, targets)


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_synthetic_blur_is_a_gaussian_convolution_with_replicated_borders(sigma):
    inputs, targets = tensors(synthetic_cr(seed=4, num_train=16, num_val=2, blur_sigma=sigma, noise_std=0.0).train)
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel_1d = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel_1d /= kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).view(1, 1, 2 * radius + 1, 2 * radius + 1)
    padded = torch.nn.functional.pad(targets.double(), (radius,) * 4, mode="replicate")
    expected = torch.nn.functional.conv2d(padded, kernel)
    torch.testing.assert_close(inputs.double(), expected, atol=1e-5, rtol=0)


def test_synthetic_blur_alone_smooths_and_preserves_brightness():
    inputs, targets = tensors(synthetic_cr(seed=3, blur_sigma=1.5, noise_std=0.0).train)
    assert not torch.equal(inputs, targets)

    def total_variation(t):
        return (t.diff(dim=-1).abs().sum() + t.diff(dim=-2).abs().sum()).item()

    assert total_variation(inputs) < 0.9 * total_variation(targets)
    assert inputs.mean().item() == pytest.approx(targets.mean().item(), rel=0.01)


def test_synthetic_mask_ratio_zeroes_that_fraction_of_pixels():
    inputs, targets = tensors(synthetic_cr(seed=5, noise_std=0.0, mask_ratio=0.3).train)
    assert (targets > 0).all()  # the background is never exactly 0, so zeros come from the mask
    assert (inputs == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_synthetic_changing_one_knob_keeps_the_clean_images():
    base = synthetic_cr(seed=2)
    masked = synthetic_cr(seed=2, mask_ratio=0.5, blur_sigma=2.0)
    assert torch.equal(tensors(base.train)[1], tensors(masked.train)[1])


def test_building_datasets_leaves_global_rngs_untouched(tmp_path):
    path = _write(tmp_path / "d.npz", *_samples(20))
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    synthetic_cr(seed=0, num_train=16, num_val=4, mask_ratio=0.1)
    tensor_files(seed=0, path=str(path), val_ratio=0.25)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_synthetic_metadata(default_synthetic):
    meta = default_synthetic.metadata
    json.dumps(meta, allow_nan=False)
    assert SHARED_KEYS <= set(meta)
    assert meta["task"] == "reconstruction"
    assert meta["data_range"] == [0.0, 1.0]
    assert meta["input_shape"] == meta["target_shape"] == [1, 32, 32]
    assert (meta["num_train"], meta["num_val"]) == (256, 64)
    assert meta["degradation"] == {"blur_sigma": 1.0, "noise_std": 0.05, "mask_ratio": 0.0}


def test_synthetic_default_builds_quickly():
    synthetic_cr(seed=0, num_train=8, num_val=8)  # warm up torch's kernels
    start = time.perf_counter()
    synthetic_cr(seed=11)
    assert time.perf_counter() - start < 5.0  # ~0.1 s on 2 idle cores; loose for busy shared machines


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_train": 0}, "num_train"),
        ({"num_val": 2.5}, "num_val"),
        ({"image_size": True}, "image_size"),
        ({"max_shapes": 0}, "max_shapes"),
        ({"blur_sigma": -1.0}, "blur_sigma"),
        ({"noise_std": "0.1"}, "noise_std"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": float("nan")}, "mask_ratio"),
    ],
)
def test_synthetic_rejects_bad_parameters_naming_them(kwargs, field):
    with pytest.raises(UserError, match=rf"data\.{field} must be"):
        synthetic_cr(seed=0, **kwargs)


# ---------------------------------------------------------------------------------------------------
# tensor_files
# ---------------------------------------------------------------------------------------------------


def _samples(n, start=0, channels=2, classification=False):
    """Inputs (n, channels, 3, 3) whose first value is the sample id, so order and splits can be traced."""
    inputs = torch.randn(n, channels, 3, 3, generator=torch.Generator().manual_seed(n + start))
    inputs[:, 0, 0, 0] = torch.arange(start, start + n, dtype=torch.float32)
    targets = torch.arange(start, start + n) % 3 if classification else inputs * 2
    return inputs, targets


def _write(path, inputs, targets, input_key="inputs", target_key="targets"):
    path = Path(path)
    if path.suffix == ".npz":
        np.savez(path, **{input_key: inputs.numpy(), target_key: targets.numpy()})
    elif path.suffix == ".safetensors":
        save_file({input_key: inputs.contiguous(), target_key: targets.contiguous()}, str(path))
    else:
        torch.save({input_key: inputs, target_key: targets}, path)
    return path


def _ids(dataset):
    return tensors(dataset)[0][:, 0, 0, 0].long().tolist()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_tensor_files_round_trip_with_val_path(tmp_path, suffix):
    train, val = _samples(12), _samples(5, start=100)
    train_file = _write(tmp_path / f"train{suffix}", *train)
    val_file = _write(tmp_path / f"val{suffix}", *val)
    splits = tensor_files(seed=0, path=str(train_file), val_path=str(val_file))
    for dataset, (inputs, targets) in ((splits.train, train), (splits.val, val)):
        assert torch.equal(tensors(dataset)[0], inputs) and torch.equal(tensors(dataset)[1], targets)
    x, y = splits.train[4]
    assert torch.equal(x, train[0][4]) and torch.equal(y, train[1][4])
    meta = splits.metadata
    json.dumps(meta, allow_nan=False)
    assert SHARED_KEYS <= set(meta)
    assert meta["source"]["train"] == [str(train_file.resolve())]
    assert meta["source"]["val"] == [str(val_file.resolve())]
    assert meta["source"]["split"] == "val_path"
    assert (meta["num_train"], meta["num_val"]) == (12, 5)
    assert meta["input_shape"] == meta["target_shape"] == [2, 3, 3]
    assert meta["task"] == "reconstruction"
    assert meta["data_range"] == [float(train[1].min()), float(train[1].max())]


def test_tensor_files_folder_concatenates_supported_files_in_sorted_order(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    _write(folder / "b.safetensors", *_samples(4, start=10))
    _write(folder / "c.pt", *_samples(3, start=20))
    _write(folder / "a.npz", *_samples(5, start=0))
    (folder / "README.txt").write_text("not data")
    val_file = _write(tmp_path / "val.npz", *_samples(2, start=100))
    splits = tensor_files(seed=0, path=str(folder), val_path=str(val_file))
    assert _ids(splits.train) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 20, 21, 22]
    assert [Path(f).name for f in splits.metadata["source"]["train"]] == ["a.npz", "b.safetensors", "c.pt"]


def test_tensor_files_val_ratio_split_is_a_seeded_partition(tmp_path):
    path = _write(tmp_path / "all.pt", *_samples(50))
    splits = tensor_files(seed=0, path=str(path), val_ratio=0.2)
    train_ids, val_ids = _ids(splits.train), _ids(splits.val)
    assert (len(train_ids), len(val_ids)) == (40, 10)
    assert sorted(train_ids + val_ids) == list(range(50))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)  # file order kept within a split
    assert val_ids != list(range(40, 50))  # shuffled, not the tail
    # targets stay with their inputs
    assert torch.equal(tensors(splits.train)[1], tensors(splits.train)[0] * 2)
    assert _ids(tensor_files(seed=0, path=str(path), val_ratio=0.2).val) == val_ids
    assert _ids(tensor_files(seed=1, path=str(path), val_ratio=0.2).val) != val_ids
    assert splits.metadata["source"]["split"] == {"val_ratio": 0.2, "seed": 0}


def test_tensor_files_classification_metadata_and_custom_keys(tmp_path):
    inputs, labels = _samples(30, classification=True)
    path = _write(tmp_path / "cls.npz", inputs, labels, input_key="x", target_key="y")
    splits = tensor_files(seed=0, path=str(path), val_ratio=0.1, input_key="x", target_key="y")
    meta = splits.metadata
    assert meta["task"] == "classification"
    assert meta["num_classes"] == 3
    assert meta["target_shape"] == [] and meta["target_dtype"] == "int64"
    assert meta["data_range"] is None


def test_tensor_files_regression_task_when_targets_are_not_shaped_like_inputs(tmp_path):
    inputs, _ = _samples(10)
    path = _write(tmp_path / "reg.safetensors", inputs, inputs.sum(dim=(1, 2, 3)).unsqueeze(1))
    assert tensor_files(seed=0, path=str(path), val_ratio=0.2).metadata["task"] == "regression"


def test_tensor_files_records_per_channel_stats_of_training_inputs_only(tmp_path):
    inputs = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0]).view(
        1, 3, 1, 1
    ) + torch.tensor([0.0, 5.0, -5.0]).view(1, 3, 1, 1)
    train_file = _write(tmp_path / "train.npz", inputs, inputs)
    val_file = _write(tmp_path / "val.npz", inputs[:4] + 100, inputs[:4])
    splits = tensor_files(seed=0, path=str(train_file), val_path=str(val_file))
    stats = splits.metadata["normalization"]
    expected_mean = inputs.double().mean(dim=(0, 2, 3))
    expected_std = inputs.double().std(dim=(0, 2, 3), correction=0)
    assert stats["mean"] == pytest.approx(expected_mean.tolist(), abs=1e-9)
    assert stats["std"] == pytest.approx(expected_std.tolist(), abs=1e-9)
    assert stats["channel_dim"] == 0
    # recorded, not applied
    assert torch.equal(tensors(splits.train)[0], inputs)


# --- user errors: each names the problem and the file -------------------------------------------------


def test_error_path_missing(tmp_path):
    with pytest.raises(UserError, match=r"data\.path `.*nope\.npz` does not exist"):
        tensor_files(seed=0, path=str(tmp_path / "nope.npz"))
    good = _write(tmp_path / "d.npz", *_samples(4))
    with pytest.raises(UserError, match=r"data\.val_path `.*missing` does not exist"):
        tensor_files(seed=0, path=str(good), val_path=str(tmp_path / "missing"))


def test_error_folder_without_supported_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    np.save(tmp_path / "data.npy", np.zeros(3))
    with pytest.raises(UserError, match=r"no \.npz, \.safetensors or \.pt files \(it holds: data\.npy, notes\.txt\)"):
        tensor_files(seed=0, path=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"`.*empty` is a folder with no .*holds: nothing"):
        tensor_files(seed=0, path=str(empty))


def test_error_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    expected = r"`.*data\.csv` has unsupported extension `\.csv`.*\.npz, \.safetensors or \.pt"
    with pytest.raises(UserError, match=expected):
        tensor_files(seed=0, path=str(path))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_error_missing_key_lists_keys_present(tmp_path, suffix):
    path = _write(tmp_path / f"d{suffix}", *_samples(4), input_key="x", target_key="y")
    expected = rf"`.*d{re.escape(suffix)}` has no `inputs` tensor \(keys present: x, y\); set data\.input_key"
    with pytest.raises(UserError, match=expected):
        tensor_files(seed=0, path=str(path))
    with pytest.raises(UserError, match=r"has no `labels` tensor \(keys present: x, y\); set data\.target_key"):
        tensor_files(seed=0, path=str(path), input_key="x", target_key="labels")


def test_error_inputs_and_targets_of_different_length(tmp_path):
    inputs, targets = _samples(10)
    path = _write(tmp_path / "d.safetensors", inputs, targets[:9])
    with pytest.raises(UserError, match=r"`.*d\.safetensors` has 10 samples in `inputs` but 9 in `targets`"):
        tensor_files(seed=0, path=str(path))


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.5, -0.1, None, True])
def test_error_val_ratio_outside_open_unit_interval(tmp_path, ratio):
    path = _write(tmp_path / "d.npz", *_samples(10))
    with pytest.raises(UserError, match=r"data\.val_ratio must be a number strictly between 0 and 1"):
        tensor_files(seed=0, path=str(path), val_ratio=ratio)


def test_val_ratio_is_ignored_when_val_path_is_given(tmp_path):
    train = _write(tmp_path / "t.npz", *_samples(6))
    val = _write(tmp_path / "v.npz", *_samples(2, start=50))
    splits = tensor_files(seed=0, path=str(train), val_path=str(val), val_ratio=5)
    assert (len(splits.train), len(splits.val)) == (6, 2)


@pytest.mark.parametrize("n, ratio, empty", [(3, 0.1, "validation"), (3, 0.9, "training"), (0, 0.5, "validation")])
def test_error_split_leaves_a_side_empty(tmp_path, n, ratio, empty):
    path = _write(tmp_path / "small.pt", *_samples(n))
    expected = rf"{n} samples at `.*small\.pt` with data\.val_ratio={ratio} leaves the {empty} set empty"
    with pytest.raises(UserError, match=expected):
        tensor_files(seed=0, path=str(path), val_ratio=ratio)


def test_error_empty_val_path_data(tmp_path):
    train = _write(tmp_path / "t.npz", *_samples(6))
    val = _write(tmp_path / "v.npz", *_samples(0))
    with pytest.raises(UserError, match=r"validation data at `.*v\.npz` has no samples"):
        tensor_files(seed=0, path=str(train), val_path=str(val))


def test_error_mismatched_shapes_between_files(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    _write(folder / "a.npz", *_samples(4, channels=2))
    _write(folder / "b.npz", *_samples(4, channels=3))
    expected = r"`.*b\.npz` has inputs \(`inputs`\) with per-sample shape \(3, 3, 3\).*`.*a\.npz` has \(2, 3, 3\)"
    with pytest.raises(UserError, match=expected):
        tensor_files(seed=0, path=str(folder))


def test_error_val_file_shaped_unlike_train(tmp_path):
    train = _write(tmp_path / "t.npz", *_samples(6))
    inputs, targets = _samples(3)
    val = _write(tmp_path / "v.pt", inputs, targets[:, :1])
    with pytest.raises(UserError, match=r"`.*v\.pt` has targets \(`targets`\) with per-sample shape \(1, 3, 3\)"):
        tensor_files(seed=0, path=str(train), val_path=str(val))


def test_error_dtype_mismatch_between_files(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    inputs, targets = _samples(4)
    _write(folder / "a.npz", inputs, targets)
    _write(folder / "b.npz", inputs.double(), targets)
    with pytest.raises(UserError, match=r"dtype float64, but `.*a\.npz` has \(2, 3, 3\) and float32"):
        tensor_files(seed=0, path=str(folder))


class NotATensor:
    pass


def test_error_pt_file_with_arbitrary_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"inputs": NotATensor(), "targets": torch.zeros(2)}, path)
    expected = r"`.*evil\.pt` holds Python objects that torch\.load\(weights_only=True\) refuses.*NotATensor"
    with pytest.raises(UserError, match=expected):
        tensor_files(seed=0, path=str(path))


def test_error_pt_file_not_a_dict_of_tensors(tmp_path):
    path = tmp_path / "tuple.pt"
    torch.save((torch.zeros(2), torch.zeros(2)), path)
    with pytest.raises(UserError, match=r"`.*tuple\.pt` holds a tuple, not a dict of tensors"):
        tensor_files(seed=0, path=str(path))
    path = tmp_path / "strings.pt"
    torch.save({"inputs": "hello", "targets": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=r"`inputs` in `.*strings\.pt` is a str, not a tensor"):
        tensor_files(seed=0, path=str(path))


def test_error_npz_object_array_is_not_unpickled(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, inputs=np.array([{"a": 1}, None], dtype=object), targets=np.zeros(2))
    with pytest.raises(UserError, match=r"`inputs` in `.*objects\.npz` cannot be read without pickle"):
        tensor_files(seed=0, path=str(path))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_error_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"not a data file")
    with pytest.raises(UserError, match=rf"cannot read `.*broken{re.escape(suffix)}`"):
        tensor_files(seed=0, path=str(path))


def test_error_scalar_tensor(tmp_path):
    path = _write(tmp_path / "scalar.pt", torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(UserError, match=r"`inputs` in `.*scalar\.pt` is a scalar"):
        tensor_files(seed=0, path=str(path))
