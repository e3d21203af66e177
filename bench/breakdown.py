"""Where cr_accel's extra time per step goes: the parts of the Trainer's step that the hand-written loop
does without (or does differently), each timed on its own, in one process, against A's counterpart.

Used by `python bench/overhead.py --breakdown`. Every number is microseconds per optimizer step: the
median over interleaved repeats (B's piece, then A's, then B's ...) of the mean over many calls. Parts
that run once per `log_every` steps or once per epoch are divided by those counts. The first row times
one whole training epoch of each variant in-process (B's `Trainer.train_one_epoch`, A's loop), so the
sum of the parts can be checked against the whole; the difference is left as "the rest".
"""

import contextlib
import os
import statistics
import tempfile
import time

BENCH_THREADS = 1


def _interleaved(pairs, repeat):
    """{name: (b_us, a_us)}: per-call medians, B and A of each pair timed alternately."""
    samples = {name: ([], []) for name in pairs}
    for _ in range(repeat):
        for name, (b_fn, a_fn, number, setup) in pairs.items():
            for fn, out in ((b_fn, samples[name][0]), (a_fn, samples[name][1])):
                if fn is None:
                    continue
                if setup is not None:
                    setup()
                t = time.perf_counter()
                for _ in range(number):
                    fn()
                out.append((time.perf_counter() - t) / number * 1e6)
    return {name: (statistics.median(b) if b else 0.0, statistics.median(a) if a else 0.0)
            for name, (b, a) in samples.items()}


def _build(workload_name, out_dir):
    import torch
    from torch.utils.data import DataLoader

    from cr_accel.config import config_from_dict
    from cr_accel.data import DATASETS, DatasetSplits
    from cr_accel.models import MODELS
    from cr_accel.trainer import Trainer
    from workloads import GRAD_CLIP, LR, WARMUP_RATIO, WEIGHT_DECAY, WORKLOADS, SmallCNN, cosine_with_warmup

    w = WORKLOADS[workload_name]
    name = f"bench_{w.name}"
    if name not in DATASETS:
        DATASETS.register(name)(lambda seed: DatasetSplits(*w.datasets(seed), metadata={}))
    if w.model == "bench_cnn" and "bench_cnn" not in MODELS:
        MODELS.register("bench_cnn")(SmallCNN)
    epochs = 10_000  # never reached: epochs are run one by one below
    cfg = config_from_dict({
        "model": {"name": w.model, **w.model_kwargs},
        "loss": {"name": w.loss},
        "data": {"name": name, "batch_size": w.batch_size},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
        "scheduler": {"name": "cosine", "warmup_ratio": WARMUP_RATIO},
        "training": {"epochs": epochs, "grad_clip": GRAD_CLIP, "eval_every": 1_000_000, "log_every": 50},
        "output": {"dir": out_dir},
    })
    trainer = Trainer(cfg)
    trainer.progress.interactive = False  # plain lines, as in the benchmark (stdout is a file there too)

    # A: the hand-written loop's objects, on the same data and the same model class.
    model = w.build_model()
    loss_fn = w.build_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    total = epochs * w.steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, int(WARMUP_RATIO * total)))
    loader = DataLoader(trainer.data.train, batch_size=w.batch_size, shuffle=True)
    return w, trainer, (model, loss_fn, optimizer, schedule, loader)


