"""What checkpoints cost the cr_accel Trainer: how long a save blocks training (synchronous and asynchronous
saves side by side), what a background write costs the training that goes on meanwhile, and how long a
resume takes.

    python bench/checkpoint.py [--quick] [--reps N] [--dir DIR] [--parts save,resume]

Part 1, save: a ~100M-parameter MLP (fp32, AdamW: the optimizer state is twice the parameters, ~1.2 GB
per checkpoint) trains a few steps; then, from `on_step_end` (where `checkpoint.save_every_steps` saves),
`trainer.save_checkpoint(["periodic"])` and `(["periodic", "last", "best"])` are timed, each once
synchronously and once asynchronously (`trainer.async_save`), alternating, every save at a new step. For an
asynchronous save the time `save_checkpoint` blocks is the snapshot into host memory; `wait_for_checkpoint()`
right after it gives the time until the checkpoint is published (not counted as blocking). The phases of
both kinds are timed by wrapping the functions that do them. Then: the ways a snapshot could copy the
state (fresh memory, kept buffers, threads), timed side by side; K training steps while a background
write is in flight against K steps with nothing in flight, alternating; and reading one checkpoint back.

Part 2, resume: a small MLP on 200k samples, batch 32 (6250 batches an epoch). One run saves a checkpoint
after step 1 and one near the end of the epoch; then fresh processes resume from each (and, for reference,
start without one) and record, on a shared monotonic clock, when they reach each phase up to the end of
the first optimizer step. That step's `on_step_end` sets `trainer.should_stop`, and the time until
`train()` returns is recorded too.

Every Trainer runs in its own subprocess; this process only prints markdown tables. The temporary folder
(several GB in the full run) is removed at the end. See docs/benchmarks.md, "Checkpoint save and resume".
"""

import time

T_SCRIPT = time.monotonic()  # first thing, so that the resume timings can count interpreter start-up

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# This checkout's cr_accel, not whichever one is installed (`python bench/checkpoint.py` puts bench/ first).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 1e6
# (model widths, samples, batch) for each part; quick = smoke test.
SAVE_SIZES = {"full": dict(width=4096, layers=5, num_train=64, batch=8),  # 6 Linear 4096x4096: 100.7M params
              "quick": dict(width=512, layers=2, num_train=64, batch=8)}
