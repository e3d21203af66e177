"""The Trainer's validation: exact means over the validation set for any number of processes, one reduction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .losses import loss_and_terms

if TYPE_CHECKING:
    from accelerate import Accelerator

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

    @torch.no_grad()
    def validate(self, confusion: bool = False, loader: Any = None) -> dict[str, float]:
        """Exact means over the validation set (or the prepared `loader`'s) for any number of processes, with
        one reduction at the end:
        `val_loss`, `val_loss/<term>` for a loss with named terms, `val_<metric>` per metric. With `confusion`
        (classification), also the confusion matrix counts, kept in `self.last_confusion`.

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
        self.model.eval()
        acc = self.accelerator
        state = acc.gradient_state
        sums: dict[str, torch.Tensor] = {}  # float64 sums on the device: no sync until the end
        counts = None
        count = 0
        for inputs, targets in self.progress.validation(self.val_loader if loader is None else loader):
            outputs = self.model(inputs)
            weight = 1
            if acc.num_processes > 1 and state.end_of_dataloader and state.remainder != 0:
                outputs, targets = acc.gather_for_metrics((outputs, targets))
                weight = int(acc.is_main_process)  # every process now holds the same batch: count it once
            n = len(targets) * weight
            loss, terms = loss_and_terms(self.loss_fn(outputs, targets))
            values = {"val_loss": loss.double() * n, **{f"val_loss/{k}": v.double() * n for k, v in (terms or {}).items()}}
            values.update({f"val_{name}": fn(outputs, targets).double().sum() * weight
                           for name, fn in self.metric_fns.items()})
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
        self.last_confusion = (torch.tensor(values[len(names) + 1:]).round().long().view(counts.shape)
                               if counts is not None else None)
        self.model.train()
        return {name: v / max(count, 1) for name, v in zip(names, values)}


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
