"""What checkpoints cost the cr_accel Trainer: how long a save blocks training, and how long a resume takes.

    python bench/checkpoint.py [--quick] [--reps N] [--dir DIR]

Part 1, save: a ~100M-parameter MLP (fp32, AdamW: the optimizer state is twice the parameters, ~1.2 GB
per checkpoint) trains a few steps; then, from `on_step_end` (where `checkpoint.save_every_steps` saves),
`trainer.save_checkpoint(["periodic"])` and `(["periodic", "last", "best"])` are timed, alternating, with
accelerate's `save_state`, the sha256 manifest and the folder renames/links timed inside them. After each
save (outside the timed part) the files are fsync'ed, to see how much was still only in the page cache.
Then reading one back: `checkpoint.verify` (sha256 again) and `accelerator.load_state`.

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

MB = 1e6
# (model widths, samples, batch) for each part; quick = smoke test.
SAVE_SIZES = {"full": dict(width=4096, layers=5, num_train=64, batch=8),  # 6 Linear 4096x4096: 100.7M params
              "quick": dict(width=512, layers=2, num_train=64, batch=8)}
RESUME_SIZES = {"full": dict(num_train=200_000, batch=32), "quick": dict(num_train=20_000, batch=32)}
SAVE_KINDS = {"periodic": ["periodic"], "periodic+last+best": ["periodic", "last", "best"]}
# One torch thread everywhere: other tasks share this machine's 2 cores, and with two threads contending
# with them the small model's 3 ms steps became 10-90 ms ones.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a ~1M-parameter model, 20k samples, 1 repetition")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each measurement (default 4, quick 1)")
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="where the temporary run folders go (default: the temp dir); pick the disk to measure")
    p.add_argument("--worker", choices=("save", "setup", "resume"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = "quick" if args.quick else "full"
    args.reps = args.reps or (1 if args.quick else 4)
    if args.reps < 1:
        p.error("--reps must be >= 1")
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
    """Wraps functions in place and adds up the seconds spent in each, under a label."""

    def __init__(self):
        self.seconds = {}
        self._originals = []

    def wrap(self, owner, name, label=None, label_of_call=None):
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            key = label_of_call(*args, **kwargs) if label_of_call else (label or name)
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started

        self._originals.append((owner, name, inner))
        setattr(owner, name, timed)

    def restore(self):
        for owner, name, inner in reversed(self._originals):
            setattr(owner, name, inner)
        self._originals = []


class Done(Exception):
    """Raised from a callback to leave `train()` at once (no validation, no end-of-run checkpoint)."""


def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def fsync_folder(path):
    started = time.perf_counter()
    for p in Path(path).iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - started


def save_worker(spec):
    import accelerate.checkpointing
    import torch

    from cr_accel import checkpoint
    from cr_accel.callbacks import Callback
    from cr_accel.models import count_parameters
    from cr_accel.trainer import Trainer

    register_dataset()
    sizes = spec["sizes"]
    cfg = make_config(spec["out"], sizes["width"], sizes["layers"], sizes["width"], sizes["num_train"], 8,
                      sizes["batch"])
    trainer = Trainer(cfg)
    timers = Timers()
    timers.wrap(accelerate.checkpointing, "save", label_of_call=lambda obj, f, **kw: "save_state: " + Path(f).name)
    timers.wrap(trainer.accelerator, "save_state", "save_state")
    timers.wrap(checkpoint, "_write_manifest", "sha256 manifest")
    timers.wrap(checkpoint, "_sha256", "sha256 of files")  # inside the manifest
    timers.wrap(checkpoint, "_link_copy", "links")
    timers.wrap(checkpoint, "_publish", "publish")
    timers.wrap(trainer.checkpoints, "_rotate", "rotate")
    timers.wrap(checkpoint.store.shutil, "rmtree", "rmtree")  # inside publish (old last/best) and rotate (old pool)
    timers.wrap(checkpoint, "_fsync_dir", "fsync dir")
    warm_steps = 3
    step_ends = []

    class Measure(Callback):
        def on_step_end(self, trainer, step, loss):
            step_ends.append(time.perf_counter())
            if step == warm_steps:
                raise Done(measure_saves(trainer, timers, spec["reps"], checkpoint))

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


def measure_saves(trainer, timers, reps, checkpoint):
    saves = []
    for rep in range(reps):
        for kind, targets in SAVE_KINDS.items():
            # A new step folder every time, as in a run: the pool's rotation deletes the oldest one.
            trainer.global_step += 1
            timers.seconds = {}
            rss_before = reset_peak_rss()
            started = time.perf_counter()
            paths = trainer.save_checkpoint(list(targets))
            total = time.perf_counter() - started
            extra_rss = proc_status_mb("VmHWM") - rss_before if rss_before is not None else None
            row = {"kind": kind, "rep": rep, "total": total, **timers.seconds, "extra_rss_mb": extra_rss,
                   "bytes": folder_bytes(paths[0])}
            row["fsync_after"] = fsync_folder(paths[0])
            saves.append(row)
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
    return {"saves": saves, "loads": loads, "hashing": hash_alternatives(newest, checkpoint.files.sha256)}


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
    """Seconds to hash the checkpoint's files: as cr_accel does (one after another), one thread per file,
    and in 64 MB chunks on every core (hashlib and os.pread release the GIL)."""
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
    ways = {"one file after another (cr_accel)": lambda: [sha256_file(p) for p in files],
            "one thread per file": lambda: list(ThreadPoolExecutor(len(files)).map(sha256_file, files)),
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
        def on_step_end(self, trainer, step, loss):
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
    from cr_accel import components
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

        def on_step_end(self, trainer, step, loss):
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
    last = Path(spec["out"]) / "checkpoints" / "last" / "trainer_state.json"
    if last.is_file():
        state = json.loads(last.read_text())
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
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{values[0]:.{digits}f}–{values[-1]:.{digits}f}]"


SAVE_COLUMNS = [  # (timer or row key, decimals), in the order of the table's columns after `targets`
    ("total", 2), ("save_state", 2), ("save_state: model.safetensors", 2), ("save_state: optimizer.bin", 2),
    ("sha256 manifest", 2), ("sha256 of files", 2), ("links", 3), ("rmtree", 2), ("fsync dir", 3), ("rest", 3),
    ("mb_s_state", 0), ("mb_s_total", 0), ("extra_rss_mb", 0), ("fsync_after", 2),
]


def save_tables(r, reps):
    params, size = r["params"], r["saves"][0]["bytes"]
    step = statistics.median(r["step_s"])
    lines = [f"### Save: MLP of {params / 1e6:.1f}M parameters, AdamW, fp32: {size / MB:,.0f} MB per checkpoint",
             "", f"One training step of this model: {step:.2f} s (median of {len(r['step_s'])}; torch threads "
             f"{r['torch_threads']}). sha256 of an in-memory buffer: {r['sha256_mb_s']:.0f} MB/s.",
             f"Seconds, median [min–max] of {reps} saves each, the two kinds alternating, each save at a new step "
             "(keep_last_n 2, so from the third periodic save on the pool's rotation deletes one). `deleting old "
             "folders` is shutil.rmtree inside publish/rotation; `extra peak RSS` is the process's peak resident "
             "memory during the save above its RSS before it; `fsync after` is not part of the save: it is what "
             "flushing its files to disk took right after it.", "",
             "| targets | save blocks training | save_state | of which model | of which optimizer | sha256 manifest "
             "| of which hashing | hard links | deleting old folders | fsync dir | rest | MB/s (save_state) "
             "| MB/s (whole save) | extra peak RSS (MB) | fsync after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in SAVE_KINDS:
        rows = [s for s in r["saves"] if s["kind"] == kind]
        col = lambda key, d=2: stat([s.get(key) or 0.0 for s in rows], d)  # noqa: E731
        for s in rows:
            s["rest"] = s["total"] - sum(s.get(k, 0.0) for k in ("save_state", "sha256 manifest", "links",
                                                                "publish", "rotate"))
            s["mb_s_state"] = s["bytes"] / MB / s["save_state"]
            s["mb_s_total"] = s["bytes"] / MB / s["total"]
        lines.append(f"| {kind} | " + " | ".join(col(key, digits) for key, digits in SAVE_COLUMNS) + " |")
    lines += ["", "Reading the newest one back (files just written, so from the page cache), "
              f"{len(r['loads'])} times:", "",
              "| verify (sha256 of every file) | check_model_matches | accelerator.load_state |", "|---|---|---|",
              "| " + " | ".join(stat([row[k] for row in r["loads"]]) for k in r["loads"][0]) + " |",
              "", "Hashing the same checkpoint's files other ways (seconds, 2 runs each):", "",
              "| how | seconds |", "|---|---|"]
    lines += [f"| {name} | {stat(v)} |" for name, v in r["hashing"].items()]
    return lines


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
    return [f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; run folders in {root} on {dev} ({fstype}{rot_text}), "
            f"{usage.free / 1e9:.0f} GB free; Python {platform.python_version()}."]


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
    if free < 5 * ckpt_bytes + 2e9:
        sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free; this benchmark needs about "
                 f"{(5 * ckpt_bytes + 2e9) / 1e9:.1f} GB there. Pick another disk with --dir")
    work = Path(tempfile.mkdtemp(prefix="cr_accel-bench-checkpoint-", dir=args.dir))
    started = time.monotonic()
    out = machine_lines(work)
    try:
        save = run_worker("save", {"out": str(work / "save"), "sizes": sizes, "reps": args.reps}, work, args.quick)
        shutil.rmtree(work / "save")  # ~5 GB in the full run
        out += [""] + save_tables(save, args.reps)
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
