"""Per-step training values held on the device and read in one transfer at log intervals.

Reading a loss with `.item()` every step would make the host wait for the device every step. Instead
the detached tensors are kept in lists and stacked once per interval; with several processes the
processes agree on non-finite losses at the same points, so all of them stop together.

Epoch means are exact sums (math.fsum) of the per-micro-batch values, so they do not depend on where the
intervals fell: a run resumed mid-epoch logs the same train_loss as the uninterrupted one.
"""

import math

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


class StepStats:
    def __init__(self, accelerator, allow_nonfinite):
        self.accelerator = accelerator
        self.allow_nonfinite = allow_nonfinite
        self._losses, self._loss_steps, self._norms = [], [], []
        self.reset_epoch()

    def reset_epoch(self):
        self.losses = []  # finite micro-batch losses of this epoch, on the host
        self.norms = []  # finite pre-clip gradient norms of this epoch's optimizer steps
        self.skipped_steps = 0
        self.samples = 0
        self.last_loss = math.nan

    def add_loss(self, loss, step):
        """`loss` of one micro-batch, computed while optimizer step `step` was being accumulated."""
        self._losses.append(loss.detach())
        self._loss_steps.append(step)

    def add_grad_norm(self, norm):
        self._norms.append(_plain(norm))

    def flush(self):
        """Bring the pending values to the host (one sync); raise NonFiniteLossError on any process's NaN."""
        if not self._losses:  # (the same on every process: they all run the same micro-batches)
            return
        first_bad = self._pull()
        if not self.allow_nonfinite and self.accelerator.num_processes > 1:
            mine = torch.tensor([first_bad if first_bad >= 0 else _NONE], device=self.accelerator.device)
            first_bad = self._earliest(self.accelerator.gather(mine))
        self._raise_if_bad(first_bad)

    def _pull(self):
        """Move the pending values to the host; returns this process's first non-finite step (-1: none)."""
        if not self._losses:
            return -1
        losses = torch.stack(self._losses).float().cpu().tolist()
        norms = torch.stack(self._norms).float().cpu().tolist() if self._norms else []
        first_bad = next((s for v, s in zip(losses, self._loss_steps) if not math.isfinite(v)), -1)
        finite = [v for v in losses if math.isfinite(v)]
        self.losses += finite
        self.norms += [v for v in norms if math.isfinite(v)]
        if finite:
            self.last_loss = finite[-1]
        self._losses, self._loss_steps, self._norms = [], [], []
        return first_bad

    @staticmethod
    def _earliest(first_bad_column):
        earliest = int(first_bad_column.min())
        return earliest if earliest < _NONE else -1

    def _raise_if_bad(self, first_bad):
        if first_bad >= 0 and not self.allow_nonfinite:
            raise NonFiniteLossError(
                f"the training loss is not finite at optimizer step {first_bad + 1}; "
                "the parameters are no longer usable, so training stops here. Lower optimizer.lr, "
                "set training.grad_clip, check the data for NaN/inf, or set training.skip_nonfinite: true "
                "to skip such steps"
            )

    def epoch_totals(self):
        """Epoch means over all processes: train loss per micro-batch, pre-clip gradient norm per step.

        One collective: the non-finite check of the last values and the epoch's sums travel in one gather
        (a flush and a separate reduction were two blocking round trips per epoch)."""
        first_bad = self._pull()
        acc = self.accelerator
        local = torch.tensor([[first_bad if first_bad >= 0 else _NONE, math.fsum(self.losses), len(self.losses),
                               self.samples, self.skipped_steps]], dtype=torch.float64, device=acc.device)
        rows = acc.gather(local) if acc.num_processes > 1 else local
        self._raise_if_bad(self._earliest(rows[:, 0]))
        loss_sum, loss_count, samples, skipped = rows[:, 1:].sum(0).tolist()
        # Gradients are all-reduced before clipping, so every process saw the same norms.
        return {
            "train_loss": loss_sum / loss_count if loss_count else math.nan,
            "grad_norm": math.fsum(self.norms) / len(self.norms) if self.norms else math.nan,
            "samples": int(samples),
            "skipped_steps": int(skipped),
        }

    def state_dict(self):
        """The unfinished epoch's values (JSON), so a mid-epoch resume logs the same epoch means."""
        self.flush()
        return {"losses": self.losses, "norms": self.norms, "skipped_steps": self.skipped_steps,
                "samples": self.samples}

    def load_state_dict(self, state):
        self.reset_epoch()
        self.losses = [float(v) for v in state["losses"]]
        self.norms = [float(v) for v in state["norms"]]
        self.skipped_steps = int(state["skipped_steps"])
        self.samples = int(state["samples"])


class EpochStatsState:
    """The unfinished epoch's values of every process, as one checkpoint part (gathered on every process).

    On resume each process continues its own values; on another number of processes (elastic resume) the
    sums move to process 0 -- the epoch means add them up over processes anyway -- and every process keeps
    process 0's gradient norms, which all processes share (gradients are all-reduced before clipping)."""

    def __init__(self, stats, accelerator, mid_epoch):
        self.stats = stats
        self.accelerator = accelerator
        self.mid_epoch = mid_epoch  # () -> bool: at an epoch end there is nothing to continue

    def state_dict(self):
        from accelerate.utils import gather_object

        if not self.mid_epoch():
            return {"per_process": None}
        mine = self.stats.state_dict()
        return {"per_process": gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]}

    def load_state_dict(self, state):
        saved, rank = state["per_process"], self.accelerator.process_index
        if saved is None:
            return
        if len(saved) == self.accelerator.num_processes:
            self.stats.load_state_dict(saved[rank])
            return
        merged = {"losses": [v for s in saved for v in s["losses"]], "norms": saved[0]["norms"],
                  "skipped_steps": sum(s["skipped_steps"] for s in saved), "samples": sum(s["samples"] for s in saved)}
        empty = {"losses": [], "norms": saved[0]["norms"], "skipped_steps": 0, "samples": 0}
        self.stats.load_state_dict(merged if rank == 0 else empty)
