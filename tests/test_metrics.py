"""Metric entries in `training.metrics` (names, or mappings with options) and `components.build_metrics`: the
options bound, the data range read from the dataset's metadata, the checks of the config and the preflight.
(Bad entries through `python train.py` are rows of the table in tests/test_config.py.)"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cr_accel import components, preflight
from cr_accel.config import config_from_dict
from cr_accel.data import DatasetSplits
from cr_accel.errors import ConfigError, UserError
from cr_accel.metrics import psnr, ssim


def _images(n=4, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(n, 1, 16, 16, generator=g) * scale
    return targets + 0.05 * scale * torch.randn(targets.shape, generator=g), targets


def _cfg(metrics, **sections):
    return config_from_dict({"training": {"metrics": metrics}, **sections})


def test_entries_bind_their_options_and_keep_their_names():
    outputs, targets = _images()
    fns = components.build_metrics(_cfg(["psnr", {"name": "ssim", "window": 7, "sigma": 1.0}]), None)
    assert list(fns) == ["psnr", "ssim"]  # logged as val_psnr, val_ssim
    assert torch.equal(fns["ssim"](outputs, targets), ssim(outputs, targets, window=7, sigma=1.0))
    assert not torch.equal(fns["ssim"](outputs, targets), ssim(outputs, targets))


@pytest.mark.parametrize("metadata, expected", [
    (None, 1.0),  # a user's builder that returned a plain (train, val) pair
    ({}, 1.0),
    ({"data_range": None}, 1.0),  # class labels
    ({"data_range": [0.0, 1.0]}, 1.0),  # synthetic_cr
    ({"data_range": [-1.0, 3.0]}, 4.0),  # max - min, not max
    ({"data_range": [2.0, 2.0]}, 1.0),  # constant targets: no range to measure against
])
def test_data_range_from_the_metadata(metadata, expected):
    assert components.data_range_of(metadata) == expected


def test_psnr_and_ssim_take_the_targets_range_unless_the_entry_gives_one():
    outputs, targets = _images(scale=255.0)
    metadata = {"data_range": [0.0, 255.0]}
    fns = components.build_metrics(_cfg(["psnr", "ssim", "accuracy"]), metadata)
    assert torch.equal(fns["psnr"](outputs, targets), psnr(outputs, targets, data_range=255.0))
    assert torch.equal(fns["ssim"](outputs, targets), ssim(outputs, targets, data_range=255.0))
    assert fns["accuracy"] is components.METRICS.resolve("accuracy")  # takes no data_range: nothing bound
    given = components.build_metrics(_cfg([{"name": "psnr", "data_range": 100.0}]), metadata)
    assert torch.equal(given["psnr"](outputs, targets), psnr(outputs, targets, data_range=100.0))


def test_tensor_files_range_reaches_the_metrics(tmp_path):
    """The whole path: targets in [0, 255] in a user's file -> metadata -> psnr against 255, not 1."""
    outputs, targets = _images(n=20, scale=255.0)
    np.savez(tmp_path / "d.npz", inputs=outputs.numpy(), targets=targets.numpy())
    cfg = config_from_dict({"data": {"name": "tensor_files", "path": str(tmp_path / "d.npz")},
                            "training": {"metrics": ["psnr"]}})
    data = components.build_datasets(cfg)
    low, high = data.metadata["data_range"]
    assert low == float(data.train.tensors[1].min()) and high == float(data.train.tensors[1].max()) > 250
    value = components.build_metrics(cfg, data.metadata)["psnr"](outputs, targets)
    assert torch.equal(value, psnr(outputs, targets, data_range=high - low))


def test_synthetic_targets_lie_in_the_range_their_metadata_records():
    cfg = config_from_dict({"data": {"num_train": 16, "num_val": 8, "image_size": 16}})
    data = components.build_datasets(cfg)
    targets = torch.cat([data.train.tensors[1], data.val.tensors[1]])
    low, high = data.metadata["data_range"]
    assert (low, high) == (0.0, 1.0) and low <= float(targets.min()) and float(targets.max()) <= high


def test_monitor_accepts_a_metric_given_as_a_mapping():
    cfg = _cfg([{"name": "ssim", "window": 7}], checkpoint={"monitor": "val_ssim", "mode": "max"})
    assert cfg.checkpoint.monitor == "val_ssim"
    with pytest.raises(ConfigError, match=r"`checkpoint\.monitor`: `val_sim` is not a metric this run produces; "
                                          r"did you mean `val_ssim`\? It can be one of: val_loss, train_loss, "
                                          r"grad_norm, val_ssim"):
        _cfg([{"name": "ssim"}], checkpoint={"monitor": "val_sim"})


def test_malformed_entries_are_all_reported():
    with pytest.raises(ConfigError) as caught:
        _cfg([{"window": 7}, 5, {"name": "ssimm"}, {"name": "psnr", "data_range": 0}])
    message = str(caught.value)
    assert "found 4 errors" in message
    assert "`training.metrics[0].name`: is missing: an entry with options names its metric" in message
    assert ("`training.metrics[1]`: must be a metric name or a mapping like `{name: ssim, window: 7}`, "
            "got `5`") in message
    assert "`training.metrics[2].name`: unknown metric `ssimm`; did you mean `ssim`?" in message
    assert "`training.metrics[3].data_range`: must be a number > 0" in message


def _labels():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, 4, generator=g), torch.arange(6) % 3)
    return DatasetSplits(train=data, val=data, metadata={"task": "classification", "num_classes": 3})


def _images_splits(side):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(4, 1, side, side, generator=g), torch.rand(4, 1, side, side, generator=g))
    return DatasetSplits(train=data, val=data, metadata={})


def _preflight(metrics, splits, loss="mse"):
    """The batch check with an MLP on class labels, or with a model that returns its input on images."""
    labels = splits.metadata.get("task") == "classification"
    model = {"name": "mlp", "in_features": 4, "out_features": 3} if labels else {"name": "torch.nn:Identity"}
    cfg = config_from_dict({"model": model, "loss": {"name": loss}, "training": {"metrics": metrics}},
                           check_components=False)
    module = nn.Linear(4, 3) if labels else nn.Identity()
    preflight.check_batch(cfg, splits, module, components.build_loss(cfg), components.build_metrics(cfg, None), "cpu")


def test_preflight_refuses_ssim_on_class_labels():
    with pytest.raises(UserError, match=r"`training\.metrics` has `ssim`, which compares images, but the targets are "
                                        r"class labels \(int64, 3 classes\): set `training\.metrics=\[accuracy\]`"):
        _preflight([{"name": "ssim", "window": 3}], _labels(), loss="cross_entropy")


def test_preflight_refuses_the_ssim_loss_on_class_labels():
    with pytest.raises(UserError, match=r"`loss\.name=ssim` compares images, but the targets are class labels "
                                        r"\(int64, 3 classes\): set `loss\.name=cross_entropy`"):
        _preflight(["accuracy"], _labels(), loss="ssim")


def test_preflight_refuses_a_window_larger_than_the_images():
    with pytest.raises(UserError, match=r"`training\.metrics\[1\]` is ssim with a window of 11 pixels, but the targets "
                                        r"are \[1, 8, 8\] images: set `training\.metrics\[1\]` to "
                                        r"`\{name: ssim, window: 7\}`"):
        _preflight(["psnr", "ssim"], _images_splits(8))
    _preflight(["psnr", {"name": "ssim", "window": 7}], _images_splits(8))  # fits: no error
