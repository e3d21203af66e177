"""What the trainer tells the dashboard: a start message, each epoch (with a samples picture), the end.

Lives on the main process only (accelerate logs from there): epoch metrics arrive already reduced
over all processes, so the dashboard gets exactly one message per epoch whatever the world size.
"""

import os
from pathlib import Path

import torch
from accelerate.utils import DistributedType

_UNSHARDED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class DashboardReporter:
    samples_per_picture = 4

    def __init__(self, tracker):
        self.tracker = tracker
        self._pictures = True

    @classmethod
    def for_config(cls, cfg):
        """A reporter when `dashboard.enabled` on the main process, else None. Decided from RANK (every
        launcher sets it) because the Accelerator does not exist yet: creating accelerate's PartialState
        before the Accelerator would turn a 2-process launch into a 1-process run."""
        if not cfg.dashboard.enabled or os.environ.get("RANK", "0") != "0":
            return None
        from .tracker import DashboardTracker, run_id_for

        name = Path(cfg.output.dir).name
        # The run id is kept in output.dir, so a resumed run reports to the same dashboard run.
        tracker = DashboardTracker(cfg.dashboard.url, run_name=name, token=cfg.dashboard.token,
                                   run_id=run_id_for(cfg.output.dir, name))
        return cls(tracker)

    def start(self, trainer):
        acc = trainer.accelerator
        self.tracker.set_start_info(world_size=acc.num_processes, device=str(acc.device), epochs_done=trainer.epoch)
        acc.init_trackers("cr_accel", config=trainer.cfg.to_dict())

    def epoch(self, trainer, metrics):
        png = self._samples_png(trainer, metrics["epoch"]) if "val_loss" in metrics else None
        trainer.accelerator.log({**metrics, "samples_png": png} if png else metrics, step=metrics["epoch"])

    def finish(self, trainer, status):
        self.tracker.set_status(status)
        self.tracker.finish()  # waits at most a few seconds to deliver what is queued; never raises
        if self.tracker.dropped:
            trainer.log.info(f"dashboard: {self.tracker.dropped} message(s) could not be delivered to "
                             f"{trainer.cfg.dashboard.url}", console=False)

    @torch.no_grad()
    def _samples_png(self, trainer, epoch):
        """input | output | target of the first validation samples, also kept as samples/epoch_XXXX.png."""
        from .images import samples_png

        acc = trainer.accelerator
        if not self._pictures or acc.distributed_type not in _UNSHARDED:  # sharded: every rank must run it
            return None
        val = trainer.data.val
        pairs = [val[i] for i in range(min(self.samples_per_picture, len(val)))]
        model = acc.unwrap_model(trainer.model)
        try:
            inputs = torch.stack([torch.as_tensor(p[0]) for p in pairs]).to(acc.device)
            targets = torch.stack([torch.as_tensor(p[1]) for p in pairs])
            model.eval()
            png = samples_png(inputs, model(inputs), targets)
        except (ValueError, TypeError, RuntimeError) as exc:  # e.g. class labels: nothing to draw
            self._pictures = False
            trainer.log.info(f"dashboard: no samples picture for this task ({exc})", console=False)
            return None
        finally:
            model.train()
        path = trainer.output_dir / "samples" / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png
