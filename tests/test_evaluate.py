"""The test split, its score at the end of training (test_metrics.json) and `cr-accel evaluate`.

The splits: disjoint, reproducible from the seed, and adding a test split leaves train (synthetic_cr) and
validation as they were. The scores: the same numbers validation computes, checked exactly against the
`val_*` row of metrics.csv and against test_metrics.json.
"""

import numpy as np
import pytest
import torch

from cr_accel.data import synthetic_cr, tensor_files
from cr_accel.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# The test split


def _rows(dataset):
    """The samples of a TensorDataset as a set of byte strings (inputs and targets together)."""
    inputs, targets = dataset.tensors
    return {x.numpy().tobytes() + y.numpy().tobytes() for x, y in zip(inputs, targets)}


def _ids(dataset):
    return sorted(int(x[0]) for x in dataset.tensors[0])


def _numbered(path, n):
    """n samples whose first input value is the sample's index, so each set can be read back as indices."""
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1).repeat(1, 3)
    np.savez(path, inputs=inputs.numpy(), targets=(inputs * 2).numpy())
    return path


def test_synthetic_test_split_is_its_own_stream():
    plain = synthetic_cr(seed=3, num_train=16, num_val=8)
    with_test = synthetic_cr(seed=3, num_train=16, num_val=8, num_test=6)
    assert plain.test is None and plain.metadata["num_test"] == 0
    for split in ("train", "val"):  # adding a test split changes neither
        for a, b in zip(getattr(plain, split).tensors, getattr(with_test, split).tensors):
            assert torch.equal(a, b)
    assert len(with_test.test) == with_test.metadata["num_test"] == 6
    assert not _rows(with_test.test) & (_rows(with_test.train) | _rows(with_test.val))
    again = synthetic_cr(seed=3, num_train=4, num_val=2, num_test=6)  # other sizes: the same test set
    assert all(torch.equal(a, b) for a, b in zip(with_test.test.tensors, again.test.tensors))
    other_seed = synthetic_cr(seed=4, num_train=4, num_val=2, num_test=6)
    assert not torch.equal(with_test.test.tensors[0], other_seed.test.tensors[0])


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_synthetic_num_test_must_be_a_count(value):
    with pytest.raises(UserError, match=r"data\.num_test must be an integer >= 0"):
        synthetic_cr(seed=0, num_train=4, num_val=2, num_test=value)


def test_tensor_files_test_ratio_partitions_the_data_and_keeps_validation(tmp_path):
    path = _numbered(tmp_path / "d.npz", 50)
    splits = tensor_files(seed=5, path=str(path), val_ratio=0.2, test_ratio=0.1)
    train, val, test = _ids(splits.train), _ids(splits.val), _ids(splits.test)
    assert (len(train), len(val), len(test)) == (35, 10, 5)
    assert sorted(train + val + test) == list(range(50))  # disjoint, and nothing lost
    assert _ids(tensor_files(seed=5, path=str(path), val_ratio=0.2).val) == val  # validation as without a test set
    assert _ids(tensor_files(seed=5, path=str(path), val_ratio=0.2, test_ratio=0.1).test) == test  # reproducible
    assert _ids(tensor_files(seed=6, path=str(path), val_ratio=0.2, test_ratio=0.1).test) != test
    meta = splits.metadata
    assert (meta["num_train"], meta["num_val"], meta["num_test"]) == (35, 10, 5)
    assert meta["source"]["test_split"] == {"test_ratio": 0.1, "seed": 5}
    assert tensor_files(seed=5, path=str(path)).test is None


def test_tensor_files_test_path_and_test_ratio_beside_a_val_path(tmp_path):
    train, other = _numbered(tmp_path / "t.npz", 20), _numbered(tmp_path / "o.npz", 7)
    from_file = tensor_files(seed=0, path=str(train), val_ratio=0.25, test_path=str(other))
    assert (len(from_file.train), len(from_file.val), len(from_file.test)) == (15, 5, 7)
    assert from_file.metadata["source"]["test_split"] == "test_path"
    assert from_file.metadata["source"]["test"] == [str(other.resolve())]
    held = tensor_files(seed=0, path=str(train), val_path=str(other), test_ratio=0.25)
    assert (len(held.train), len(held.val), len(held.test)) == (15, 7, 5)
    assert sorted(_ids(held.train) + _ids(held.test)) == list(range(20))


@pytest.mark.parametrize("kwargs, message", [
    ({"val_ratio": 0.5, "test_ratio": 0.5}, r"data\.val_ratio=0\.5 and data\.test_ratio=0\.5 together hold out 1 of"),
    ({"val_ratio": 0.7, "test_ratio": 0.4}, r"together hold out 1\.1 of the samples, leaving none to train on"),
    ({"test_ratio": 0}, r"data\.test_ratio must be a number strictly between 0 and 1, got 0"),
    ({"test_ratio": -0.1, "val_ratio": 2}, r"data\.val_ratio must be .* got 2; .*data\.test_ratio must be .* got -0\.1"),
    ({"test_ratio": 0.1, "test_path": "TEST"}, r"data\.test_path and data\.test_ratio are both set"),
    ({"test_ratio": 0.01}, r"with data\.val_ratio=0\.1 and data\.test_ratio=0\.01 leaves the test set empty"),
])
def test_tensor_files_bad_split_is_one_user_error(tmp_path, kwargs, message):
    path = _numbered(tmp_path / "d.npz", 20)
    kwargs = {k: str(path) if v == "TEST" else v for k, v in kwargs.items()}
    with pytest.raises(UserError, match=message):
        tensor_files(seed=0, path=str(path), **kwargs)
