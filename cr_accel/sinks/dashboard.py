"""The live dashboard (`cr-accel dashboard`): step and epoch records and the samples picture, sent by
DashboardTracker's background thread, so a slow or absent server never holds training up. Its notices (the
server is unreachable, back, messages dropped) go into train.log only, never onto the console."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import RunStart, Sink


def dashboard_tracker(cfg: Any, log: Any) -> Any:
    """The run's DashboardTracker; its run id is kept in output.dir, so a resumed run reports to the same run."""
    from ..dashboard.tracker import DashboardTracker, run_id_for

    name = Path(cfg.output.dir).name
    return DashboardTracker(cfg.dashboard.url, run_name=name, token=cfg.dashboard.token,
                            run_id=run_id_for(cfg.output.dir, name),
                            report=lambda line: log.info(line, console=False))


class DashboardSink(Sink):
    def __init__(self, tracker: Any, output_dir: Any) -> None:
        self.tracker = tracker
        self.output_dir = output_dir
        self._png: bytes | None = None  # the epoch's picture, sent with its epoch record

    def start(self, run: RunStart) -> None:
        from ..dashboard.tracker import remember_run_id

        # Written only now: before the Accelerator's rendezvous another process could still be checking that
        # output.dir holds no earlier run.
        remember_run_id(self.output_dir, self.tracker.run_id)
        self.tracker.set_start_info(world_size=run.world_size, device=run.device, epochs_done=run.epochs_done,
                                    steps_done=run.steps_done)
        self.tracker.start()
        self.tracker.store_init_configuration(run.config)

    def log_step(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k not in ("step", "epoch")}
        self.tracker.log_step(record["step"], record["epoch"], values)

    def log_image(self, name: str, png: bytes, step: int, epoch: int) -> None:
        if name == "samples":
            self._png = png

    def log_epoch(self, record: dict[str, Any]) -> None:
        png, self._png = self._png, None
        self.tracker.log(record, step=record["epoch"], samples_png=png)

    def finish(self, status: str) -> None:
        self.tracker.set_status(status)
        self.tracker.finish()  # says itself (through `report`) what it could not deliver
