"""One benchmark run in a fresh process: `python bench/variants.py {A|B} WORKLOAD STEPS RESULT_JSON WORKDIR T0`.

A is the hand-written PyTorch loop, B is cr_accel's Trainer. Both record `time.monotonic()` (wall) and
`time.process_time()` (CPU time of the process, less sensitive to other load on the machine) right after
every optimizer step (A inline, B from a minimal `on_step_end` callback) into preallocated lists, and a
few marks on the way there; T0 is the parent's `time.monotonic()` just before it started this process
(CLOCK_MONOTONIC is one clock for the whole machine), so `stamps[0] - T0` is process start to the end
of the first optimizer step. The result is written as JSON; nothing is printed except what B's own
progress output and log print (the parent sends stdout and stderr to a file).
"""

import json
import os
import sys
import time

now = time.monotonic
cpu_now = time.process_time


def run_hand_written(workload, steps, marks, between_steps=None):
    """`between_steps(n)`, if given, is called before the first step (n = 0) and after every step's stamps (n =
    steps done), as B's callback does (bench/interleaved.py hands the turn to the other loop there)."""
    import torch
    from torch.utils.data import DataLoader

    from workloads import GRAD_CLIP, LR, SEED, WARMUP_RATIO, WEIGHT_DECAY, cosine_with_warmup

    marks["imports"] = now()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    train_set, _val_set = workload.datasets()
    model = workload.build_model()
    loss_fn = workload.build_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps, int(WARMUP_RATIO * steps))
    )
    loader = DataLoader(train_set, batch_size=workload.batch_size, shuffle=True)
    stamps, cpu_stamps = [0.0] * steps, [0.0] * steps
    marks["built"] = now()
    marks["threads"] = torch.get_num_threads()

    model.train()
    step = 0
    if between_steps is not None:
        between_steps(0)
    while step < steps:
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            stamps[step] = now()
            cpu_stamps[step] = cpu_now()
            step += 1
            if between_steps is not None:
                between_steps(step)
            if step == steps:
                break
    marks["final_loss"] = float(loss.detach())
    return stamps, cpu_stamps


RECORDS_ENV = "CR_ACCEL_BENCH_RECORDS"  # set by bench/overhead.py --records
RECORD_PARTS_ENV = "CR_ACCEL_BENCH_RECORD_PARTS"  # a subset of loss,tensorboard,histograms,dashboard (default: all)


def add_records(raw, workdir):
    """Everything the run can record, on: the loss as a `weighted` sum of one term (so each step logs a loss
    term), TensorBoard (step and epoch scalars), histograms of every weight and gradient every 2 epochs (inside
    the timed steps: the gradient copy at a histogram epoch's first step, the writing at its end), the dashboard
    (pointed at a port where nothing listens: its thread keeps trying while training goes on). Set
    CR_ACCEL_BENCH_RECORD_PARTS to a subset (e.g. `loss,tensorboard`) to see what each part costs."""
    which = os.environ.get(RECORD_PARTS_ENV, "loss,tensorboard,histograms,dashboard").split(",")
    if "loss" in which:
        raw["loss"] = {"name": "weighted", "terms": {raw["loss"]["name"]: 1.0}}
    if "tensorboard" in which:
        raw["output"].update(trackers=["tensorboard"], histograms_every=2 if "histograms" in which else 0)
    if "dashboard" in which:
        raw["dashboard"] = {"enabled": True, "url": "http://127.0.0.1:9"}


def run_cr_accel(workload, steps, marks, workdir, between_steps=None):
    import torch

    from cr_accel.callbacks import Callback
    from cr_accel.config import config_from_dict
    from cr_accel.data import DATASETS, DatasetSplits
    from cr_accel.models import MODELS
    from cr_accel.trainer import Trainer
    from workloads import GRAD_CLIP, LR, SEED, WARMUP_RATIO, WEIGHT_DECAY, SmallCNN

    marks["imports"] = now()
    torch.set_num_threads(1)

    def bench_data(seed):
        train, val = workload.datasets(seed)
        return DatasetSplits(train=train, val=val, metadata={})

    if f"bench_{workload.name}" not in DATASETS:  # bench/paired.py runs B more than once in a process
        DATASETS.register(f"bench_{workload.name}")(bench_data)
    if workload.model == "bench_cnn" and "bench_cnn" not in MODELS:
        MODELS.register("bench_cnn")(SmallCNN)

    stamps, cpu_stamps = [0.0] * steps, [0.0] * steps

    class StepClock(Callback):
        """The whole measurement: one clock read and one list store per optimizer step, as in A."""

        def on_train_start(self, trainer):
            marks["train_start"] = now()
            if between_steps is not None:
                between_steps(0)

        def on_step_end(self, trainer, state):
            step = state.step
            stamps[step - 1] = now()
            cpu_stamps[step - 1] = cpu_now()
            if between_steps is not None:
                between_steps(step)

    raw = {
        "model": {"name": workload.model, **workload.model_kwargs},
        "loss": {"name": workload.loss},
        "data": {"name": f"bench_{workload.name}", "batch_size": workload.batch_size},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
        "scheduler": {"name": "cosine", "warmup_ratio": WARMUP_RATIO, "min_lr_ratio": 0.0},
        "training": {
            "epochs": -(-steps // workload.steps_per_epoch),
            "max_steps": steps,
            "grad_clip": GRAD_CLIP,
            "eval_every": 1_000_000,  # validate once, after the last (timed) step
            "log_every": 50,  # the default: a progress line and one loss transfer every 50 steps
        },
        "output": {"dir": str(workdir)},
        "seed": SEED,
    }
    if os.environ.get(RECORDS_ENV) == "1":
        add_records(raw, workdir)
    trainer = Trainer(config_from_dict(raw), callbacks=[StepClock()])
    marks["built"] = now()
    marks["threads"] = torch.get_num_threads()
    marks["status"] = trainer.train()
    marks["global_step"] = trainer.global_step
    return stamps, cpu_stamps


def main(argv):
    variant, workload_name, steps, result_path, workdir, t0 = argv
    marks = {"t0": float(t0), "start": now()}
    from workloads import WORKLOADS

    workload = WORKLOADS[workload_name]
    steps = int(steps)
    if variant == "A":
        stamps, cpu_stamps = run_hand_written(workload, steps, marks)
    else:
        stamps, cpu_stamps = run_cr_accel(workload, steps, marks, workdir)
    marks["end"] = now()
    with open(result_path, "w") as f:
        json.dump({"variant": variant, "workload": workload_name, "steps": steps, "marks": marks,
                   "stamps": stamps, "cpu_stamps": cpu_stamps}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
