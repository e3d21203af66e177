"""Batches handed over from DataLoader workers in the dtype the data is stored in, expanded once they arrive.

A dataset decoded from 8-bit files (image_folder) can give its samples as stored, `uint8` (`compact_item(i)`),
and turn a batch of those into what `__getitem__` gives (`expand_batch(inputs, targets)`, the same float32
division, so the values are bitwise the same). The workers then collate and pass a quarter of the bytes, and with
a GPU a quarter is copied to the device, where the division runs. Loaders are built with
`loader_arguments(dataset, device, options)`; whoever iterates one expands its batches with `expander(loader)` (the
training loop and `validation.score`).

On the CPU with workers, compact batches travel as NumPy arrays, by value through the workers' pipe, instead of as
tensors in shared memory: receiving a shared-memory tensor costs the training process a file descriptor fetched
from the worker (a round trip to a process that is busy decoding), a mapping and an unmapping per batch. With CUDA
they stay tensors, which the loader pins for asynchronous copies.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset


class Compact(Dataset):
    """`dataset`'s samples as stored; `expand` makes a batch of them what the dataset's own batches are. With
    `as_numpy`, samples are NumPy arrays and `collate` stacks them (batches by value)."""

    def __init__(self, dataset: Any, as_numpy: bool = False) -> None:
        self.dataset = dataset
        self.as_numpy = as_numpy

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset.compact_item(index)
        return tuple(part.numpy() for part in item) if self.as_numpy else item

    def collate(self, samples: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        return tuple(np.stack(column) for column in zip(*samples))

    def expand(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        if isinstance(inputs, np.ndarray):
            inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        return self.dataset.expand_batch(inputs, targets)


def for_loader(dataset: Any, as_numpy: bool = False) -> Any:
    """What a DataLoader over `dataset` reads: its compact view where it has compact samples, else itself."""
    return Compact(dataset, as_numpy) if getattr(dataset, "has_compact_items", False) else dataset


def loader_arguments(dataset: Any, device: torch.device | None, options: dict[str, Any]) -> dict[str, Any]:
    """A DataLoader's `dataset` (and `collate_fn`) for `dataset` and the loader `options` (workers, pinning),
    batches going to `device`: compact batches by value on the CPU with workers (see the module's docstring)."""
    by_value = options.get("num_workers", 0) > 0 and device is not None and device.type == "cpu"
    readable = for_loader(dataset, as_numpy=by_value)
    collate = {"collate_fn": readable.collate} if isinstance(readable, Compact) and by_value else {}
    return {"dataset": readable, **collate, **options}


def expander(loader: Any) -> Callable[[Any, Any], tuple[Any, Any]] | None:
    """The function that expands `loader`'s batches (prepared or not), or None where they need none."""
    dataset = getattr(loader, "dataset", None)
    return dataset.expand if isinstance(dataset, Compact) else None
