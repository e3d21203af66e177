"""The test split, scored once at the end of training.

Where the data has a test split (`data.test_path` / `test_ratio` of tensor_files, `data.num_test` of
synthetic_cr) and the run ends `finished` or `stopped_early` (not preempted or failed), every process scores it
with the weights of `checkpoints/best` -- the model selection the validation made, with the EMA weights when the
run keeps an EMA, as `cr_accel.load_model` gives them -- or, without a best/ checkpoint, with the final weights
(their EMA where there is one). The numbers are exact means over every process, computed as validation computes
them (`validation.score`, the validation's batch size, the run's loss and metrics). The main process writes
`output.dir/test_metrics.json`:

    {"checkpoint": "best", "global_step": 120, "metrics": {"test_loss": 0.0042, "test_psnr": 27.3}}

and one line to train.log. `cr-accel evaluate RUN_DIR --split test` gives the same numbers later.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..checkpoint import is_complete, load_model
from ..rng import rng_kept
from ..run_files import CHECKPOINTS, TEST_METRICS
from ..scoring import global_step_of, score_model, write_record
from . import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

SCORED = ("finished", "stopped_early")  # the statuses after which the test split is scored


class FinalTestScore(Callback):
    state_key = "final_test_score"

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        test = getattr(trainer.data, "test", None)
        if status not in SCORED or test is None:
            return
        acc = trainer.accelerator
        best = trainer.output_dir / CHECKPOINTS / "best"
        loader = trainer.eval_loader(test)

        def bar(batches: Any) -> Any:
            return trainer.progress.validation(batches, desc="test")

        if is_complete(best):
            name, step = "best", global_step_of(best)
            with rng_kept():  # building the model draws its initial weights; the run's streams stay as they were
                model = load_model(best, device=acc.device)
            metrics = score_model(acc, model, loader, trainer.loss_fn, trainer.metric_fns, "test", bar)
        else:
            from .ema import EMA

            name, step = "last", trainer.global_step
            emas = trainer.callbacks.of_type(EMA)
            with emas[0].applied() if emas else contextlib.nullcontext():
                metrics = score_model(acc, trainer.model, loader, trainer.loss_fn, trainer.metric_fns, "test", bar)
        if acc.is_main_process:
            write_record(trainer.output_dir / TEST_METRICS, name, step, metrics)
        values = " | ".join(f"{k} {v:.6g}" for k, v in metrics.items())
        trainer.text_log.info(f"test split ({len(test)} samples) scored with the {name} weights (step {step}): "
                              f"{values}; written to {TEST_METRICS}")

