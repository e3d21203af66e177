"""Epoch metrics for trackers: the live dashboard and accelerate's standard trackers (TensorBoard, ...).

Everything here runs on the main process only (accelerate logs from there, and the trackers are
created only there): epoch metrics arrive already reduced over all processes, so each tracker gets
exactly one record per epoch whatever the world size.
"""

import os
from pathlib import Path

import torch

from .environment import UNSHARDED_TYPES

DASHBOARD = "cr_accel_dashboard"  # DashboardTracker.name: where log_kwargs for it go


class EpochTrackers:
    samples_per_picture = 4

    def __init__(self, dashboard, standard):
        self.dashboard = dashboard  # a DashboardTracker, or None
        self.standard = list(standard)  # accelerate names from output.trackers, e.g. ["tensorboard"]
        self._pictures = dashboard is not None

    @classmethod
    def for_config(cls, cfg):
        """The trackers of this run on the main process, else None. "Main" is decided from RANK (every
        launcher sets it) because the Accelerator does not exist yet: creating accelerate's PartialState
        before the Accelerator would turn a 2-process launch into a 1-process run."""
        if os.environ.get("RANK", "0") != "0" or not (cfg.dashboard.enabled or cfg.output.trackers):
            return None
        dashboard = None
        if cfg.dashboard.enabled:
            from .dashboard.tracker import DashboardTracker, run_id_for

            name = Path(cfg.output.dir).name
            # The run id is kept in output.dir, so a resumed run reports to the same dashboard run.
            dashboard = DashboardTracker(cfg.dashboard.url, run_name=name, token=cfg.dashboard.token,
                                         run_id=run_id_for(cfg.output.dir, name))
        return cls(dashboard, cfg.output.trackers)

    @property
    def log_with(self):
        return ([self.dashboard] if self.dashboard else []) + self.standard

    def start(self, trainer):
        acc = trainer.accelerator
        acc.init_trackers("cr_accel")
        config = trainer.cfg.to_dict()
        flat = _flatten(config)  # TensorBoard's hparams take scalars only
        for tracker in acc.trackers:
            tracker.store_init_configuration(config if tracker is self.dashboard else flat)
        if self.dashboard:
            # Written only now: before the Accelerator's rendezvous, another process could still be
            # checking that output.dir holds no earlier run.
            from .dashboard.tracker import remember_run_id

            remember_run_id(trainer.output_dir, self.dashboard.run_id)
            self.dashboard.set_start_info(world_size=acc.num_processes, device=str(acc.device),
                                          epochs_done=trainer.epoch)

    def epoch(self, trainer, metrics):
        png = self._samples_png(trainer, metrics["epoch"]) if "val_loss" in metrics else None
        extra = {DASHBOARD: {"samples_png": png}} if png else None
        trainer.accelerator.log(metrics, step=metrics["epoch"], log_kwargs=extra)

    def finish(self, trainer, status):
        if self.dashboard:
            self.dashboard.set_status(status)
        for tracker in trainer.accelerator.trackers:
            tracker.finish()  # the dashboard waits at most a few seconds to deliver what is queued
        if self.dashboard and self.dashboard.dropped:
            trainer.log.info(f"dashboard: {self.dashboard.dropped} message(s) could not be delivered to "
                             f"{trainer.cfg.dashboard.url}", console=False)

    @torch.no_grad()
    def _samples_png(self, trainer, epoch):
        """input | output | target of the first validation samples, also kept as samples/epoch_XXXX.png."""
        from .dashboard.images import samples_png

        acc = trainer.accelerator
        if not self._pictures or acc.distributed_type not in UNSHARDED_TYPES:  # sharded: every rank must run it
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


def _flatten(config):
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; lists and None as text."""
    flat = {}
    for section, values in config.items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for key, value in items:
            name = section if key is None else f"{section}.{key}"
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
