"""Per-step training values held on the device and read in one transfer at log intervals.

Reading a loss with `.item()` every step would make the host wait for the device every step. Instead
the detached tensors (the loss, each loss term, the gradient norm) are kept in lists and stacked once per
interval. At each log point the processes reduce the interval's sums in one gather, which also carries their
non-finite checks, so all of them stop together; the step record holds the means over every process.

Epoch means are exact sums (math.fsum) of the per-micro-batch values, so they do not depend on where the
intervals fell: a run resumed mid-epoch logs the same train_loss as the uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

_NONE = 2**62  # "no non-finite step" in a min over processes (exact in float64 too)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the optimizer step."""


def _plain(value):
    """A DTensor (FSDP2's gradient norm is one, replicated on every process) as the plain tensor it holds;
    reading the local copy of a replicated value costs no communication."""
    placements = getattr(value, "placements", None)
    if placements is None:
        return value
    return value.to_local() if all(p.is_replicate() for p in placements) else value.full_tensor()


class _Values:
    """Finite host values of a span of training (an epoch, or the interval since the last step record)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.terms: dict[str, list[float]] = {}
        self.norms: list[float] = []

    def add(self, losses: list[float], terms: dict[str, list[float]], norms: list[float]) -> None:
        self.losses += losses
        for name, values in terms.items():
            self.terms.setdefault(name, []).extend(values)
        self.norms += norms

    def sums(self, term_names: list[str]) -> list[float]:
        """[loss sum, loss count, then each term's sum and count]: the row the processes add up."""
        row = [math.fsum(self.losses), len(self.losses)]
        for name in term_names:
            values = self.terms.get(name, [])
            row += [math.fsum(values), len(values)]
        return row


class StepStats:
    def __init__(self, accelerator: Any, allow_nonfinite: bool) -> None:
        self.accelerator = accelerator
        self.allow_nonfinite = allow_nonfinite
        self._losses: list[torch.Tensor] = []
        self._loss_steps: list[int] = []
        self._terms: dict[str, list[torch.Tensor]] = {}
        self._norms: list[torch.Tensor] = []
        self.term_names: list[str] = []  # in the order the loss returns them (the same on every process)
        self.interval = _Values()
        self.reset_epoch()

    def reset_epoch(self) -> None:
        self.epoch = _Values()  # finite values of this epoch, on the host
        self.skipped_steps = 0
        self.samples = 0
        self.last_loss = math.nan

    # Epoch values by their earlier names (checkpoints and benchmarks read them).
    @property
    def losses(self) -> list[float]:
        return self.epoch.losses

    @property
    def norms(self) -> list[float]:
        return self.epoch.norms

    def add_loss(self, loss: torch.Tensor, step: int, terms: dict[str, torch.Tensor] | None = None) -> None:
        """`loss` of one micro-batch (and its named terms), computed while optimizer step `step` was being
        accumulated."""
        self._losses.append(loss.detach())
        self._loss_steps.append(step)
        if terms:
            for name, value in terms.items():
                if name not in self._terms:
                    self._terms[name] = []
                    if name not in self.term_names:
                        self.term_names.append(name)
                self._terms[name].append(value.detach())

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        self._norms.append(_plain(norm))

    def flush(self) -> None:
        """Bring the pending values to the host (one sync); raise NonFiniteLossError on any process's NaN."""
        if not self._losses:  # (the same on every process: they all run the same micro-batches)
            return
        first_bad = self._pull()
        if not self.allow_nonfinite and self.accelerator.num_processes > 1:
            mine = torch.tensor([first_bad if first_bad >= 0 else _NONE], device=self.accelerator.device)
            first_bad = self._earliest(self.accelerator.gather(mine))
        self._raise_if_bad(first_bad)

    def step_record(self) -> dict[str, float]:
        """The means since the last step record, over every process: loss, each `loss/<term>`, grad_norm (the
        norm is the same on every process: gradients are all-reduced before clipping). One gather carries the
        processes' sums and their non-finite checks."""
        first_bad = self._pull()
        sums, first_bad = self._reduce(self.interval.sums(self.term_names), first_bad)
        self._raise_if_bad(first_bad)
        record = {"loss": _mean(sums[0], sums[1])}
        for i, name in enumerate(self.term_names):
            record[f"loss/{name}"] = _mean(sums[2 + 2 * i], sums[3 + 2 * i])
        norms = self.interval.norms
        record["grad_norm"] = math.fsum(norms) / len(norms) if norms else math.nan
        self.interval = _Values()
        if not math.isnan(record["loss"]):
            self.last_loss = record["loss"]
        return record

    def _pull(self) -> int:
        """Move the pending values to the host; returns this process's first non-finite step (-1: none)."""
        if not self._losses:
            return -1
        losses = torch.stack(self._losses).float().cpu().tolist()
        norms = torch.stack(self._norms).float().cpu().tolist() if self._norms else []
        terms = {name: torch.stack(values).float().cpu().tolist() for name, values in self._terms.items() if values}
        first_bad = next((s for v, s in zip(losses, self._loss_steps) if not math.isfinite(v)), -1)
        finite = ([v for v in losses if math.isfinite(v)], {n: [v for v in vs if math.isfinite(v)]
                                                             for n, vs in terms.items()},
                  [v for v in norms if math.isfinite(v)])
        self.epoch.add(*finite)
        self.interval.add(*finite)
        if finite[0]:
            self.last_loss = finite[0][-1]
        self._losses, self._loss_steps, self._norms = [], [], []
        self._terms = {name: [] for name in self._terms}
        return first_bad

    def _reduce(self, row: list[float], first_bad: int, extra_max: Sequence[float] = ()) -> tuple[list[float], int]:
        """(row summed over processes, the earliest non-finite step of any process), in one gather; `extra_max`
        values are appended and reduced by max."""
        acc = self.accelerator
        local = torch.tensor([[first_bad if first_bad >= 0 else _NONE, *row, *extra_max]], dtype=torch.float64,
                             device=acc.device)
        rows = acc.gather(local) if acc.num_processes > 1 else local
        reduced = [rows[:, 1:1 + len(row)].sum(0)]
        if extra_max:
            reduced.append(rows[:, 1 + len(row):].max(0).values)
        return torch.cat(reduced).tolist(), self._earliest(rows[:, 0])  # one read for both

    @staticmethod
    def _earliest(first_bad_column: torch.Tensor) -> int:
        earliest = int(first_bad_column.min())
        return earliest if earliest < _NONE else -1

    def _raise_if_bad(self, first_bad: int) -> None:
        if first_bad >= 0 and not self.allow_nonfinite:
            raise NonFiniteLossError(
                f"the training loss is not finite at optimizer step {first_bad + 1}; "
                "the parameters are no longer usable, so training stops here. Lower optimizer.lr, "
                "set training.grad_clip, check the data for NaN/inf, or set training.skip_nonfinite: true "
                "to skip such steps"
            )

    def epoch_totals(self, memory: dict[str, float] | None = None) -> dict[str, Any]:
        """Epoch means over all processes: train loss per micro-batch (and per term), pre-clip gradient norm
        per step; `memory` readings of this process, reduced by max over processes.

        One collective: the non-finite check of the last values, the epoch's sums and the memory readings
        travel in one gather (a flush and a separate reduction were two blocking round trips per epoch)."""
        first_bad = self._pull()
        memory = memory or {}
        row = [*self.epoch.sums(self.term_names), self.samples, self.skipped_steps]
        sums, first_bad = self._reduce(row, first_bad, extra_max=list(memory.values()))
        self._raise_if_bad(first_bad)
        totals: dict[str, Any] = {"train_loss": _mean(sums[0], sums[1])}
        for i, name in enumerate(self.term_names):
            totals[f"train_loss/{name}"] = _mean(sums[2 + 2 * i], sums[3 + 2 * i])
        norms = self.epoch.norms
        totals["grad_norm"] = math.fsum(norms) / len(norms) if norms else math.nan
        after_terms = 2 + 2 * len(self.term_names)
        totals["samples"], totals["skipped_steps"] = int(sums[after_terms]), int(sums[after_terms + 1])
        totals.update(zip(memory, sums[after_terms + 2:]))
        return totals

    def state_dict(self) -> dict[str, Any]:
        """The unfinished epoch's values and the values since the last step record (JSON), so a resumed run logs
        the same epoch means and step records as the uninterrupted one."""
        self.flush()
        return {**_values_state(self.epoch), "skipped_steps": self.skipped_steps, "samples": self.samples,
                "interval": _values_state(self.interval)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`interval` and `terms` are missing from checkpoints written before step records: empty then."""
        self.reset_epoch()
        self.epoch = _values_from(state)
        self.interval = _values_from(state.get("interval", {}))
        for name in [*self.epoch.terms, *self.interval.terms]:
            if name not in self.term_names:
                self.term_names.append(name)
        self.skipped_steps = int(state["skipped_steps"])
        self.samples = int(state["samples"])


def _values_state(values: _Values) -> dict[str, Any]:
    return {"losses": values.losses, "norms": values.norms, "terms": values.terms}


def _values_from(state: dict[str, Any]) -> _Values:
    values = _Values()
    values.losses = [float(v) for v in state.get("losses", [])]
    values.norms = [float(v) for v in state.get("norms", [])]
    values.terms = {str(n): [float(v) for v in vs] for n, vs in state.get("terms", {}).items()}
    return values


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan


class EpochStatsState:
    """The unfinished epoch's values and those since the last step record, of every process, as one checkpoint
    part (gathered on every process).

    On resume each process continues its own values; on another number of processes (elastic resume) the
    sums move to process 0 -- the means add them up over processes anyway -- and every process keeps
    process 0's gradient norms, which all processes share (gradients are all-reduced before clipping). At an
    epoch boundary the epoch's values are not continued (the next epoch starts its own), the interval's are."""

    def __init__(self, stats: StepStats, accelerator: Any) -> None:
        self.stats = stats
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        mine = self.stats.state_dict()
        return {"per_process": gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, rank = state["per_process"], self.accelerator.process_index
        if saved is None:  # an epoch-end checkpoint from before step records
            return
        if len(saved) == self.accelerator.num_processes:
            self.stats.load_state_dict(saved[rank])
            return
        merged = {**_merged(saved), "skipped_steps": sum(s["skipped_steps"] for s in saved),
                  "samples": sum(s["samples"] for s in saved),
                  "interval": _merged([s.get("interval", {}) for s in saved])}
        empty = {"losses": [], "norms": saved[0]["norms"], "terms": {}, "skipped_steps": 0, "samples": 0,
                 "interval": {"norms": saved[0].get("interval", {}).get("norms", [])}}
        self.stats.load_state_dict(merged if rank == 0 else empty)


def _merged(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Every process's losses and terms in one list each; the (shared) gradient norms of process 0."""
    terms: dict[str, list[float]] = {}
    for s in states:
        for name, values in s.get("terms", {}).items():
            terms.setdefault(name, []).extend(values)
    return {"losses": [v for s in states for v in s.get("losses", [])], "norms": states[0].get("norms", []),
            "terms": terms}
