"""How the Trainer saves checkpoints: synchronously, or with only a host-memory copy at the step boundary
and the write in the background (checkpoint/async_writer.py). Mixed into the Trainer; the policy of when
to save stays in the loop."""

import time

from .callbacks import Event
from .checkpoint.async_writer import take_snapshot


class SavingMixin:
    def save_checkpoint(self, targets):
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
            acc.save_state(str(tmp))
            ckpts.write_own_files(tmp, state, self.config_yaml)
            acc.wait_for_everyone()  # every process has written its files
            if acc.is_main_process:
                ckpts.publish(tmp, targets, summary)
            acc.wait_for_everyone()
        paths = [ckpts.root / name for name in ckpts.target_names(self.global_step, targets)]
        how = "started in the background" if self.async_save else "written"
        self.log.info(f"checkpoint at step {self.global_step} -> {', '.join(p.name for p in paths)} {how} "
                      f"({time.perf_counter() - started:.2f} s)", console=False)
        self._unannounced += paths
        if not self.async_save:
            self._announce_checkpoints()
        return paths

    def _write_snapshot(self, snapshot, tmp, state, targets, summary):
        """The background half of an asynchronous save: this process's files, then (main) publishing once
        every process has marked its files done."""
        snapshot.write(tmp)
        self.checkpoints.write_own_files(tmp, state, self.config_yaml)
        self.checkpoints.mark_written(tmp, snapshot.process_index)
        if self.accelerator.is_main_process:
            self.checkpoints.wait_for_marks(tmp, self.accelerator.num_processes)
            self.checkpoints.publish(tmp, targets, summary)

    def wait_for_checkpoint(self):
        """Block until the save in flight (if any) is published; re-raises what its write raised."""
        self.background_save.wait()
        self.accelerator.wait_for_everyone()  # the main process publishes after every process has written
        self._announce_checkpoints()

    def _announce_checkpoints(self):
        if self.background_save.in_flight:
            return
        paths, self._unannounced = self._unannounced, []
        for path in paths:
            self.callbacks.fire(Event.ON_CHECKPOINT, self, path)
