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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCH_THREADS = 1


def _interleaved(pairs, repeat):
    """{name: (b_us, a_us)}: per-call medians, B and A of each pair timed alternately.

    `pairs`: name -> (B's callable, A's callable or None, calls per sample, setup or None); a setup runs,
    untimed, before every call. Which of the two goes first alternates between repeats.
    """
    samples = {name: ([], []) for name in pairs}
    for i in range(repeat):
        for name, (b_fn, a_fn, number, setup) in pairs.items():
            both = [(b_fn, samples[name][0]), (a_fn, samples[name][1])]
            for fn, out in both if i % 2 == 0 else both[::-1]:  # B first, then A first, ...
                if fn is None:
                    continue
                elapsed = 0.0
                if setup is None:
                    t = time.perf_counter()
                    for _ in range(number):
                        fn()
                    elapsed = time.perf_counter() - t
                else:
                    for _ in range(number):
                        setup()
                        t = time.perf_counter()
                        fn()
                        elapsed += time.perf_counter() - t
                out.append(elapsed / number * 1e6)
    return {name: (statistics.median(b) if b else 0.0, statistics.median(a) if a else 0.0)
            for name, (b, a) in samples.items()}


def _build(workload_name, out_dir):
    import torch
    from torch.utils.data import DataLoader

    from cr_accel.config import config_from_dict
    from cr_accel.data import DATASETS, DatasetSplits
    from cr_accel.models import MODELS
    from cr_accel.sinks import RunStart
    from cr_accel.trainer import Trainer
    from variants import RECORDS_ENV, add_records
    from workloads import GRAD_CLIP, LR, WARMUP_RATIO, WEIGHT_DECAY, WORKLOADS, SmallCNN, cosine_with_warmup

    w = WORKLOADS[workload_name]
    name = f"bench_{w.name}"
    if name not in DATASETS:
        DATASETS.register(name)(lambda seed: DatasetSplits(*w.datasets(seed), metadata={}))
    if w.model == "bench_cnn" and "bench_cnn" not in MODELS:
        MODELS.register("bench_cnn")(SmallCNN)
    epochs = 10_000  # never reached: epochs are run one by one below
    raw = {
        "model": {"name": w.model, **w.model_kwargs},
        "loss": {"name": w.loss},
        "data": {"name": name, "batch_size": w.batch_size},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
        "scheduler": {"name": "cosine", "warmup_ratio": WARMUP_RATIO},
        "training": {"epochs": epochs, "grad_clip": GRAD_CLIP, "eval_every": 1_000_000, "log_every": 50},
        "checkpoint": {"save_every": 1_000_000},  # timed on their own below
        "output": {"dir": out_dir},
    }
    if os.environ.get(RECORDS_ENV) == "1":  # bench/overhead.py --breakdown --records
        add_records(raw, out_dir)
    trainer = Trainer(config_from_dict(raw))
    # What train() does before the first epoch (epochs are run one by one below): the sinks open their files,
    # trackers and dashboard connection.
    trainer.sinks.start(RunStart(config=trainer.cfg.to_dict(), world_size=1, device="cpu"))
    trainer.progress.interactive = False  # plain lines, as in the benchmark (stdout is a file there too)

    def hand_written():
        """A: the hand-written loop's objects, on the same data and the same model class."""
        model = w.build_model()
        loss_fn = w.build_loss()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        total = epochs * w.steps_per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, int(WARMUP_RATIO * total)))
        loader = DataLoader(trainer.data.train, batch_size=w.batch_size, shuffle=True)
        return model, loss_fn, optimizer, schedule, loader

    return w, trainer, hand_written