RESUME_SIZES = {"full": dict(num_train=200_000, batch=32), "quick": dict(num_train=20_000, batch=32)}
SAVE_KINDS = {"periodic": ["periodic"], "periodic+last+best": ["periodic", "last", "best"]}
MODES = ("sync", "async")
OVERLAP_STEPS = 3  # K: training steps timed while a background write is in flight (about as long as the write)
# One torch thread everywhere: other tasks share this machine's 2 cores, and with two threads contending
# with them the small model's 3 ms steps became 10-90 ms ones. glibc's malloc settings as in
# ACCELERATE_NOTES.md: without them, page faults from memory handed back to the OS dominate the noise.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
PARTS = ("save", "resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a ~1M-parameter model, 20k samples, 1 repetition")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each measurement (default 4, quick 1)")
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="where the temporary run folders go (default: the temp dir); pick the disk to measure")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts to run, comma-separated (default: all)")
    p.add_argument("--worker", choices=("save", "setup", "resume"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = "quick" if args.quick else "full"
    args.reps = args.reps or (1 if args.quick else 4)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        p.error(f"--parts: unknown part(s) {unknown}; choose from: {', '.join(PARTS)}")
    return args


# ---------------------------------------------------------------------------------------- in the workers


def register_dataset():
    import torch
    from torch.utils.data import TensorDataset

    from cr_accel.data import DATASETS, DatasetSplits

    if "bench_ckpt" in DATASETS:  # --quick runs every worker in this one process
        return

    @DATASETS.register("bench_ckpt")
    def bench_ckpt(seed, num_train, num_val, in_features, out_features):
        g = torch.Generator().manual_seed(seed)

        def split(n):
            return TensorDataset(torch.randn(n, in_features, generator=g), torch.randn(n, out_features, generator=g))

        return DatasetSplits(train=split(num_train), val=split(num_val), metadata={})


def make_config(out_dir, width, layers, in_features, num_train, num_val, batch):
    from cr_accel.config import config_from_dict

    return config_from_dict({
        "model": {"name": "mlp", "in_features": in_features, "out_features": in_features,
                  "hidden_sizes": [width] * layers},
        "loss": {"name": "mse"},
        "data": {"name": "bench_ckpt", "batch_size": batch, "num_train": num_train, "num_val": num_val,
                 "in_features": in_features, "out_features": in_features},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "training": {"epochs": 1, "use_amp": False, "log_every": 10**9},
        "checkpoint": {"save_every": 1000, "keep_last_n": 2},
        "output": {"dir": str(out_dir)},
        "seed": 0,
    })


class Timers:
    """Wraps functions in place and adds up the seconds spent in each, under a label (from any thread)."""

    def __init__(self):
        self.seconds = {}
        self._originals = []

    def wrap(self, owner, name, label=None, label_of_call=None, record=None):
        """`record(result)` is called with what each call returned."""
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            key = label_of_call(*args, **kwargs) if label_of_call else (label or name)
            started = time.perf_counter()
            try:
                result = inner(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
            if record is not None:
                record(result)
            return result

        self._originals.append((owner, name, inner))
        setattr(owner, name, timed)

    def restore(self):
        for owner, name, inner in reversed(self._originals):
            setattr(owner, name, inner)
        self._originals = []


class Done(Exception):
    """Raised from a callback to leave `train()` at once (no validation, no end-of-run checkpoint)."""


def save_worker(spec):
    import accelerate.checkpointing
    import torch

    from cr_accel import saving
    from cr_accel.callbacks import Callback
    from cr_accel.checkpoint import async_writer, store
    from cr_accel.models import count_parameters
    from cr_accel.trainer import Trainer

    register_dataset()
    sizes = spec["sizes"]
    cfg = make_config(spec["out"], sizes["width"], sizes["layers"], sizes["width"], sizes["num_train"], 8,
                      sizes["batch"])
    trainer = Trainer(cfg)
    timers, snapshot_bytes = Timers(), []
    # What an asynchronous save does before save_checkpoint returns, and in its background thread.
    timers.wrap(saving, "take_snapshot", "take_snapshot", record=lambda s: snapshot_bytes.append(s.nbytes()))
    timers.wrap(async_writer.Snapshot, "write", "snapshot.write")
    timers.wrap(trainer.checkpoints, "wait_for_marks", "wait for marks")
    # A synchronous save's phases (and the publishing that both kinds share).
    timers.wrap(trainer.accelerator, "save_state", "save_state")
    timers.wrap(accelerate.checkpointing, "save", label_of_call=lambda obj, f, **kw: "file: " + Path(f).name)
    timers.wrap(trainer.checkpoints, "write_own_files", "own files")
    timers.wrap(trainer.checkpoints, "prepare_folder", "prepare folder")
    timers.wrap(store, "_write_manifest", "manifest")
    timers.wrap(store, "fsync_tree", "fsync files")  # inside the manifest
    timers.wrap(store, "sha256_all", "hashing")  # inside the manifest; one thread per file
    timers.wrap(store, "link_copy", "links")
    timers.wrap(store, "_publish", "renames")
    timers.wrap(trainer.checkpoints, "_rotate", "rotate")
    warm_steps = 3
    step_ends = []

    class Measure(Callback):
        def on_step_end(self, trainer, state):
            step = state.step
            step_ends.append(time.perf_counter())
            if step == warm_steps:
                saves = measure_saves(trainer, timers, spec["reps"], snapshot_bytes)
                timers.restore()
                raise Done({"saves": saves, "snapshot_ways": snapshot_ways(trainer, spec["reps"]),
                            "overlap": measure_overlap(trainer, spec["reps"], spec["overlap_steps"]),
                            **measure_loads(trainer, spec["reps"])})

    trainer.add_callback(Measure())
    try:
        trainer.train()
        raise RuntimeError("the save benchmark never reached its measuring step")
    except Done as done:
        result = done.args[0]
    finally:
        timers.restore()
    result.update(params=count_parameters(trainer.accelerator.unwrap_model(trainer.model)),
                  step_s=[b - a for a, b in zip(step_ends, step_ends[1:])],
                  torch_threads=torch.get_num_threads(), sha256_mb_s=sha256_speed())
    return result


def measure_saves(trainer, timers, reps, snapshot_bytes):
    """Every (targets, mode) `reps` times: sync, async, sync, async ..., each save at a new step."""
    from cr_accel import checkpoint

    saves = []
    for rep in range(reps):
        for kind, targets in SAVE_KINDS.items():
            for mode in MODES:
                # Deleting the folder that rotation or replacement removed runs in a thread; let the last
                # one finish, so that no save pays for its predecessor's.
                checkpoint.wait_for_discards()
                trainer.async_save = mode == "async"
                trainer.global_step += 1  # a new step folder every time, as in a run: rotation deletes the oldest
                timers.seconds, snapshot_bytes[:] = {}, []
                rss_before = reset_peak_rss()
                started = time.perf_counter()
                paths = trainer.save_checkpoint(list(targets))
                blocked = time.perf_counter() - started
                row = {"kind": kind, "mode": mode, "rep": rep, "blocked": blocked, "rss_before_mb": rss_before,
                       "blocking": dict(timers.seconds)}
                if mode == "async":
                    trainer.wait_for_checkpoint()
                    row["published"] = time.perf_counter() - started
                    row["snapshot_bytes"] = snapshot_bytes[0]
                    row["background"] = {k: v - row["blocking"].get(k, 0.0) for k, v in timers.seconds.items()}
                row["extra_rss_mb"] = proc_status_mb("VmHWM") - rss_before if rss_before is not None else None
                row["bytes"] = folder_bytes(paths[0])
                saves.append(row)
    return saves


def measure_loads(trainer, reps):
    """Reading the newest checkpoint back, and hashing its files other ways."""
    from cr_accel import checkpoint

    newest = max(trainer.checkpoints.complete(), key=lambda p: checkpoint.read_state(p)["trainer"]["global_step"])
    loads = []
    for _ in range(min(reps, 2)):
        row = {}
        for label, fn in (("verify (sha256)", lambda: checkpoint.verify(newest)),
                          ("check_model_matches", lambda: checkpoint.check_model_matches(
                              newest, trainer.accelerator.unwrap_model(trainer.model))),
                          ("load_state", lambda: trainer.accelerator.load_state(str(newest)))):
            started = time.perf_counter()
            fn()
            row[label] = time.perf_counter() - started
        loads.append(row)
    return {"loads": loads, "hashing": hash_alternatives(newest, checkpoint.files.sha256)}


def snapshot_ways(trainer, reps):
    """Seconds (and minor page faults) to copy the model and optimizer state into host memory, ways side by
    side in rotating order: what take_snapshot does, and the copies it could do."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from cr_accel.checkpoint import async_writer

    acc = trainer.accelerator
    sources = state_tensors(trainer)
    kept = [torch.empty_like(t) for t in sources]
    for buffer, source in zip(kept, sources):  # touched once, so that the ways below find them mapped
        buffer.copy_(source)
    threads = os.cpu_count() or 1
    pool = ThreadPoolExecutor(threads)

    def split_evenly(n):  # `n` lists of (buffer, source) of about equal bytes, biggest first
        lanes = [[] for _ in range(n)]
        sizes = [0] * n
        for pair in sorted(zip(kept, sources), key=lambda p: -p[1].numel()):
            i = sizes.index(min(sizes))
            lanes[i].append(pair)
            sizes[i] += pair[1].numel()
        return lanes

    lanes = split_evenly(threads)

    def copy_lane(lane):
        for buffer, source in lane:
            buffer.copy_(source)

    def take_snapshot():
        snapshot = async_writer.take_snapshot(acc)
        getattr(snapshot, "release", lambda: None)()  # give kept buffers back, as a write does at its end

    ways = {
        "take_snapshot (as cr_accel does it)": take_snapshot,
        "of which get_state_dict + optimizer.state_dict() + RNG (no copy)": lambda: (
            [acc.get_state_dict(m, unwrap=False) for m in acc._models],
            [o.state_dict() for o in acc._optimizers], async_writer._rng_state(acc.step)),
        "clone into new memory, 1 thread": lambda: [t.clone() for t in sources],
        f"clone into new memory, {threads} threads": lambda: list(pool.map(torch.clone, sources)),
        "copy into kept buffers, 1 thread": lambda: [b.copy_(s) for b, s in zip(kept, sources)],
        f"copy into kept buffers, {threads} threads": lambda: list(pool.map(copy_lane, lanes)),
    }
    seconds = {name: [] for name in ways}
    faults = {name: [] for name in ways}
    names = list(ways)
    for rep in range(max(reps, 3)):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            result = ways[name]()
            seconds[name].append(time.perf_counter() - started)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del result
    pool.shutdown()
    return {"seconds": seconds, "faults": faults, "bytes": sum(t.numel() * t.element_size() for t in sources),
            "threads": threads}


def state_tensors(trainer):
    """The tensors a snapshot copies: the model's state dict and the optimizer's state."""
    import torch

    acc = trainer.accelerator
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk([acc.get_state_dict(m, unwrap=False) for m in acc._models])
    walk([o.state_dict() for o in acc._optimizers])
    return found


def measure_overlap(trainer, reps, k):
    """K training steps (forward, backward, optimizer step) on one batch while an asynchronous save is being
    written, against K steps with nothing in flight; alternating, the order flipped every repetition."""
    from cr_accel import checkpoint

    inputs, targets = next(iter(trainer.train_loader))
    write_ends = []
    inner = trainer._write_snapshot

    def write_snapshot(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        finally:
            write_ends.append(time.perf_counter())

    trainer._write_snapshot = write_snapshot  # looked up when the save starts its thread
    trainer.async_save = True

    def steps():
        times = []
        for _ in range(k):
            started = time.perf_counter()
            trainer._forward_backward(inputs, targets)
            trainer._optimizer_step()
            times.append(time.perf_counter() - started)
        return times

    steps()  # warm
    rows = []
    try:
        for rep in range(reps):
            for mode in ("idle", "writing") if rep % 2 == 0 else ("writing", "idle"):
                checkpoint.wait_for_discards()
                row = {"mode": mode, "rep": rep}
                if mode == "writing":
                    trainer.global_step += 1
                    started = time.perf_counter()
                    trainer.save_checkpoint(["periodic"])
                    row["blocked"] = time.perf_counter() - started
                steps_started = time.perf_counter()
                row["steps"] = steps()
                steps_ended = time.perf_counter()
                if mode == "writing":
                    trainer.wait_for_checkpoint()
                    row["published"] = time.perf_counter() - started
                    # The share of the K steps' time during which the write was still going on.
                    row["overlap"] = (min(write_ends[-1], steps_ended) - steps_started) / (steps_ended - steps_started)
                rows.append(row)
    finally:
        del trainer._write_snapshot
    return rows


def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def proc_status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e3  # kB
    raise KeyError(field)


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) and return the current RSS in MB; None where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return proc_status_mb("VmRSS")


def hash_alternatives(folder, sha256_file):
    """Seconds to hash the checkpoint's files: one after another, one thread per file (as cr_accel's
    sha256_all does), and in 64 MB chunks on every core (hashlib and os.pread release the GIL)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    files = [p for p in Path(folder).iterdir() if p.is_file()]
    chunk = 64 << 20

    def chunk_digest(job):
        path, offset = job
        fd = os.open(path, os.O_RDONLY)
        try:
            return hashlib.sha256(os.pread(fd, chunk, offset)).hexdigest()
        finally:
            os.close(fd)

    jobs = [(p, off) for p in files for off in range(0, max(p.stat().st_size, 1), chunk)]
    threads = os.cpu_count() or 1
    ways = {"one file after another": lambda: [sha256_file(p) for p in files],
            "one thread per file (cr_accel)": lambda: list(ThreadPoolExecutor(len(files)).map(sha256_file, files)),
            f"64 MB chunks on {threads} threads": lambda: list(ThreadPoolExecutor(threads).map(chunk_digest, jobs))}
    seconds = {name: [] for name in ways}
    for _ in range(2):
        for name, fn in ways.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def sha256_speed():
    import hashlib

    block = os.urandom(1 << 26)
    digest = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(4):
        digest.update(block)
    return 4 * len(block) / MB / (time.perf_counter() - started)


def setup_worker(spec):
    """Train the small model to the late step, saving a periodic checkpoint at each step in `save_at`."""
    from cr_accel.callbacks import Callback
    from cr_accel.trainer import Trainer

    register_dataset()
    trainer = Trainer(resume_config(spec))
    save_at = set(spec["save_at"])
    saved = {}

    class SaveAt(Callback):
        def on_step_end(self, trainer, state):
            step = state.step
            if step in save_at:
                saved[step] = str(trainer.save_checkpoint(["periodic"])[0])
            if step >= max(save_at):
                raise Done()

    trainer.add_callback(SaveAt())
    started = time.perf_counter()
    try:
        trainer.train()
    except Done:
        pass
    return {"checkpoints": saved, "steps_per_epoch": trainer.steps_per_epoch, "seconds": time.perf_counter() - started}


def resume_config(spec):
    s = spec["sizes"]
    return make_config(spec["out"], 64, 2, 16, s["num_train"], 2000, s["batch"])


def resume_worker(spec, t_script=T_SCRIPT):
    marks = {"script": t_script}
    from cr_accel import checkpoint, components
    from cr_accel.callbacks import Callback
    from cr_accel.trainer import Trainer

    register_dataset()
    marks["imported"] = time.monotonic()
    timers = Timers()
    # The first torch optimizer in a process imports torch._dynamo: seconds that are torch's, not cr_accel's.
    timers.wrap(components, "build_optimizer", "optimizer")
    try:
        trainer = Trainer(resume_config(spec))
    finally:
        timers.restore()
    marks["built"] = time.monotonic()
    timers.wrap(trainer, "_resume", "_resume")
    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer):
            marks["train_start"] = time.monotonic()

        def on_step_end(self, trainer, state):
            step = state.step
            if "first_step" not in marks:
                marks["first_step"] = time.monotonic()
                seen.update(step=step, batch_in_epoch=trainer.batch_in_epoch)
                trainer.should_stop = True

        def on_validation_end(self, trainer, metrics):
            seen["validated"] = True

    trainer.add_callback(Probe())
    marks["train_called"] = time.monotonic()
    status = trainer.train(resume_from_checkpoint=spec["resume"])
    marks["returned"] = time.monotonic()
    last = Path(spec["out"]) / "checkpoints" / "last"
    if checkpoint.is_complete(last):
        state = checkpoint.read_state(last)["trainer"]
        seen["last_saved"] = {k: state[k] for k in ("epoch", "batch_in_epoch", "global_step")}
    return {"marks": marks, "resume_s": timers.seconds.get("_resume", 0.0),
            "optimizer_s": timers.seconds["optimizer"], "status": status, **seen}


# ---------------------------------------------------------------------------------------- orchestration


WORKERS = {"save": save_worker, "setup": setup_worker, "resume": resume_worker}


def run_worker(kind, spec, work, in_process=False):
    """One fresh process (or, in_process, a call); returns its result with the spawn time added (monotonic clock)."""
    spec = {**spec, "result": str(work / f"{kind}-{time.monotonic_ns()}.json")}
    console = work / "console.txt"
    if in_process:
        with open(console, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            spawned = time.monotonic()
            result = resume_worker(spec, t_script=spawned) if kind == "resume" else WORKERS[kind](spec)
        return {**result, "spawned": spawned}
    with open(console, "a") as out:
        spawned = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"the {kind} worker failed (exit {proc.returncode}); its output:\n{console.read_text()[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result["spawned"] = spawned
    return result


def stat(values, digits=2):
    """`median [min–max]` (just the value for one)."""
    values = sorted(values)
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{values[0]:.{digits}f}–{values[-1]:.{digits}f}]"


SYNC_PHASES = [  # (label, key in the row's blocking timers); `rest` is what the save blocked beyond them
    ("prepare folder", "prepare folder"), ("save_state", "save_state"),
    ("of which model.safetensors", "file: model.safetensors"), ("of which optimizer.bin", "file: optimizer.bin"),
    ("own files", "own files"), ("manifest", "manifest"), ("of which fsync", "fsync files"),
    ("of which hashing", "hashing"), ("hard links", "links"), ("renames", "renames"), ("rotate", "rotate"),
]
TOP_LEVEL = ("prepare folder", "save_state", "take_snapshot", "own files", "manifest", "links", "renames", "rotate")
ASYNC_BACKGROUND = [
    ("snapshot.write", "snapshot.write"), ("of which model.safetensors", "file: model.safetensors"),
    ("of which optimizer.bin", "file: optimizer.bin"), ("own files", "own files"),
    ("wait for marks", "wait for marks"), ("manifest", "manifest"), ("of which fsync", "fsync files"),
    ("of which hashing", "hashing"), ("hard links", "links"), ("renames", "renames"), ("rotate", "rotate"),
]


SAVE_HEADER = ["| targets | mode | save blocks training | published after | snapshot (MB) | RSS before (MB) "
               "| extra peak RSS (MB) | MB/s (bytes / blocking) |", "|---|---|---|---|---|---|---|---|"]


def save_tables(r, reps):
    saves = r["saves"]
    params, size = r["params"], saves[0]["bytes"]
    step = statistics.median(r["step_s"])
    first_async = next(s for s in saves if s["mode"] == "async")
    warm = [s for s in saves if s is not first_async]
    lines = [f"### Save: MLP of {params / 1e6:.1f}M parameters, AdamW, fp32: {size / MB:,.0f} MB per checkpoint",
             "", f"One training step of this model: {step:.2f} s (median of {len(r['step_s'])}; torch threads "
             f"{r['torch_threads']}). sha256 of an in-memory buffer: {r['sha256_mb_s']:.0f} MB/s.", "",
             f"Seconds, median [min–max] of {reps} saves of each kind and mode, in the order sync, async for "
             "`periodic`, then for `periodic+last+best`, repeated; every save at a new step (keep_last_n 2: "
             "rotation deletes one folder from the third periodic save on, and `last`/`best` replace older ones; "
             "those deletions run in a thread, and each save starts after the previous one's finished). "
             "`published after` is from the call until `wait_for_checkpoint()` returned; `RSS before` is the "
             "process's resident memory before the save, `extra peak RSS` its peak above that until the "
             f"checkpoint was published. The first asynchronous save ({first_async['kind']}) is left out of the "
             "async rows and shown below them.", "", *SAVE_HEADER]
    for kind in SAVE_KINDS:
        for mode in MODES:
            rows = [s for s in warm if s["kind"] == kind and s["mode"] == mode]
            lines.append(save_row(kind, mode, rows))
    lines += ["", "The first asynchronous save of the run:", "", *SAVE_HEADER,
              save_row(first_async["kind"], "async (first)", [first_async])]
    lines += ["", "Asynchronous blocking time over synchronous, each async save against the sync save just "
              "before it (same targets, same repetition); target: at most 0.10.", "",
              "| targets | async / sync blocking | saves at or under 0.10 |", "|---|---|---|"]
    for kind in SAVE_KINDS:
        ratios = save_ratios(saves, kind, skip=first_async)
        lines.append(f"| {kind} | {stat(ratios, 3)} | {sum(x <= 0.10 for x in ratios)} of {len(ratios)} |")
    lines += ["", "Where a synchronous save's time goes (seconds, median [min–max]; `of which` rows are inside "
              "the row before them; `rest` is the blocking time outside the timed phases):", "",
              "| targets | blocks | " + " | ".join(label for label, _ in SYNC_PHASES) + " | rest |",
              "|---|---|" + "---|" * (len(SYNC_PHASES) + 1)]
    for kind in SAVE_KINDS:
        rows = [s for s in saves if s["kind"] == kind and s["mode"] == "sync"]
        cells = [stat([s["blocking"].get(key, 0.0) for s in rows], 3) for _, key in SYNC_PHASES]
        rest = [s["blocked"] - sum(v for k, v in s["blocking"].items() if k in TOP_LEVEL) for s in rows]
        blocked = stat([s["blocked"] for s in rows])
        lines.append(f"| {kind} | {blocked} | " + " | ".join(cells) + f" | {stat(rest, 3)} |")
    lines += ["", "Where an asynchronous save's time goes (seconds; all saves but the first): what it blocks, "
              "then its background thread until published:", "",
              "| targets | blocks | of which take_snapshot | " + " | ".join(label for label, _ in ASYNC_BACKGROUND)
              + " | published after |", "|---|---|---|" + "---|" * (len(ASYNC_BACKGROUND) + 1)]
    for kind in SAVE_KINDS:
        rows = [s for s in warm if s["kind"] == kind and s["mode"] == "async"]
        cells = [stat([s["background"].get(key, 0.0) for s in rows], 3) for _, key in ASYNC_BACKGROUND]
        lines.append(f"| {kind} | {stat([s['blocked'] for s in rows], 3)} | "
                     f"{stat([s['blocking'].get('take_snapshot', 0.0) for s in rows], 3)} | " + " | ".join(cells)
                     + f" | {stat([s['published'] for s in rows])} |")
    lines += [""] + snapshot_table(r["snapshot_ways"]) + [""] + overlap_table(r["overlap"], warm)
    lines += ["", "Reading the newest one back (files just written, so from the page cache), "
              f"{len(r['loads'])} times:", "",
              "| verify (sha256 of every file) | check_model_matches | accelerator.load_state |", "|---|---|---|",
              "| " + " | ".join(stat([row[k] for row in r["loads"]]) for k in r["loads"][0]) + " |",
              "", "Hashing the same checkpoint's files other ways (seconds, 2 runs each):", "",
              "| how | seconds |", "|---|---|"]
    lines += [f"| {name} | {stat(v)} |" for name, v in r["hashing"].items()]
    return lines


def save_row(kind, mode, rows):
    def col(key, digits=2):
        return stat([s[key] for s in rows if s.get(key) is not None], digits)

    snapshot = stat([s["snapshot_bytes"] / MB for s in rows], 0) if mode.startswith("async") else "–"
    published = col("published") if mode.startswith("async") else "(= blocks)"
    rate = stat([s["bytes"] / MB / s["blocked"] for s in rows], 0)
    return (f"| {kind} | {mode} | {col('blocked', 3)} | {published} | {snapshot} | {col('rss_before_mb', 0)} "
            f"| {col('extra_rss_mb', 0)} | {rate} |")


def save_ratios(saves, kind, skip=None):
    ratios = []
    for rep in sorted({s["rep"] for s in saves}):
        pair = {s["mode"]: s for s in saves if s["kind"] == kind and s["rep"] == rep}
        if pair.get("async") is not skip and len(pair) == 2:
            ratios.append(pair["async"]["blocked"] / pair["sync"]["blocked"])
    return ratios


def snapshot_table(ways):
    n = len(next(iter(ways["seconds"].values())))
    lines = [f"Copying the state a snapshot holds ({ways['bytes'] / MB:,.0f} MB: the model's state dict and "
             f"AdamW's state) into host memory, the ways in rotating order, {n} times each (seconds, and minor "
             "page faults: each is a 4 KB page of memory the kernel maps at first touch):", "",
             "| how | seconds | GB/s | minor page faults |", "|---|---|---|---|"]
    for name, seconds in ways["seconds"].items():
        rate = stat([ways["bytes"] / 1e9 / s for s in seconds], 1) if "no copy" not in name else "–"
        lines.append(f"| {name} | {stat(seconds, 3)} | {rate} | {stat(ways['faults'][name], 0)} |")
    return lines


def overlap_table(rows, saves):
    k = len(rows[0]["steps"])
    idle = [r for r in rows if r["mode"] == "idle"]
    writing = [r for r in rows if r["mode"] == "writing"]
    paired = [sum(w["steps"]) / sum(i["steps"]) for w, i in
              ((next(r for r in writing if r["rep"] == rep), next(r for r in idle if r["rep"] == rep))
               for rep in sorted({r["rep"] for r in rows}))]
    quiet = [s["published"] for s in saves if s["mode"] == "async" and s["kind"] == "periodic"]
    return [f"Training while a checkpoint is written: {k} training steps (forward, backward, AdamW step) on one "
            "batch right after an asynchronous `periodic` save returned, against the same steps with nothing in "
            f"flight; alternating, the order flipped every repetition, {len(idle)} of each (seconds):", "",
            f"| {k} steps, nothing in flight | {k} steps, write in flight | slowdown (paired ratio) "
            "| share of the steps' time the write was in flight | save blocked | published after, training "
            "meanwhile | published after, nothing else running (table above) |", "|---|---|---|---|---|---|---|",
            f"| {stat([sum(r['steps']) for r in idle])} | {stat([sum(r['steps']) for r in writing])} "
            f"| {stat(paired, 2)}x | {stat([r['overlap'] for r in writing], 2)} "
            f"| {stat([r['blocked'] for r in writing], 3)} | {stat([r['published'] for r in writing])} "
            f"| {stat(quiet)} |"]


PHASES = [  # (column, from mark, to mark)
    ("interpreter start", "spawned", "script"), ("imports", "script", "imported"), ("Trainer()", "imported", "built"),
    ("train() to on_train_start", "train_called", "train_start"), ("first step", "train_start", "first_step"),
    ("process start to first step", "spawned", "first_step"), ("Trainer() to first step", "imported", "first_step"),
    ("should_stop to train() returns", "first_step", "returned"),
]


def resume_table(runs, setup, sizes):
    spe = setup["steps_per_epoch"]
    lines = [f"### Resume: MLP 16-64-64-16 on {sizes['num_train']:,} samples, batch {sizes['batch']} "
             f"({spe:,} batches an epoch)", "",
             f"Seconds per phase (one monotonic clock, starting when the parent spawns the process), median "
             f"[min–max] of {len(next(iter(runs.values())))} fresh processes each (interleaved). "
             "`train() to on_train_start` holds the resume itself (`_resume`: verify, load_state, checks); "
             "`first step` holds creating the (skipping) loader, the first batch and the step. The setup run took "
             f"{setup['seconds']:.1f} s to train and save to the late step.", "",
             "| start | batches skipped | " + " | ".join(p[0] for p in PHASES) + " | of Trainer(): building the "
             "optimizer | of train() to on_train_start: _resume |",
             "|---|---|" + "---|" * (len(PHASES) + 2)]
    for name, results in runs.items():
        cells = [stat([r["marks"].get(b, r.get(b)) - r["marks"].get(a, r.get(a)) for r in results], 3)
                 for _, a, b in PHASES]
        skipped = results[0]["batch_in_epoch"] - 1
        cells += [stat([r[key] for r in results], 3) for key in ("optimizer_s", "resume_s")]
        lines.append(f"| {name} | {skipped:,} | " + " | ".join(cells) + " |")
    first = next(iter(runs.values()))[0]
    saved = first.get("last_saved")
    lines += ["", f"After `trainer.should_stop = True` in the first step's `on_step_end` (batch 1 of epoch 1), "
              f"`train()` ran validation: {bool(first.get('validated'))}; returned `{first['status']}`; "
              f"and wrote `last/` with {saved}."]
    return lines


def machine_lines(root):
    load = os.getloadavg()
    usage = shutil.disk_usage(root)
    dev, fstype = mount_of(root)
    rot = Path(f"/sys/block/{Path(dev).name}/queue/rotational")
    rot_text = f", rotational={rot.read_text().strip()}" if rot.is_file() else ""
    versions = ", ".join(f"{name} {package_version(name)}" for name in ("torch", "accelerate"))
    malloc = " ".join(f"{k}={v}" for k, v in WORKER_ENV.items())
    return [f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"{meminfo_gb('MemTotal'):.0f} GB RAM ({meminfo_gb('MemAvailable'):.0f} GB available), load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; run folders in {root} on {dev} ({fstype}{rot_text}), "
            f"{usage.free / 1e9:.0f} GB free; Python {platform.python_version()}, {versions}.",
            f"Workers' environment: {malloc}. cr_accel from {ROOT}, commit {git_commit()}."]


def git_commit():
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" with uncommitted changes" if dirty else "")


