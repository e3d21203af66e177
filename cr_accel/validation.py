"""Validation: exact means over a set for any number of processes, one reduction; the Trainer's validation, the
test score at the end of training and `cr-accel evaluate` share it."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import DataLoader

from .data import handover
from .losses import loss_and_terms

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .data.normalize import Normalization
    from .progress import Progress


class ValidationMixin:
    # What the Trainer it is mixed into provides.
    accelerator: Accelerator
    model: Any
    val_loader: Any
    loss_fn: Any
    metric_fns: dict[str, Any]
    progress: Progress
    last_confusion: torch.Tensor | None
    normalization: Normalization

    def validate(self, confusion: bool = False, loader: Any = None) -> dict[str, float]:
        """`score` of the model on the validation set (or the prepared `loader`'s); with `confusion`
        (classification), the confusion matrix counts are kept in `self.last_confusion`."""
        self.model.eval()
        model = functools.partial(self.normalization.run, self.model)  # raw inputs in, outputs in the data's units
        metrics, self.last_confusion = score(self.accelerator, model, self.val_loader if loader is None else loader,
                                             self.loss_fn, self.metric_fns, self.progress.validation, confusion)
        self.model.train()
        return metrics


@torch.no_grad()
def score(acc: Accelerator, model: Any, loader: Any, loss_fn: Any, metric_fns: dict[str, Any],
          batches: Callable[[Any], Any] = iter, confusion: bool = False) -> tuple[dict[str, float], torch.Tensor | None]:
    """Exact means over a prepared loader's set for any number of processes, with one reduction at the end:
    `val_loss`, `val_loss/<term>` for a loss with named terms, `val_<metric>` per metric (`renamed_for_split`
    names them for another split). With `confusion` (classification), also the confusion matrix counts (else
    None). `batches(loader)` iterates the loader (a progress bar's wrapper); the model is used as it is (the
    caller puts it in eval mode). Validation, the test score at the end of training and `cr-accel evaluate`
    all go through here, so they give the same numbers for the same weights and batches.

    Each process sums the values of its own batches (a loss that returns the batch mean counts as mean x
    batch size; metrics return one value per sample). Only the last batch can hold duplicates: accelerate
    pads it with samples from the start to give every process a full batch. Where the set does not split
    evenly (a non-zero `remainder`), that batch alone is gathered (gather_for_metrics keeps exactly the
    remaining real samples) and counted once, on the main process (every process computes it, with weight
    0 elsewhere, so all of them reduce the same values). Gathering every batch instead made every process
    wait for the others and recompute the world's loss at each batch: the CPU time each process spent on
    4,032 more samples fell only 1.27x from 1 to 2 processes, 1.92x now (bench/ddp_throughput.py
    --validation).
    """
    state = acc.gradient_state
    sums: dict[str, torch.Tensor] = {}  # float64 sums on the device: no sync until the end
    counts = None
    count = 0
    expand = handover.expander(loader)  # 8-bit images arrive as uint8
    for inputs, targets in batches(loader):
        if expand is not None:
            inputs, targets = expand(inputs, targets)
        outputs = model(inputs)
        weight = 1
        if acc.num_processes > 1 and state.end_of_dataloader and state.remainder != 0:
            outputs, targets = acc.gather_for_metrics((outputs, targets))
            weight = int(acc.is_main_process)  # every process now holds the same batch: count it once
        n = len(targets) * weight
        loss, terms = loss_and_terms(loss_fn(outputs, targets))
        values = {"val_loss": loss.double() * n, **{f"val_loss/{k}": v.double() * n for k, v in (terms or {}).items()}}
        values.update({f"val_{name}": fn(outputs, targets).double().sum() * weight for name, fn in metric_fns.items()})
        for name, value in values.items():
            sums[name] = sums[name] + value if name in sums else value
        if confusion:
            counts = _add_confusion(counts, outputs, targets, weight)
        count += n
    names = list(sums)
    totals = torch.stack([*sums.values(), torch.tensor(float(count), dtype=torch.float64, device=acc.device)])
    if counts is not None:
        totals = torch.cat([totals, counts.double().flatten()])
    if acc.num_processes > 1:
        totals = acc.reduce(totals, reduction="sum")
    values = totals.tolist()
    count = values[len(names)]
    matrix = torch.tensor(values[len(names) + 1:]).round().long().view(counts.shape) if counts is not None else None
    return {name: v / max(count, 1) for name, v in zip(names, values)}, matrix


def pins_memory(data_cfg: Any, device: torch.device | None) -> bool:
    """`data.pin_memory` as given, else (null) on when batches go to a CUDA device: page-locked host memory is
    what lets the host-to-device copy run without blocking (the accelerator's `non_blocking`)."""
    if data_cfg.pin_memory is not None:
        return bool(data_cfg.pin_memory)
    return device is not None and device.type == "cuda"


def loader_options(data_cfg: Any, device: torch.device | None) -> dict[str, Any]:
    """The DataLoader keywords `data.*` sets, for every loader of a run. The worker keys only go with workers
    (torch refuses them without); the config check says so before anything is built."""
    d = data_cfg
    options: dict[str, Any] = {"num_workers": d.num_workers, "pin_memory": pins_memory(d, device)}
    if d.num_workers > 0:
        options.update(persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor,
                       worker_init_fn=yield_to_training)
    return options


WORKER_NICENESS = 5  # how much lower the workers' CPU priority is than the training process's


def yield_to_training(worker_id: int) -> None:
    """Runs in each DataLoader worker as it starts: a lower CPU priority (nice) than the training process. Where
    cores are fewer than workers + 1, the training step then keeps its core and the workers, which load ahead into a
    bounded queue, take the cycles it leaves; with cores to spare it changes nothing."""
    import os

    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not permitted here: the workers keep the priority they started with
        pass


def eval_loader(data_cfg: Any, dataset: Any, batch_size: int | None = None,
                device: torch.device | None = None) -> DataLoader:
    """The (unprepared) loader validation reads a set with: in order, `data.val_batch_size` samples per process,
    else `batch_size` (the training micro-batch), else `data.batch_size`. The same batches give the same sums,
    so every scorer of a set builds its loader here. `device`: where the batches go (decides a null pin_memory)."""
    d = data_cfg
    return DataLoader(batch_size=d.val_batch_size or batch_size or d.batch_size, shuffle=False,
                      **handover.loader_arguments(dataset, device, loader_options(d, device)))


def renamed_for_split(metrics: dict[str, float], split: str) -> dict[str, float]:
    """The metrics of `score` named for `split`: for "test", `val_loss` -> `test_loss`, `val_loss/<term>` ->
    `test_loss/<term>`, `val_<metric>` -> `test_<metric>`; "val" keeps them."""
    return {f"{split}_{key[len('val_'):]}": value for key, value in metrics.items()}


def renamed_for_set(metrics: dict[str, float], name: str) -> dict[str, float]:
    """The metrics of validation set `name` (data.val_sets): `val_loss` -> `val/<name>/loss`, `val_loss/<term>`
    -> `val/<name>/loss/<term>`, `val_<metric>` -> `val/<name>/<metric>`."""
    return {f"val/{name}/{key[len('val_'):]}": value for key, value in metrics.items()}


def _add_confusion(counts: torch.Tensor | None, outputs: torch.Tensor, targets: torch.Tensor,
                   weight: int) -> torch.Tensor:
    """counts[true, predicted] of class scores `outputs` (N, K) against labels `targets` (N,), on the device."""
    k = outputs.shape[1]
    batch = torch.bincount(targets.long() * k + outputs.argmax(dim=1), minlength=k * k).view(k, k) * weight
    return batch if counts is None else counts + batch