def measure(workload_name, quick=False):
    import torch

    from cr_accel.callbacks import Callback, CallbackList, Event

    torch.set_num_threads(BENCH_THREADS)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="cr_accel_breakdown_") as tmp, \
            open(os.path.join(tmp, "console.txt"), "w") as console, contextlib.redirect_stdout(console):
        w, tr, hand_written = _build(workload_name, os.path.join(tmp, "run"))
        model, loss_fn, optimizer, schedule, loader = hand_written()
        spe = len(loader)  # optimizer steps per epoch
        log_every = tr.cfg.training.log_every
        clip = tr.max_grad_norm

        def hand_written_epoch(model, loss_fn, optimizer, schedule, loader):
            def epoch():
                for inputs, targets in loader:
                    loss = loss_fn(model(inputs), targets)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)

            return epoch

        a_epoch = hand_written_epoch(model, loss_fn, optimizer, schedule, loader)
        a2_epoch = hand_written_epoch(*hand_written())  # a second, identical A: the control

        def b_epoch():
            tr._run_epoch()  # train_one_epoch, then the epoch's log line and CSV row (no validation here)

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
            tr._log_step(0)

        metrics = {"epoch": 1, "train_loss": 2.3, "grad_norm": 1.2, "skipped_steps": 0, "step": 100,
                   "best_val": float("nan"), "lr": 1e-3, "samples_per_s": 1e4, "epoch_time": 0.5}

        def b_epoch_end():
            tr.stats.epoch_totals()
            tr.sinks.log_epoch(metrics)

        # The benchmark's clock in B (a one-hook CallbackList) against A's inline time stamp.
        clock = CallbackList()
        stamps = [0.0] * 1000

        class StepClock(Callback):
            def on_step_end(self, trainer, state):
                stamps[state.step % len(stamps)] = time.monotonic()

        clock.add(StepClock())

        def b_fire():  # as the loop does it: the hook's TrainingState built, then the hook called
            clock.fire(Event.ON_STEP_END, tr, tr._step_state(loss_value, None, loss_value, 1e-3))

        def a_stamp():
            stamps[1] = time.monotonic()

        reps = 3 if quick else 9
        epochs_each = 3 if quick else 15
        loop_n = 2 if quick else 4
        # Warm up the loops (lazy optimizer state, first-call allocations).
        a_epoch()
        a2_epoch()
        b_epoch()
        whole = _whole_epochs(b_epoch, a_epoch, a2_epoch, epochs_each)
        # Gradients to clip (training left none): one backward in each model; clipping them over and
        # over does not change the cost.
        loss_fn(model(x), y).backward()
        loss_fn(tr.model(x), y).backward()
        parts = _interleaved({
            "data loader (B: accelerate's DataLoaderShard, seedable sampler)": (b_iterate, a_iterate, loop_n, None),
            "clip_grad_norm_ (+ StepStats.add_grad_norm in B)": (b_clip, a_clip, 200, None),
            "StepStats.add_loss": (lambda: stats.add_loss(loss_value, 0), None, 200, None),
            "LR schedule step (B: StepSchedule, A: LambdaLR)": (tr.schedule.step, schedule.step, 200, None),
            "step record every 50 steps (StepStats.step_record, sinks, print)": (b_report, None, 20, fill_stats),
            "epoch end (epoch_totals, text log line, CSV row)": (b_epoch_end, None, 5, None),
            "time stamp per step (B: a callback's on_step_end; A: inline)": (b_fire, a_stamp, 1000, None),
        }, reps)
        clear_stats()  # add_loss piled up losses; the flush of the next epoch end must not see them

        # Costs that do not fall on every epoch, reported per event.
        events = {}
        epochs_csv = next(sink.file for sink in tr.sinks.sinks if getattr(sink, "per", None) == "epoch")
        for _ in range(300 - len(epochs_csv._read()[0])):  # the CSV of a 300-epoch run (the default config)
            epochs_csv.append(metrics)
        events["CSV row + log line at epoch 300 (a row appended to the file; its header was read once)"] = \
            _interleaved({"e": (b_epoch_end, None, 5, None)}, reps)["e"][0]
        tr.save_checkpoint(["last"])  # warm-up
        events["checkpoint (`last`: save_state, manifest with sha256, fsync, rename)"] = \
            _interleaved({"c": (lambda: tr.save_checkpoint(["last"]), None, 1, None)}, reps)["c"][0]

    per_step = {  # parts measured per epoch or per log interval
        "data loader (B: accelerate's DataLoaderShard, seedable sampler)": 1 / spe,
        "step record every 50 steps (StepStats.step_record, sinks, print)": 1 / log_every,
        "epoch end (epoch_totals, text log line, CSV row)": 1 / spe,
    }
    rows = [(name, b * per_step.get(name, 1.0), a * per_step.get(name, 1.0)) for name, (b, a) in parts.items()]
    whole["b_step"], whole["a_step"] = whole["b"] / spe, whole["a"] / spe
    return w, spe, whole, rows, events