def package_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def meminfo_gb(field):
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e6  # kB
    return float("nan")


def mount_of(path):
    """(device, file system type) of the mount holding `path`, from /proc/mounts."""
    best = ("?", "?", "")
    path = os.path.realpath(path)
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (dev, fstype, mnt)
    except OSError:
        pass
    return best[:2]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        Path(spec["result"]).write_text(json.dumps(WORKERS[args.worker](spec)))
        return
    os.environ.update(WORKER_ENV)  # before torch is imported (--quick imports it here)
    sizes = SAVE_SIZES[args.size]
    ckpt_bytes = 3 * 4 * (sizes["layers"] + 1) * (sizes["width"] ** 2 + sizes["width"])
    free = shutil.disk_usage(args.dir).free
    if "save" in args.parts and free < 5 * ckpt_bytes + 2e9:
        sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free; this benchmark needs about "
                 f"{(5 * ckpt_bytes + 2e9) / 1e9:.1f} GB there. Pick another disk with --dir")
    work = Path(tempfile.mkdtemp(prefix="cr_accel-bench-checkpoint-", dir=args.dir))
    started = time.monotonic()
    out = machine_lines(work)
    try:
        if "save" in args.parts:
            spec = {"out": str(work / "save"), "sizes": sizes, "reps": args.reps, "overlap_steps": OVERLAP_STEPS}
            save = run_worker("save", spec, work, args.quick)
            shutil.rmtree(work / "save")  # ~5 GB in the full run
            out += [""] + save_tables(save, args.reps)
        if "resume" in args.parts:
            out += [""] + resume_part(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    out += ["", f"Whole benchmark: {time.monotonic() - started:.0f} s; load average at the end "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}."]
    print("\n".join(out))


def resume_part(args, work):
    sizes = RESUME_SIZES[args.size]
    spe = -(-sizes["num_train"] // sizes["batch"])
    late = spe - 10
    setup = run_worker("setup", {"out": str(work / "setup"), "sizes": sizes, "save_at": [1, late]}, work, args.quick)
    ckpts = {int(k): v for k, v in setup["checkpoints"].items()}
    starts = {"fresh (no checkpoint)": None, "resume after step 1": ckpts[1],
              f"resume after step {late:,}": ckpts[late]}
    runs = {name: [] for name in starts}
    for rep in range(args.reps):
        order = list(starts.items())
        order = order[rep % len(order):] + order[: rep % len(order)]  # rotate, so no start always goes first
        for i, (name, path) in enumerate(order):
            run_dir = work / f"resume-{rep}-{i}"
            spec = {"out": str(run_dir), "sizes": sizes, "resume": path}
            runs[name].append(run_worker("resume", spec, work, args.quick))
            shutil.rmtree(run_dir)
    lines = resume_table(runs, setup, sizes)
    if args.quick:
        lines.insert(2, "--quick: every run in this one process, so start-up (interpreter, imports, torch's first "
                        "optimizer) is not counted; use the full run for those columns.\n")
    return lines


if __name__ == "__main__":
    main()
