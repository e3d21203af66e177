"""The preflight (cr_accel/preflight.py): every mismatch between the config and the data stops `train.py`
with exit 2 and one specific message before the first file is written, and a valid run is bitwise the same
with the preflight as without it."""

import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cr_accel import preflight
from cr_accel.config import config_from_dict
from cr_accel.data import DatasetSplits
from cr_accel.errors import UserError
from cr_accel.trainer import Trainer

TINY = ["training.epochs=1", "data.num_train=8", "data.num_val=4", "data.batch_size=4"]
MLP = ["model.name=mlp", "~model.in_channels", "~model.out_channels", "~model.base_channels", "~model.depth",
       "model.hidden_sizes=[16]"]


def _files_data(name):
    # {tmp} is the case's folder; `~data.num_*` because tensor_files takes neither.
    return ["data.name=tensor_files", f"data.path={{tmp}}/{name}.pt", "~data.num_train", "~data.num_val"]


CLASSES = _files_data("classes")  # 40 samples of 8 floats, labels 0..9
VALUES = _files_data("values")  # 40 samples of 6 floats -> 3 floats
NAN_IMAGES = _files_data("nan_images")  # 40 images 1x32x32 whose inputs are all NaN


@dataclass
class Case:
    id: str
    overrides: list
    patterns: list  # regexes that must all match stderr (problems found together are reported together)
    existing_dir: bool = False  # output.dir exists beforehand, holding a file of the user's
    earlier_run: bool = False  # output.dir holds an earlier run (the case passes --overwrite)


CASES = [
    Case("image_size_30_and_accuracy_on_images", ["data.image_size=30", "training.metrics=[accuracy]"], [
        r"`model\.depth=2` halves the images 2 times, so their sides must be multiples of 4, but the inputs are "
        r"1x30x30 \(`data\.image_size=30`\): set `model\.depth=1` or use `data\.image_size=32`",
        r"`training\.metrics` has `accuracy`, which needs class-label targets, but the targets are float32 values "
        r"of shape \[1, 30, 30\] \(task reconstruction\): set `training\.metrics=\[psnr\]`"]),
    Case("depth_6_and_in_channels_3", ["model.depth=6", "model.in_channels=3"], [
        r"found 2 problems",
        r"`model\.depth=6` halves the images 6 times, so their sides must be multiples of 64, but the inputs are "
        r"1x32x32 \(`data\.image_size=32`\): set `model\.depth=5`",
        r"`model\.in_channels=3` but the inputs have 1 channel\(s\) \(\[1, 32, 32\]\): set `model\.in_channels=1`"],
        existing_dir=True),
    Case("mlp_in_and_out_features", [*MLP, *CLASSES, "model.in_features=10", "model.out_features=2",
                                     "loss.name=cross_entropy", "training.metrics=[accuracy]"], [
        r"`model\.in_features=10` but each input holds 8 values \(\[8\] float32, flattened\): "
        r"set `model\.in_features=8`",
        r"`model\.out_features=2` but the targets hold class labels up to 9 \(10 classes\): "
        r"set `model\.out_features=10`"]),
    Case("hidden_sizes_abc", [*MLP, "model.in_features=1024", "model.out_features=1024", "model.hidden_sizes=abc"], [
        r"`model` could not be built: `mlp\(hidden_sizes='abc', in_features=1024, out_features=1024\)` raised "
        r"TypeError: .*; `model\.hidden_sizes` is 'abc' \(str\), but `mlp` takes a list like \[256, 256\]"]),
    Case("adam_betas", ["optimizer.name=adam", "optimizer.betas=[0.9]"], [
        r"`optimizer` could not be built: `adam\(betas=\[0\.9\]\)` raised IndexError: tuple index out of range.*; "
        r"`optimizer\.betas` has 1 value\(s\) where the default \[0\.9, 0\.999\] has 2"]),
    # The default loss (mse) and metrics ([psnr]) with class labels: both refused, with the fixes.
    Case("psnr_and_mse_on_labels", [*MLP, *CLASSES, "model.in_features=8", "model.out_features=10"], [
        r"`loss\.name=mse` compares values, but the targets are class labels \(int64, 10 classes\): "
        r"set `loss\.name=cross_entropy`",
        r"`training\.metrics` has `psnr`, which compares images, but the targets are class labels "
        r"\(int64, 10 classes\): set `training\.metrics=\[accuracy\]`"]),
    Case("cross_entropy_on_values", [*MLP, *VALUES, "model.in_features=6", "model.out_features=3",
                                     "loss.name=cross_entropy", "training.metrics=[]"], [
        r"`loss\.name=cross_entropy` needs class labels \(integer targets\), but the targets are float32 values "
        r"of shape \[3\] \(task regression\): set `loss\.name=mse`"]),
    Case("monitor_val_acc", ["checkpoint.monitor=val_acc"], [
        r"`checkpoint\.monitor`: `val_acc` is not a metric this run produces; did you mean `val_accuracy` "
        r"\(add `accuracy` to training\.metrics\)\? It can be one of: val_loss, train_loss, grad_norm, val_psnr"]),
    # A user's model (torch's own Linear, by target) whose forward fails on the data.
    Case("user_model_forward_fails", ["model.name=torch.nn:Linear", "~model.in_channels", "~model.out_channels",
                                      "~model.base_channels", "~model.depth", "model.in_features=5",
                                      "model.out_features=3", *VALUES, "training.metrics=[]"], [
        r"`model\.name=torch\.nn:Linear`, `model\.in_features=5`, `model\.out_features=3` failed on a batch of "
        r"the train data \(\[2, 6\] float32\): RuntimeError: mat1 and mat2 shapes cannot be multiplied.*"
        r"The data: inputs \[6\] float32, targets \[3\] float32 \(task regression"]),
    Case("nan_in_the_data", NAN_IMAGES, [
        r"the first train batch's inputs hold 2048 NaN or infinite value\(s\) of 2048: clean the data",
        r"the first val batch's inputs hold 2048 NaN or infinite value\(s\) of 2048"]),
    # --overwrite with a config that cannot start: the earlier run is still there, untouched.
    Case("overwrite_keeps_the_earlier_run_when_the_new_one_cannot_start", ["data.image_size=30", "--overwrite"], [
        r"`model\.depth=2` halves the images 2 times"], earlier_run=True),
]