def _whole_epochs(b_epoch, a_epoch, a2_epoch, repeat):
    """Whole epochs of B, A and a second A (the control), in a rotating order; the ratios B/A and A'/A are
    taken within each rotation, so slow drifts of the machine's speed cancel. Medians over rotations."""
    times = {"b": [], "a": [], "a2": []}
    ratios = {"b": [], "a2": []}
    order = [("b", b_epoch), ("a", a_epoch), ("a2", a2_epoch)]
    for i in range(repeat):
        this = {}
        for key, fn in order[i % 3:] + order[: i % 3]:
            t = time.perf_counter()
            fn()
            this[key] = time.perf_counter() - t
            times[key].append(this[key] * 1e6)
        ratios["b"].append(this["b"] / this["a"])
        ratios["a2"].append(this["a2"] / this["a"])
    return {
        "b": statistics.median(times["b"]), "a": statistics.median(times["a"]),
        "ratio": statistics.median(ratios["b"]), "control": statistics.median(ratios["a2"]),
        "ratio_range": (min(ratios["b"]), max(ratios["b"])), "control_range": (min(ratios["a2"]), max(ratios["a2"])),
    }


def run_breakdown(workloads, quick=False):
    lines = []
    for name in workloads:
        w, spe, whole, rows, events = measure(name, quick)
        b_whole, a_whole = whole["b_step"], whole["a_step"]
        diff = (whole["ratio"] - 1) * a_whole  # from the within-rotation ratio: robust to drift
        explained = sum(b - a for _, b, a in rows if not _is_measurement(_))
        lo, hi = whole["ratio_range"]
        clo, chi = whole["control_range"]
        lines += [
            f"### {name}: microseconds per optimizer step ({spe} steps per epoch, batch {w.batch_size}, "
            f"1 thread, in one process)",
            "",
            f"Whole epochs, B / A: **{whole['ratio']:.3f}x** ({lo:.3f}-{hi:.3f}); control, a second identical "
            f"hand-written loop / A: {whole['control']:.3f}x ({clo:.3f}-{chi:.3f}).",
            "",
            "| part | B (cr_accel) | A (hand-written) | B - A |",
            "|---|---|---|---|",
            f"| whole training epoch / steps (B - A from the ratio) | {b_whole:.1f} | {a_whole:.1f} "
            f"| **{diff:+.1f}** |",
        ]
        for part, b, a in sorted(rows, key=lambda r: -(r[1] - r[2])):
            lines.append(f"| {part} | {b:.1f} | {a:.1f} | {b - a:+.1f} |")
        lines += [
            f"| the rest (whole - parts: method calls, attribute look-ups, timing noise) | | | {diff - explained:+.1f} |",
            "",
            "The time-stamp row is the cost of the benchmark's own measurement (not part of the whole-epoch row, "
            "which runs without it, and left out of the sum).",
            "",
            "| event (not every epoch) | B, microseconds per event |",
            "|---|---|",
        ]
        lines += [f"| {event} | {us:.0f} |" for event, us in events.items()]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- start-up


