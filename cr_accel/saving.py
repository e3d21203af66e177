"""How the Trainer saves checkpoints: synchronously, or with only a host-memory copy at the step boundary
and the write in the background (checkpoint/async_writer.py). Mixed into the Trainer; the policy of when
to save stays in the loop."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .callbacks import Event
from .checkpoint.async_writer import take_snapshot
from .disk import WriteError, write_failure

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .callbacks import CallbackList
    from .checkpoint import Checkpoints
    from .checkpoint.async_writer import BackgroundSave, Snapshot
    from .run_log import TextLog
    from .state import StateRegistry


class SavingMixin:
    # What the Trainer it is mixed into provides.
    accelerator: Accelerator
    checkpoints: Checkpoints
    registry: StateRegistry
    background_save: BackgroundSave
    callbacks: CallbackList
    text_log: TextLog
    async_save: bool
    global_step: int
    epoch: int
    model: Any
    optimizer: Any
    _unannounced: list[Path]

    if TYPE_CHECKING:
        @property
        def config_yaml(self) -> str: ...

    def save_checkpoint(self, targets: list[str]) -> list[Path]:
        """Save the full state at this optimizer-step boundary into `targets` (periodic, last, best). With
        asynchronous saves only the copy into host memory happens here; the write runs in the background."""
        started = time.perf_counter()
        self.background_save.wait()  # at most one save in flight
        self._announce_checkpoints()
        ckpts, acc = self.checkpoints, self.accelerator
        state = self.registry.state_dict()
        summary = {"world_size": acc.num_processes, "global_step": self.global_step, "epoch": self.epoch}
        tmp = ckpts.prepare_folder(self.global_step)
        if self.async_save:
            snapshot = take_snapshot(acc)
            self.background_save.start(lambda: self._write_snapshot(snapshot, tmp, state, targets, summary))
        else:
            with self._explaining_write_failures(tmp, self.global_step):
                acc.save_state(str(tmp))
                ckpts.write_own_files(tmp, state, self.config_yaml)
                acc.wait_for_everyone()  # every process has written its files
                if acc.is_main_process:
                    ckpts.publish(tmp, targets, summary)
            acc.wait_for_everyone()
        paths = [ckpts.root / name for name in ckpts.target_names(self.global_step, targets)]
        how = "started in the background" if self.async_save else "written"
        self.text_log.info(f"checkpoint at step {self.global_step} -> {', '.join(p.name for p in paths)} {how} "
                      f"({time.perf_counter() - started:.2f} s)", console=False)
        self._unannounced += paths
        if not self.async_save:
            self._announce_checkpoints()
        return paths

    def _write_snapshot(self, snapshot: Snapshot, tmp: Path, state: tuple, targets: list[str],
                        summary: dict[str, Any]) -> None:
        """The background half of an asynchronous save: this process's files, then (main) publishing once
        every process has marked its files done."""
        with self._explaining_write_failures(tmp, summary["global_step"], snapshot.nbytes()):
            snapshot.write(tmp)
            self.checkpoints.write_own_files(tmp, state, self.config_yaml)
            self.checkpoints.mark_written(tmp, snapshot.process_index)
            if self.accelerator.is_main_process:
                self.checkpoints.wait_for_marks(tmp, self.accelerator.num_processes)
                self.checkpoints.publish(tmp, targets, summary)

    @contextlib.contextmanager
    def _explaining_write_failures(self, tmp: Path, step: int, state_bytes: int | None = None) -> Iterator[None]:
        """A save that fails for the file system (a full disk, a read-only folder) becomes one WriteError that
        says how much space there is and a checkpoint takes; the half-written folder is removed (it would hold
        space and is never used), so the earlier checkpoints are all that is left, as they were."""
        try:
            yield
        except Exception as exc:
            ckpts = self.checkpoints
            needed = ckpts.newest_size() or state_bytes or _state_bytes(self.model, self.optimizer)
            error = write_failure(exc, f"the checkpoint of step {step}", ckpts.root, needed)
            if error is None:
                raise
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            earlier = ("The earlier checkpoints are intact: resume with --resume_from_checkpoint latest once there "
                       "is room" if ckpts.complete() else "No checkpoint of this run had been written yet")
            raise WriteError(f"{error}. {earlier}") from exc

    def wait_for_checkpoint(self) -> None:
        """Block until the save in flight (if any) is published; re-raises what its write raised."""
        self.background_save.wait()
        self.accelerator.wait_for_everyone()  # the main process publishes after every process has written
        self._announce_checkpoints()

    def _announce_checkpoints(self) -> None:
        if self.background_save.in_flight:
            return
        paths, self._unannounced = self._unannounced, []
        for path in paths:
            self.callbacks.fire(Event.ON_CHECKPOINT, self, path)


def _state_bytes(model: Any, optimizer: Any) -> int:
    """About what a checkpoint of `model` and `optimizer` takes: their tensors' bytes on this process."""
    import torch

    tensors = [*model.state_dict().values()]
    for state in optimizer.state_dict().get("state", {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)

