"""Datasets chosen by name from the `data:` section of the config, each returning train and val splits (and a
test split, where the data section asks for one).

The trainer calls `DATASETS.resolve(name)(seed=..., **data_section)`. Every builder returns a
`DatasetSplits`: map-style datasets whose items are `(input, target)` tensor pairs -- train, val and an
optional test split, scored once after training and by `cr-accel evaluate --split test` -- and a
JSON-serialisable `metadata` dict that the trainer writes into the run folder and reads to pick metrics.

Two rules hold for every builder here:
- Randomness comes only from `torch.Generator`s derived from `seed`, never from the global RNGs, so that
  building a dataset cannot shift the RNG state a resumed run depends on.
- `synthetic_cr` generates everything at construction, and `tensor_files` loads `.npz` and `.pt` files whole
  (`__getitem__` is tensor indexing); `tensor_files` reads only the headers of `.safetensors` and `.npy` files
  there and one sample per `__getitem__` (see `tensor_store`); `image_folder` lists and checks its files there
  and decodes each image in `__getitem__` (in the DataLoader's workers), its augmentation drawn from
  (seed, epoch, index) only; `hf_dataset` memory-maps Arrow data (converting Parquet once into a cache), checks
  every row's shape there and reads one row per `__getitem__`, importing `datasets` only when it is used.

Metadata keys shared by all builders: `dataset`, `task`, `input_shape`, `target_shape` (per sample),
`input_dtype`, `target_dtype`, `num_train`, `num_val`, `num_test` (0 without a test split), `data_range` (`[low, high]` of the targets, or
None; `psnr` and `ssim` measure against high - low, see `components.data_range_of`), `normalization`
(per-channel input statistics, recorded only, or None) and `source`. The trainer adds `normalize` when
`data.normalize` is on: the statistics it applies (see `normalize.py`).
"""

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from cr_accel.registry import Registry

DATASETS: Registry = Registry("dataset")


@dataclass
class DatasetSplits:
    """What every dataset builder returns."""

    train: Dataset  # map-style: __len__, __getitem__(i) -> (input_tensor, target_tensor)
    val: Dataset
    metadata: dict  # JSON-serialisable description, see the module docstring
    test: Optional[Dataset] = None  # held out from training and model selection; None: the data has no test split


def seeded_generator(seed, stream):
    """A CPU generator for one named stream of `seed`.

    Streams are derived by hashing rather than `seed + k`, so seed 0's validation stream can never be
    seed 1's training stream. sha256 is the same in every process, platform and Python version.
    """
    digest = hashlib.sha256(f"cr_accel/{seed}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# The built-in builders register themselves on import.
from .files import tensor_files  # noqa: E402
from .hf import hf_dataset  # noqa: E402
from .images import image_folder  # noqa: E402
from .synthetic import synthetic_cr  # noqa: E402

__all__ = ["DATASETS", "DatasetSplits", "hf_dataset", "image_folder", "seeded_generator", "synthetic_cr",
           "tensor_files"]
