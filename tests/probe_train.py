"""A train.py with test hooks, for tests that need what a run does inside (run it like train.py).

    python tests/probe_train.py --config C --probe OUT.json [--stop-at-step K] [--slow-save SECONDS]
                                [--resume_from_checkpoint X] [overrides...]

Writes (main process) OUT.json: the LR each optimizer step used, the final status and step, and the
final weights next to it as OUT.safetensors (from the unwrapped model), so tests can check runs
launched through `accelerate launch`. Exits like train.py (75 when preempted).
--stop-at-step K: the process sends itself SIGTERM right after optimizer step K (the real signal path).
--slow-save S: prints `WRITING-MANIFEST <folder>` and sleeps S seconds before each checkpoint's manifest
is written, so a test can kill the process while a checkpoint is half written.
"""

import json
import os
import signal
import sys
import time

from safetensors.torch import save_file

from cr_accel import checkpoint
from cr_accel.callbacks import Callback
from cr_accel.cli import train_parser
from cr_accel.config import load_config
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from cr_accel.trainer import Trainer


class Recorder(Callback):
    def __init__(self, path, stop_at_step):
        self.path = path
        self.stop_at_step = stop_at_step
        self.lrs = []

    def on_train_start(self, trainer):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, trainer, step, loss):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the LR of the *next* step
        if step == self.stop_at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer, status):
        acc = trainer.accelerator
        if acc.is_main_process:
            weights = {k: v.detach().cpu().contiguous() for k, v in acc.unwrap_model(trainer.model).state_dict().items()}
            save_file(weights, self.path.replace(".json", ".safetensors"))
            used = self.lrs[:-1]  # the last entry belongs to a step that never ran
            with open(self.path, "w") as f:
                json.dump({"lrs": used, "world_size": acc.num_processes, "status": status,
                           "global_step": trainer.global_step}, f)


def slow_down_manifests(seconds):
    write = checkpoint.store._write_manifest

    def slow(folder, state):
        print(f"WRITING-MANIFEST {folder}", flush=True)
        time.sleep(seconds)
        write(folder, state)

    checkpoint.store._write_manifest = slow


def main():
    parser = train_parser("probe_train.py")
    parser.add_argument("--probe", required=True)
    parser.add_argument("--stop-at-step", type=int, default=None)
    parser.add_argument("--slow-save", type=float, default=None)
    args = parser.parse_intermixed_args()
    if args.slow_save:
        slow_down_manifests(args.slow_save)
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, callbacks=[Recorder(args.probe, args.stop_at_step)])
    status = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return PREEMPTED_EXIT_CODE if status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
