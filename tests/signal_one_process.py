"""A train.py whose process `--rank R` alone sends itself SIGTERM right after optimizer step `--at-step S`.

    python tests/signal_one_process.py --config C --out DIR --rank R --at-step S [overrides...]

Every process writes DIR/rank{index}.json: its final status and optimizer step. Launch it with
`accelerate launch` (tests/runners.py) to check that all processes stop together when only one is signalled.
"""

import json
import os
import signal
import sys
from pathlib import Path

from cr_accel.callbacks import Callback
from cr_accel.cli import train_parser
from cr_accel.config import load_config
from cr_accel.trainer import Trainer


class SignalOne(Callback):
    def __init__(self, out, rank, at_step):
        self.out, self.rank, self.at_step = Path(out), rank, at_step

    def on_step_end(self, trainer, state):
        step = state.step
        if step == self.at_step and trainer.accelerator.process_index == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer, status):
        index = trainer.accelerator.process_index
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{index}.json").write_text(json.dumps({"status": status, "global_step": trainer.global_step}))


def main():
    parser = train_parser("signal_one_process.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--at-step", type=int, required=True)
    args = parser.parse_intermixed_args()
    trainer = Trainer(load_config(args.config, args.overrides), callbacks=[SignalOne(args.out, args.rank, args.at_step)])
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
