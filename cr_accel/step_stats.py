"""Per-step training values held on the device and read in one transfer at log intervals.

Reading a loss with `.item()` every step would make the host wait for the device every step. Instead
the detached tensors are kept in lists and stacked once per interval; with several processes the
processes agree on non-finite losses at the same points, so all of them stop together.
"""

import math

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the optimizer step."""


class StepStats:
    def __init__(self, accelerator, allow_nonfinite):
        self.accelerator = accelerator
        self.allow_nonfinite = allow_nonfinite
        self._losses, self._loss_steps, self._norms = [], [], []
        self.reset_epoch()

    def reset_epoch(self):
        self.loss_sum = 0.0
        self.loss_count = 0
        self.norm_sum = 0.0
        self.norm_count = 0
        self.skipped_steps = 0
        self.samples = 0
        self.last_loss = math.nan

    def add_loss(self, loss, step):
        """`loss` of one micro-batch, computed while optimizer step `step` was being accumulated."""
        self._losses.append(loss.detach())
        self._loss_steps.append(step)

    def add_grad_norm(self, norm):
        self._norms.append(norm)

    def flush(self):
        """Bring the pending values to the host (one sync); raise NonFiniteLossError on any process's NaN."""
        if not self._losses:
            return
        losses = torch.stack(self._losses).float().cpu()
        norms = torch.stack(self._norms).float().cpu() if self._norms else torch.empty(0)
        finite = torch.isfinite(losses)
        first_bad = self._loss_steps[int((~finite).nonzero()[0])] if not finite.all() else -1
        if not self.allow_nonfinite:
            first_bad = self._first_bad_on_any_process(first_bad)
            if first_bad >= 0:
                raise NonFiniteLossError(
                    f"the training loss is not finite at optimizer step {first_bad + 1}; "
                    "the parameters are no longer usable, so training stops here. Lower optimizer.lr, "
                    "set training.grad_clip, check the data for NaN/inf, or set training.skip_nonfinite: true "
                    "to skip such steps"
                )
        self.loss_sum += float(losses[finite].sum())
        self.loss_count += int(finite.sum())
        finite_norms = norms[torch.isfinite(norms)]
        self.norm_sum += float(finite_norms.sum())
        self.norm_count += len(finite_norms)
        self.last_loss = float(losses[finite][-1]) if finite.any() else math.nan
        self._losses, self._loss_steps, self._norms = [], [], []

    def _first_bad_on_any_process(self, first_bad):
        if self.accelerator.num_processes == 1:
            return first_bad
        mine = torch.tensor([first_bad if first_bad >= 0 else 2**62], device=self.accelerator.device)
        earliest = int(self.accelerator.gather(mine).min())
        return earliest if earliest < 2**62 else -1

    def epoch_totals(self):
        """Epoch means over all processes: train loss per micro-batch, pre-clip gradient norm per step."""
        self.flush()
        acc = self.accelerator
        local = torch.tensor([self.loss_sum, self.loss_count, self.samples, self.skipped_steps],
                             dtype=torch.float64, device=acc.device)
        total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        loss_sum, loss_count, samples, skipped = total.tolist()
        # Gradients are all-reduced before clipping, so every process saw the same norms.
        grad_norm = self.norm_sum / self.norm_count if self.norm_count else math.nan
        return {
            "train_loss": loss_sum / loss_count if loss_count else math.nan,
            "grad_norm": grad_norm,
            "samples": int(samples),
            "skipped_steps": int(skipped),
        }