def measure(workload_name, quick=False):
    import torch

    from cr_accel.callbacks import Callback, CallbackList, Event

    torch.set_num_threads(BENCH_THREADS)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="cr_accel_breakdown_") as tmp, \
            open(os.path.join(tmp, "console.txt"), "w") as console, contextlib.redirect_stdout(console):
        w, tr, (model, loss_fn, optimizer, schedule, loader) = _build(workload_name, os.path.join(tmp, "run"))
        spe = len(loader)  # optimizer steps per epoch
        log_every = tr.cfg.training.log_every
        clip = tr.max_grad_norm

        def a_epoch():
            for inputs, targets in loader:
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)

        def b_epoch():
            tr._run_epoch()  # train_one_epoch plus the epoch's log line and CSV row (no validation here)

        def b_iterate():
            tr.train_loader.set_epoch(tr.epoch)
            for _ in tr.train_loader:
                pass

        def a_iterate():
            for _ in loader:
                pass

        x, y = next(iter(loader))
        a_params = model.parameters
        loss_value = loss_fn(model(x), y).detach()
        stats = tr.stats

        def b_clip():
            stats.add_grad_norm(torch.nn.utils.clip_grad_norm_(tr.params, clip))

        def a_clip():
            torch.nn.utils.clip_grad_norm_(a_params(), clip)

        def clear_stats():
            stats._losses, stats._loss_steps, stats._norms = [], [], []

        def fill_stats():  # what a log interval leaves pending: log_every losses and gradient norms
            stats._losses = [loss_value.clone() for _ in range(log_every)]
            stats._loss_steps = list(range(log_every))
            stats._norms = [loss_value.clone() for _ in range(log_every)]

        def b_report():
            fill_stats()
            tr._report_progress(0)

        def b_epoch_edges():
            # train_one_epoch's own set-up and wrap-up, and _run_epoch's log line and CSV row
            tr.model.train()
            tr.train_loader.set_epoch(tr.epoch)
            tr.stats.reset_epoch()
            tr.progress.epoch_bar(tr.epoch, tr.cfg.training.epochs, len(tr.train_loader))
            tr.callbacks.has("on_step_end")
            tr.stats.samples = spe * w.batch_size
            tr.progress.close()
            metrics = {"epoch": tr.epoch + 1, **tr.stats.epoch_totals()}
            metrics.update(step=tr.global_step, best_val=float("nan"), lr=tr.schedule.get_last_lr()[0])
            metrics["samples_per_s"] = metrics.pop("samples") / 1.0
            metrics["epoch_time"] = 1.0
            tr._log_epoch(metrics)

        # The benchmark's clock in B (a one-hook CallbackList) against A's inline time stamp.
        clock = CallbackList()
        stamps = [0.0] * 1000

        class StepClock(Callback):
            def on_step_end(self, trainer, step, loss):
                stamps[step] = time.monotonic()

        clock.add(StepClock())

        def b_fire():
            clock.fire(Event.ON_STEP_END, tr, 1, loss_value)

        def a_stamp():
            stamps[1] = time.monotonic()

        reps = 3 if quick else 7
        epochs_each = 2 if quick else 8
        loop_n = max(1, 2 if quick else 6)
        # Warm up both loops (lazy optimizer state, first-call allocations).
        a_epoch()
        b_epoch()
        whole = _interleaved({"whole epoch": (b_epoch, a_epoch, 1, None)}, epochs_each)
        # Gradients to clip (training left none): one backward in each model; clipping them over and
        # over does not change the cost.
        loss_fn(model(x), y).backward()
        loss_fn(tr.model(x), y).backward()
        parts = _interleaved({
            "data loader": (b_iterate, a_iterate, loop_n, None),
            "clip_grad_norm_ (+ StepStats.add_grad_norm in B)": (b_clip, a_clip, 200, None),
            "StepStats.add_loss": (lambda: stats.add_loss(loss_value, 0), None, log_every, clear_stats),
            "LR schedule step (StepSchedule vs LambdaLR)": (tr.schedule.step, schedule.step, 200, None),
            "progress report (StepStats.flush + print), per log interval": (b_report, None, 20, None),
            "epoch edges (set-up, epoch_totals, text log, CSV row), per epoch": (b_epoch_edges, None, 5, None),
            "time stamp per step (B: a callback's on_step_end; A: inline)": (b_fire, a_stamp, 1000, None),
        }, reps)
        clear_stats()

    per_step = {
        "data loader": 1 / spe,  # measured per epoch
        "progress report (StepStats.flush + print), per log interval": 1 / log_every,
        "epoch edges (set-up, epoch_totals, text log, CSV row), per epoch": 1 / spe,
    }
    rows = []
    for name, (b, a) in parts.items():
        scale = per_step.get(name, 1.0)
        rows.append((name, b * scale, a * scale))
    b_whole, a_whole = (v / spe for v in whole["whole epoch"])
    return w, spe, (b_whole, a_whole), rows


def run_breakdown(workloads, quick=False):
    lines = []
    for name in workloads:
        w, spe, (b_whole, a_whole), rows = measure(name, quick)
        diff = b_whole - a_whole
        explained = sum(b - a for _, b, a in rows if not _is_measurement(_))
        lines += [
            f"### {name}: microseconds per optimizer step ({spe} steps per epoch, batch {w.batch_size}, "
            f"1 thread, in one process)",
            "",
            "| part | B (cr_accel) | A (hand-written) | B - A |",
            "|---|---|---|---|",
            f"| whole training epoch / steps | {b_whole:.1f} | {a_whole:.1f} | **{diff:+.1f}** ({b_whole / a_whole:.3f}x) |",
        ]
        for part, b, a in sorted(rows, key=lambda r: -(r[1] - r[2])):
            lines.append(f"| {part} | {b:.1f} | {a:.1f} | {b - a:+.1f} |")
        lines += [
            f"| the rest (whole - parts: method calls, attribute look-ups, timing noise) | | | {diff - explained:+.1f} |",
            "",
            "The time-stamp row is the cost of the benchmark's own measurement (not part of the whole-epoch row, "
            "which runs without it, and left out of the sum).",
            "",
        ]
    return "\n".join(lines)


def _is_measurement(part):
    return part.startswith("time stamp per step")