def _write_data(folder):
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(40, 8, generator=g), "targets": torch.arange(40) % 10}, folder / "classes.pt")
    torch.save({"inputs": torch.randn(40, 6, generator=g), "targets": torch.randn(40, 3, generator=g)},
               folder / "values.pt")
    images = torch.rand(40, 1, 32, 32, generator=g)
    torch.save({"inputs": torch.full_like(images, float("nan")), "targets": images}, folder / "nan_images.pt")


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else None


def _run_case(case, folder, run_train):
    folder.mkdir(parents=True)
    _write_data(folder)
    out = folder / "run"
    if case.existing_dir:
        out.mkdir()
        (out / "notes.txt").write_text("the user's own file\n")
    if case.earlier_run:
        (out / "checkpoints/last").mkdir(parents=True)
        (out / "config.yaml").write_text("the earlier run's config\n")
        (out / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
        (out / "checkpoints/last/manifest.json").write_text("{}")
    before = _snapshot(out)
    overrides = [o.replace("{tmp}", str(folder)) for o in case.overrides]
    rc, stdout, stderr = run_train("--config", "configs/default.yaml", *TINY, *overrides, f"output.dir={out}")
    return rc, stdout, stderr, before, _snapshot(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_train):
    """Every case once, two at a time (most of each run is starting Python and importing torch)."""
    root = tmp_path_factory.mktemp("preflight")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(_run_case, c, root / c.id, run_train) for c in CASES}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mismatch_stops_before_anything_is_written(case, runs):
    rc, stdout, stderr, before, after = runs[case.id]
    shown = f"\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}"
    assert rc == 2, f"exit code {rc}, expected 2{shown}"
    for pattern in case.patterns:
        assert re.search(pattern, stderr), f"expected /{pattern}/{shown}"
    assert "Traceback" not in stderr, shown
    assert len(re.findall(r"^error:", stderr, re.M)) == 1, f"one message expected{shown}"
    assert after == before, f"output.dir changed: {before} -> {after}"  # None: never created