def startup_phases(workload_name):
    """Seconds of each start-up phase in this (fresh) process: what both variants pay first (torch, and the
    torch._dynamo import that creating the first optimizer triggers), then B's extra imports, B's build
    (with its parts, by wrapping the trainer's module-level helpers) and train() up to the end of its first
    optimizer step, then A's build and first step. Returns (rows, parts) of (name, seconds)."""
    import functools

    t0 = time.monotonic()
    import torch

    torch.set_num_threads(BENCH_THREADS)
    t1 = time.monotonic()
    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # imports torch._dynamo, as A's and B's optimizers do
    t2 = time.monotonic()
    import accelerate  # noqa: F401

    import cr_accel.trainer as trainer_module
    from cr_accel import components
    from cr_accel.callbacks import Callback
    from cr_accel.config import config_from_dict
    from cr_accel.data import DATASETS, DatasetSplits
    from cr_accel.models import MODELS
    from workloads import GRAD_CLIP, LR, SEED, WARMUP_RATIO, WEIGHT_DECAY, WORKLOADS, SmallCNN, cosine_with_warmup

    t3 = time.monotonic()
    parts = {}

    def timed(owner, name, label):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[label] = parts.get(label, 0.0) + time.monotonic() - start

        setattr(owner, name, wrapper)

    for name in ("set_seed", "make_accelerator", "describe_environment"):
        if hasattr(trainer_module, name):
            timed(trainer_module, name, name)
    for name in ("build_datasets", "build_model", "build_optimizer", "build_schedule"):
        timed(components, name, f"components.{name}")
    timed(accelerate.Accelerator, "prepare", "Accelerator.prepare")
    for name in ("_write_run_files",):
        if hasattr(trainer_module.Trainer, name):
            timed(trainer_module.Trainer, name, f"Trainer.{name}")

    w = WORKLOADS[workload_name]
    DATASETS.register(f"bench_{w.name}")(lambda seed: DatasetSplits(*w.datasets(seed), metadata={}))
    if w.model == "bench_cnn":
        MODELS.register("bench_cnn")(SmallCNN)
    marks = {}

    class FirstStep(Callback):
        def on_train_start(self, trainer):
            marks.setdefault("train_start", time.monotonic())

        def on_step_end(self, trainer, state):
            marks.setdefault("first_step", time.monotonic())
            trainer.should_stop = True  # one step is enough here

    with tempfile.TemporaryDirectory(prefix="cr_accel_startup_") as tmp, \
            open(os.path.join(tmp, "console.txt"), "w") as console, contextlib.redirect_stdout(console):
        t4 = time.monotonic()
        cfg = config_from_dict({
            "model": {"name": w.model, **w.model_kwargs},
            "loss": {"name": w.loss},
            "data": {"name": f"bench_{w.name}", "batch_size": w.batch_size},
            "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "scheduler": {"name": "cosine", "warmup_ratio": WARMUP_RATIO},
            "training": {"epochs": 10, "grad_clip": GRAD_CLIP, "eval_every": 1_000_000},
            "output": {"dir": os.path.join(tmp, "run")},
        })
        t5 = time.monotonic()
        tr = trainer_module.Trainer(cfg, callbacks=[FirstStep()])
        t6 = time.monotonic()
        tr.train()

    # A, in the same process (its imports are already paid): build, then one step.
    from torch.utils.data import DataLoader

    t7 = time.monotonic()
    torch.manual_seed(SEED)
    train_set, _ = w.datasets()
    model = w.build_model()
    loss_fn = w.build_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(1000, 50))
    loader = DataLoader(train_set, batch_size=w.batch_size, shuffle=True)
    t8 = time.monotonic()
    inputs, targets = next(iter(loader))
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    t9 = time.monotonic()
    rows = [
        ("import torch (both)", t1 - t0),
        ("first optimizer: imports torch._dynamo (both)", t2 - t1),
        ("import accelerate and cr_accel (B)", t3 - t2),
        ("config_from_dict (B)", t5 - t4),
        ("Trainer(cfg) (B)", t6 - t5),
        ("train() up to the end of the first optimizer step (B)", marks["first_step"] - t6),
        ("build model, data, optimizer, schedule, loader (A)", t8 - t7),
        ("first optimizer step (A)", t9 - t8),
    ]
    return rows, sorted(parts.items(), key=lambda kv: -kv[1])


def run_startup(workload_name, runs):
    """`runs` fresh processes of startup_phases; a markdown table of the medians in milliseconds."""
    import json
    import subprocess

    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--startup", workload_name], capture_output=True, text=True,
                             check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    rows = [(name, statistics.median(r["rows"][i][1] for r in results)) for i, (name, _) in enumerate(results[0]["rows"])]
    parts = {}
    for r in results:
        for name, value in r["parts"]:
            parts.setdefault(name, []).append(value)
    b_extra = sum(v for n, v in rows if n.endswith("(B)"))
    a_own = sum(v for n, v in rows if n.endswith("(A)"))
    lines = [
        f"### start-up, {workload_name}: milliseconds (median of {runs} fresh processes, 1 thread)",
        "",
        "| phase | ms |",
        "|---|---|",
        *[f"| {name} | {1e3 * value:.1f} |" for name, value in rows],
        f"| **B's own phases - A's own phases** | **{1e3 * (b_extra - a_own):+.1f}** |",
        "",
        "Inside B's phases (wrapped helpers; included in the rows above):",
        "",
        "| part | ms |",
        "|---|---|",
        *[f"| {name} | {1e3 * statistics.median(v):.1f} |" for name, v in
          sorted(parts.items(), key=lambda kv: -statistics.median(kv[1]))],
        "",
    ]
    return "\n".join(lines)


def _is_measurement(part):
    return part.startswith("time stamp per step")


if __name__ == "__main__":
    if sys.argv[1] == "--startup":  # one fresh process of run_startup
        import json

        rows, parts = startup_phases(sys.argv[2])
        print(json.dumps({"rows": rows, "parts": parts}))
    else:
        quick = "--quick" in sys.argv[2:]
        names = sys.argv[1].split(",")
        print(run_startup(names[0], 1 if quick else 5))
        print(run_breakdown(names, quick=quick))
