"""data.normalize: statistics from one streaming pass over the training split (equal to the whole-array values, on
1 and 2 processes), kept in checkpoints and taken from them on resume, and applied alike by training, validation,
`load_model` and `cr-accel predict`."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cr_accel import load_model
from cr_accel.checkpoint import read_state
from cr_accel.cli import main_train
from cr_accel.data.normalize import ChannelMoments, Normalization, Normalized, config_problems
from cr_accel.errors import UserError
from cr_accel.predict import main as predict_main
from tests.runners import ROOT, launch_2_cpu_processes, metric_rows, own_data_config

OFFSETS, SCALES = (1000.0, -50.0), (30.0, 0.5)  # channels far from zero mean and unit spread


class OneProcess:
    process_index, num_processes = 0, 1


def samples(n, seed, shape=(2, 8, 8)):
    """Inputs with per-channel offsets and spreads, and targets shaped like them (a reconstruction task)."""
    rng = np.random.default_rng(seed)
    channels = np.array(OFFSETS).reshape(2, 1, 1), np.array(SCALES).reshape(2, 1, 1)
    clean = channels[0] + channels[1] * rng.standard_normal((n, *shape))
    noisy = clean + 0.3 * channels[1] * rng.standard_normal((n, *shape))
    return noisy.astype(np.float32), clean.astype(np.float32)


def whole_array(inputs):
    values = torch.as_tensor(inputs).double().transpose(0, 1).reshape(inputs.shape[1], -1)
    var, mean = torch.var_mean(values, dim=1, correction=0)
    return mean, var.sqrt()


# ---------------------------------------------------------------- the statistics


@pytest.mark.parametrize("shape", [(2, 8, 8), (5,), ()], ids=["images", "features", "scalars"])
def test_a_streaming_pass_equals_the_whole_array_computation(shape):
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((53, *shape)) * 40 + 700).astype(np.float32)
    dataset = TensorDataset(torch.from_numpy(inputs), torch.zeros(53))
    for kind in ("per_channel", "minmax"):
        norm = Normalization(kind)
        norm.fit(dataset, OneProcess(), batch_size=7, loader_options={"num_workers": 0})
        if kind == "minmax":
            assert norm.shift == [float(inputs.min())] and norm.scale == [float(inputs.max()) - float(inputs.min())]
            continue
        flat = inputs if shape else inputs.reshape(53, 1)  # channels along dim 1; a scalar sample is one
        mean, std = whole_array(flat)
        assert torch.allclose(torch.tensor(norm.shift, dtype=torch.float64), mean, rtol=1e-12, atol=0)
        assert torch.allclose(torch.tensor(norm.scale, dtype=torch.float64), std, rtol=1e-12, atol=0)


def test_shards_of_processes_merge_to_the_values_of_one_pass():
    inputs = torch.from_numpy(samples(37, 1)[0])
    parts = []
    for rank in range(3):  # what three processes each see: every third sample
        moments = ChannelMoments()
        share = inputs[rank::3]
        for start in range(0, len(share), 4):
            moments.add(share[start:start + 4])
        parts.append(moments.as_tensor())
    merged = ChannelMoments.merged(parts).statistics("per_channel")
    mean, std = whole_array(inputs.numpy())
    assert torch.allclose(torch.tensor(merged[0], dtype=torch.float64), mean, rtol=1e-12, atol=0)
    assert torch.allclose(torch.tensor(merged[1], dtype=torch.float64), std, rtol=1e-12, atol=0)


def test_a_constant_channel_is_scaled_by_one_and_non_finite_inputs_are_refused():
    moments = ChannelMoments()
    moments.add(torch.stack([torch.full((4, 3), 5.0), torch.arange(12.0).view(4, 3)], dim=1))
    shift, scale = moments.statistics("per_channel")
    assert shift[0] == 5.0 and scale[0] == 1.0 and scale[1] > 0
    moments.add(torch.tensor([[float("nan")] * 3, [1.0] * 3]).view(1, 2, 3))
    with pytest.raises(UserError, match="non-finite"):
        moments.statistics("per_channel")


@pytest.mark.parametrize("value, message", [
    ("zscore", "allowed: per_channel, minmax, none"),
    ({"mean": 0.5}, "exactly the keys `mean` and `std`"),
    ({"mean": [0.5, 0.4], "std": [0.2, 0.1, 0.3]}, "2 values and `std` 3"),
    ({"mean": 0.5, "std": 0}, "finite and > 0"),
    ({"mean": "a", "std": 1}, "`mean` must be a number or a list"),
])
def test_bad_values_are_named(value, message):
    (problem,) = config_problems(value)
    assert message in problem
    assert config_problems("per_channel") == config_problems(None) == config_problems({"mean": [1, 2], "std": 3}) == []


def test_inputs_are_normalised_and_outputs_of_their_shape_mapped_back():
    norm = Normalization("fixed", [10.0, 20.0], [2.0, 4.0], restore_outputs=True)
    seen = []
    x = torch.tensor([[12.0, 28.0]]).view(1, 2, 1)
    y = norm.run(lambda z: seen.append(z) or z * 0 + 1, x)
    assert torch.equal(seen[0], torch.tensor([[1.0, 2.0]]).view(1, 2, 1))
    assert torch.equal(y, torch.tensor([[12.0, 24.0]]).view(1, 2, 1))  # 1 * scale + shift per channel
    assert Normalization().run(lambda z: z, x) is x  # off: the inputs as they are


@pytest.mark.parametrize("target, mapped_back", [
    (torch.zeros(2, 4, 4), True),  # reconstruction: outputs in the inputs' units
    (torch.zeros(1, 4, 4), False),  # other channels
    (torch.tensor(3), False),  # a class label
    (torch.zeros(2, 4, 4, dtype=torch.int64), False),  # integer targets
])
def test_outputs_are_mapped_back_only_where_targets_are_floats_shaped_like_the_inputs(target, mapped_back):
    norm = Normalization("per_channel")
    norm.match_sample(torch.zeros(2, 4, 4), target)
    assert norm.restore_outputs is mapped_back


# ---------------------------------------------------------------- through a run


def write_config(folder, data_folder, data=None, training=None):
    return own_data_config(folder, {"name": "tensor_files", "path": str(data_folder / "train.npz"),
                                    "val_path": str(data_folder / "val.npz"), "batch_size": 8,
                                    "normalize": "per_channel", **(data or {})},
                           model={"in_channels": 2, "out_channels": 2, "depth": 1}, training={"epochs": 3, **(training or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for name, n, seed in (("train", 48, 0), ("val", 12, 1)):
        x, y = samples(n, seed)
        np.savez(folder / f"{name}.npz", inputs=x, targets=y)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("run")
    assert main_train(["--config", str(write_config(folder, data))]) == 0
    return folder / "run"


def test_the_run_records_the_training_split_statistics_in_its_metadata_and_checkpoints(trained, data):
    recorded = json.loads((trained / "environment.json").read_text())["dataset"]["normalize"]
    mean, std = whole_array(np.load(data / "train.npz")["inputs"])
    assert recorded["kind"] == "per_channel" and recorded["restore_outputs"] is True
    assert np.allclose(recorded["shift"], mean, rtol=1e-12) and np.allclose(recorded["scale"], std, rtol=1e-12)
    for checkpoint in ("best", "last", "step_00000006"):
        assert read_state(trained / "checkpoints" / checkpoint)["normalization"] == recorded


def test_load_model_and_predict_on_raw_inputs_give_what_validation_measured(trained, data, tmp_path):
    val = np.load(data / "val.npz")
    inputs, targets = torch.from_numpy(val["inputs"]), torch.from_numpy(val["targets"])
    model = load_model(trained)  # best/: the epoch with the lowest val_loss
    assert isinstance(model, Normalized)
    with torch.no_grad():
        outputs = model(inputs)
        network_alone = model.model(inputs)
    best_val = float(metric_rows(trained)[-1]["best_val"])
    assert float(torch.nn.functional.mse_loss(outputs, targets)) == pytest.approx(best_val, rel=1e-5)
    # the statistics matter: the network on raw inputs is off by the inputs' scale
    assert float(torch.nn.functional.mse_loss(network_alone, targets)) > 100 * best_val
    assert predict_main([str(trained), "--input", str(data / "val.npz"), "--output", str(tmp_path / "out.npz")]) == 0
    assert np.allclose(np.load(tmp_path / "out.npz")["outputs"], outputs.numpy(), rtol=0, atol=1e-4)


def test_a_resume_takes_the_statistics_of_its_checkpoint_not_a_new_pass(tmp_path, data, monkeypatch):
    config = write_config(tmp_path, data, training={"epochs": 2})
    assert main_train(["--config", str(config)]) == 0
    first = read_state(tmp_path / "run/checkpoints/last")["normalization"]

    def no_pass(*args, **kwargs):
        raise AssertionError("a resumed run computed the statistics again")

    monkeypatch.setattr(Normalization, "fit", no_pass)
    epoch_1 = tmp_path / "run/checkpoints/step_00000006"
    assert main_train(["--config", str(config), "--resume_from_checkpoint", str(epoch_1)]) == 0
    assert read_state(tmp_path / "run/checkpoints/last")["normalization"] == first
    assert [r["epoch"] for r in metric_rows(tmp_path / "run")] == ["1", "2"]


def test_given_values_must_match_the_channels(tmp_path, data, capsys):
    config = write_config(tmp_path, data, data={"normalize": {"mean": [1, 2, 3], "std": [1, 1, 1]}})
    assert main_train(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.normalize gives 3 means and stds, but the inputs have 2 channel(s)" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_two_processes_compute_the_statistics_of_one(tmp_path, data, trained):
    config = write_config(tmp_path, data, training={"epochs": 1})
    result = launch_2_cpu_processes(ROOT / "train.py", "--config", config)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((tmp_path / "run/environment.json").read_text())["dataset"]["normalize"]
    one = json.loads((trained / "environment.json").read_text())["dataset"]["normalize"]
    assert np.allclose(ours["shift"], one["shift"], rtol=1e-12) and np.allclose(ours["scale"], one["scale"], rtol=1e-12)