def test_valid_run_is_bitwise_the_same_with_and_without_preflight(tmp_path, monkeypatch):
    """Dropout in the model and a shuffled loader: the preflight must leave every RNG stream and the loaders'
    generators as they were, or the first epoch's weights would differ."""
    calls = []
    original = preflight.check_batch
    monkeypatch.setattr(preflight, "check_batch", lambda *a: calls.append(1) or original(*a))
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(preflight.SWITCH, switch)
        cfg = config_from_dict({
            "model": {"name": "conv_autoencoder", "base_channels": 4, "depth": 1, "dropout": 0.5},
            "data": {"name": "synthetic_cr", "num_train": 16, "num_val": 8, "image_size": 8, "batch_size": 4},
            "training": {"epochs": 1, "log_every": 1000, "metrics": ["psnr"], "mixed_precision": "no"},
            "checkpoint": {"async_save": False},
            "output": {"dir": str(tmp_path / f"run_{switch}")},
        })
        trainer = Trainer(cfg)
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        results[switch] = ([p.detach().clone() for p in model.parameters()], torch.get_rng_state())
    assert len(calls) == 1, "the preflight ran in the run with it on, and only there"
    (weights_on, rng_on), (weights_off, rng_off) = results["1"], results["0"]
    assert all(torch.equal(a, b) for a, b in zip(weights_on, weights_off))
    assert torch.equal(rng_on, rng_off)


class _Noisy(nn.Module):
    """Draws from every global RNG in forward, even in eval mode; one submodule is frozen in eval mode."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.frozen = nn.BatchNorm1d(3).eval()

    def forward(self, x):
        random.random(), np.random.rand(), torch.rand(1)
        return self.frozen(self.linear(x))


def _splits():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g))
    return DatasetSplits(train=data, val=data, metadata={})


def _cfg(**training):
    return config_from_dict({"model": {"name": "mlp", "in_features": 3, "out_features": 3},
                             "training": {"metrics": [], **training}}, check_components=False)


def test_rng_streams_and_module_modes_are_restored():
    model = _Noisy()
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    preflight.check_batch(_cfg(), _splits(), model, nn.MSELoss(), {}, "cpu")
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    assert model.training and model.linear.training and not model.frozen.training
    assert model.frozen.running_mean.eq(0).all()  # eval mode in the preflight: no statistics updated


def test_a_metric_must_return_one_value_per_sample():
    def mean_abs(outputs, targets):
        return (outputs - targets).abs().mean()  # one number: validation could not average it exactly

    with pytest.raises(UserError, match=r"metric `mean_abs` returned \[\] for a batch of 2; a metric returns one "
                                        r"value per sample \(shape \[2\]\)"):
        preflight.check_batch(_cfg(), _splits(), nn.Linear(3, 3), nn.MSELoss(), {"mean_abs": mean_abs}, "cpu")


def test_a_loss_must_return_the_batch_mean():
    with pytest.raises(UserError, match=r"`loss\.name=mse` returned \[2, 3\]; a loss returns the mean over the "
                                        r"batch, one number"):
        preflight.check_batch(_cfg(), _splits(), nn.Linear(3, 3), nn.MSELoss(reduction="none"), {}, "cpu")


def test_an_output_that_would_broadcast_is_refused():
    """mse of [2, 1] outputs against [2, 3] targets broadcasts without an error: a silently wrong loss."""
    with pytest.raises(UserError, match=r"the model \(`model\.name=mlp`\) produced \[2, 1\] float32 for a batch "
                                        r"of targets \[2, 3\] float32; `loss\.name=mse` needs the same shape"):
        preflight.check_batch(_cfg(), _splits(), nn.Linear(3, 1), nn.MSELoss(), {}, "cpu")


def test_switch_is_documented(repo_root):
    assert f"{preflight.SWITCH}=0" in (repo_root / "README.md").read_text()
