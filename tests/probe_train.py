"""A train.py with a recording callback, for tests that need what a run does inside (run it like train.py).

    python tests/probe_train.py --config C --probe OUT.json [overrides...]

Writes (main process) OUT.json: the LR each optimizer step used, and the final weights next to it as
OUT.safetensors (from the unwrapped model), so tests can check runs launched through `accelerate launch`.
"""

import json
import sys

from safetensors.torch import save_file

from cr_accel.callbacks import Callback
from cr_accel.cli import train_parser
from cr_accel.config import load_config
from cr_accel.trainer import Trainer


class Recorder(Callback):
    def __init__(self, path):
        self.path = path
        self.lrs = []

    def on_train_start(self, trainer):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, trainer, step, loss):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the LR of the *next* step

    def on_train_end(self, trainer, status):
        acc = trainer.accelerator
        if acc.is_main_process:
            weights = {k: v.detach().cpu().contiguous() for k, v in acc.unwrap_model(trainer.model).state_dict().items()}
            save_file(weights, self.path.replace(".json", ".safetensors"))
            used = self.lrs[:-1]  # the last entry belongs to a step that never ran
            with open(self.path, "w") as f:
                json.dump({"lrs": used, "world_size": acc.num_processes, "status": status,
                           "global_step": trainer.global_step}, f)


def main():
    parser = train_parser("probe_train.py")
    parser.add_argument("--probe", required=True)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, callbacks=[Recorder(args.probe)])
    trainer.train()


if __name__ == "__main__":
    sys.exit(main())
