"""Validation is exact for any number of processes: the trainer's val_loss and val_psnr equal the values
computed here directly on the whole validation set in one process, also when the set does not split evenly
over processes and batches (accelerate then pads the last batch with duplicated samples).

The model and the data are float64 (this module's `Float64Net` and `float64_data`, named in the config as
`tests.test_validation:...`), so batching changes the sums only by rounding at the 1e-16 level and the
comparison can be tight: a duplicated or dropped sample moves the means by far more than 1e-12.
"""

import csv
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from cr_accel.data import DatasetSplits
from cr_accel.metrics import psnr
from tests.runners import PROBE, launch_2_cpu_processes, run_1_process

SIDE = 4  # 1xSIDExSIDE images: PSNR compares images, and the preflight holds the config to that
FEATURES = SIDE * SIDE
REL = 1e-12


class Float64Net(nn.Module):
    """A small float64 MLP mapping an image's FEATURES values to FEATURES values (a reconstruction task)."""

    def __init__(self, features: int = FEATURES, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, features)).double()

    def forward(self, x):
        return self.net(x.flatten(1)).view_as(x)


def float64_data(seed, num_train=16, num_val=10):
    """Inputs in [0, 1], targets a fixed smooth function of them; both float64."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand((n, 1, SIDE, SIDE), generator=g, dtype=torch.float64)
        return TensorDataset(x, (0.5 + 0.4 * torch.sin(3 * x)).clamp(0, 1))

    return DatasetSplits(train=split(num_train), val=split(num_val), metadata={"task": "reconstruction"})


def write_config(tmp_path, num_val, batch_size):
    config = {
        "model": {"name": "tests.test_validation:Float64Net"},
        "loss": {"name": "mse"},
        "data": {"name": "tests.test_validation:float64_data", "num_train": 16, "num_val": num_val,
                 "batch_size": batch_size},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "training": {"epochs": 1, "metrics": ["psnr"], "log_every": 1},
        "output": {"dir": str(tmp_path / "run")},
        "seed": 3,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def expected_on_whole_set(weights, num_val):
    """Loss and mean PSNR of the trained weights over the whole validation set: one forward pass, one process."""
    model = Float64Net()
    model.load_state_dict(load_file(weights))
    model.eval()
    inputs, targets = float64_data(seed=3, num_val=num_val).val.tensors
    with torch.no_grad():
        outputs = model(inputs)
    loss = float(nn.functional.mse_loss(outputs, targets))  # the mean over every value of every sample
    per_sample_psnr = psnr(outputs, targets).double().tolist()
    return loss, math.fsum(per_sample_psnr) / num_val


def logged_validation(tmp_path):
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return float(last["val_loss"]), float(last["val_psnr"])


@pytest.mark.parametrize("processes, num_val, batch_size", [
    (1, 10, 4),  # batches of 4, 4, 2
    (2, 10, 4),  # 2 x 4 = 8 per round: the last round has 2 real samples and 6 duplicates
    (2, 37, 8),  # 5 real samples in the last round; process 1's last batch is all duplicates
    (2, 16, 4),  # splits evenly: no batch is gathered
])
def test_validation_equals_the_whole_set_computed_in_one_process(tmp_path, processes, num_val, batch_size):
    config = write_config(tmp_path, num_val, batch_size)
    run = launch_2_cpu_processes if processes == 2 else run_1_process
    result = run(PROBE, "--config", config, "--probe", tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-3000:]
    loss, mean_psnr = expected_on_whole_set(tmp_path / "p.safetensors", num_val)
    val_loss, val_psnr = logged_validation(tmp_path)
    assert val_loss == pytest.approx(loss, rel=REL, abs=0)
    assert val_psnr == pytest.approx(mean_psnr, rel=REL, abs=0)
