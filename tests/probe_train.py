"""A train.py with test hooks, for tests that need what a run does inside (run it like train.py).

    python tests/probe_train.py --config C --probe OUT.json [--stop-at-step K] [--slow-save SECONDS [--slow-save-step N]]
                                [--print-pid] [--await-signal R:K] [--resume_from_checkpoint X] [overrides...]

Writes (main process) OUT.json: the LR each optimizer step used, the final status and step, and the
final weights next to it as OUT.safetensors (from the unwrapped model), and the epoch the training dataset
held at each epoch's end where it has one (`dataset_epochs`: image_folder's augmentation epoch), so tests can check
runs launched through `accelerate launch`. Exits like train.py (75 when preempted).
--stop-at-step K: the process sends itself SIGTERM right after optimizer step K (the real signal path).
--slow-save S: prints `WRITING-MANIFEST <folder>` and sleeps S seconds before each checkpoint's manifest
is written, so a test can kill the process while a checkpoint is half written; with --slow-save-step N only the
checkpoint of optimizer step N is slowed down (the others cost the test no time).
Every process also writes OUT.rank<R>.json: its own status, step and the signal it received (or null).
--fill-disk-after-step K: right after optimizer step K the main process fills the file system of output.dir
(a file `filler.bin` next to output.dir) until FILL_LEAVES bytes are free: room for log lines, not a checkpoint.
--print-pid: every process prints `PID <rank> <pid>` when training starts, so a test can signal one of them.
--await-signal R:K: the process of rank R prints `AWAITING-SIGNAL <rank> <pid> <step>` right after optimizer
step K and waits (at most 60 s) until its preemption handler has seen a signal that the test sends from
outside, so the moment of the signal is known exactly; the other processes run on until they need rank R.
"""

import json
import os
import signal
import sys
import time

from safetensors.torch import save_file

from cr_accel import checkpoint
from cr_accel.callbacks import Callback
from cr_accel.cli import train_command, train_parser


AWAIT_SIGNAL_SECONDS = 60
FILL_LEAVES = 64 * 1024


def say(line):
    """One line in one write: processes that share a pipe (under a launcher) cannot split it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Recorder(Callback):
    def __init__(self, path, stop_at_step, print_pid=False, await_signal=None, fill_disk_after_step=None):
        self.path = path
        self.stop_at_step = stop_at_step
        self.fill_disk_after_step = fill_disk_after_step
        self.print_pid = print_pid
        self.await_signal = await_signal  # (rank, step) or None
        self.lrs = []
        self.dataset_epochs = []

    def on_train_start(self, trainer):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        if self.print_pid:
            say(f"PID {trainer.accelerator.process_index} {os.getpid()}")

    def on_step_end(self, trainer, state):
        step = state.step
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the LR of the *next* step
        if step == self.stop_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.fill_disk_after_step and trainer.accelerator.is_main_process:
            fill_disk(trainer.output_dir.parent / "filler.bin")
        rank = trainer.accelerator.process_index
        if self.await_signal == (rank, step):
            say(f"AWAITING-SIGNAL {rank} {os.getpid()} {step}")
            deadline = time.time() + AWAIT_SIGNAL_SECONDS
            while not trainer.preemption.requested and time.time() < deadline:
                time.sleep(0.01)  # the handler runs in this (main) thread between sleeps

    def on_epoch_end(self, trainer, state):
        epoch = getattr(trainer.data.train, "epoch", None)
        if epoch is not None:
            self.dataset_epochs.append(int(epoch))

    def on_train_end(self, trainer, status):
        acc = trainer.accelerator
        with open(self.path.replace(".json", f".rank{acc.process_index}.json"), "w") as f:
            json.dump({"status": status, "global_step": trainer.global_step,
                       "signal": trainer.preemption.signal_name}, f)
        state = acc.get_state_dict(trainer.model)  # every process: under FSDP gathering the shards is collective
        if acc.is_main_process:
            weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(weights, self.path.replace(".json", ".safetensors"))
            used = self.lrs[:-1]  # the last entry belongs to a step that never ran
            with open(self.path, "w") as f:
                json.dump({"lrs": used, "world_size": acc.num_processes, "status": status,
                           "global_step": trainer.global_step, "dataset_epochs": self.dataset_epochs}, f)


def fill_disk(path):
    import shutil

    with open(path, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(path.parent).free - FILL_LEAVES))
    say(f"DISK-FILLED {shutil.disk_usage(path.parent).free}")


def slow_down_manifests(seconds, only_step=None):
    write = checkpoint.store._write_manifest

    def slow(folder, state):
        if only_step is None or state["global_step"] == only_step:
            print(f"WRITING-MANIFEST {folder}", flush=True)
            time.sleep(seconds)
        write(folder, state)

    checkpoint.store._write_manifest = slow


def main():
    parser = train_parser("probe_train.py")
    parser.add_argument("--probe", required=True)
    parser.add_argument("--stop-at-step", type=int, default=None)
    parser.add_argument("--slow-save", type=float, default=None)
    parser.add_argument("--slow-save-step", type=int, default=None)
    parser.add_argument("--print-pid", action="store_true")
    parser.add_argument("--fill-disk-after-step", type=int, default=None)
    parser.add_argument("--await-signal", metavar="RANK:STEP", default=None,
                        type=lambda v: tuple(int(x) for x in v.split(":")))
    args = parser.parse_intermixed_args()
    if args.slow_save:
        slow_down_manifests(args.slow_save, args.slow_save_step)
    recorder = Recorder(args.probe, args.stop_at_step, args.print_pid, args.await_signal, args.fill_disk_after_step)
    return train_command(args, callbacks=[recorder])  # as train.py runs: user errors are one line and exit 2


if __name__ == "__main__":
    sys.exit(main())
