"""Batches handed over from DataLoader workers in the dtype the data is stored in, expanded once they arrive.

A dataset decoded from 8-bit files (image_folder) can give its samples as stored, `uint8` (`compact_item(i)`),
and turn a batch of those into what `__getitem__` gives (`expand_batch(inputs, targets)`, the same float32
division, so the values are bitwise the same). The workers then collate and pass a quarter of the bytes, and with
a GPU a quarter is copied to the device, where the division runs. Loaders are built over `for_loader(dataset)`;
whoever iterates one expands its batches with `expander(loader)` (the training loop and `validation.score`).
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset


class Compact(Dataset):
    """`dataset`'s samples as stored; `expand` makes a batch of them what the dataset's own batches are."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset.compact_item(index)

    def expand(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        return self.dataset.expand_batch(inputs, targets)


def for_loader(dataset: Any) -> Any:
    """What a DataLoader over `dataset` reads: its compact view where it has compact samples, else itself."""
    return Compact(dataset) if getattr(dataset, "has_compact_items", False) else dataset


def expander(loader: Any) -> Callable[[Any, Any], tuple[Any, Any]] | None:
    """The function that expands `loader`'s batches (prepared or not), or None where they need none."""
    dataset = getattr(loader, "dataset", None)
    return dataset.expand if isinstance(dataset, Compact) else None
