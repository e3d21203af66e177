"""DataLoader workers: image_folder (PNG decoded in `__getitem__`) with 0 and 2 workers vs the same images
pre-decoded into memory (tensor_files), trained by the real Trainer.

    python bench/data_workers.py [--rounds 5] [--images 1536] [--size 64] [--hidden 96] [--epochs 5] [--quick]
    python bench/data_workers.py --loader-only [--rounds 5]

The bench writes RGB PNGs into class folders in a temporary folder (train and val), decodes them once with
image_folder's own dataset into a .safetensors file per split, so both sides hold the same samples in the
same order (and the run the same shuffle and weights), and trains an MLP classifier on them through
`train.py` with one torch thread:

    M   tensor_files: the pre-decoded tensors in memory (what decoding costs nothing looks like)
    W0  image_folder, data.num_workers=0: every PNG decoded in the training process
    W2  image_folder, data.num_workers=2, data.persistent_workers=true: decoded in 2 worker processes

The image size and the MLP's hidden width are chosen so that decoding a batch costs about as much as the
training step on it (the bench measures both, in one process, and prints them). Variants alternate M W0 W2 in
each round; a run's speed is the median samples/s (metrics.csv) of its epochs after the first (worker start-up)
and before the last (validation); ratios are taken within a round and their median reported. Every run:
OMP_NUM_THREADS=1 and the MALLOC_* thresholds of bench/overhead.py.

`--loader-only`: no training; samples/s of iterating a DataLoader over the same image_folder dataset (2 epochs
after a warm-up one) with 0 workers and with 2 persistent ones, alternating: what the workers can decode.
"""

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddp_throughput import BENCH_ENV  # one thread, fixed malloc thresholds, this checkout's cr_accel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLASSES = 8
VAL_IMAGES = 64
VARIANTS = {
    "M": ("in-memory tensors (tensor_files)", []),
    "W0": ("image_folder, num_workers 0", ["data.num_workers=0"]),
    "W2": ("image_folder, num_workers 2, persistent", ["data.num_workers=2", "data.persistent_workers=true"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="M W0 W2 rounds (default 5)")
    p.add_argument("--images", type=int, default=1536, help="training images (default 1536)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels, RGB (default 64)")
    p.add_argument("--hidden", type=int, default=96, help="the MLP's hidden width (default 96)")
    p.add_argument("--batch", type=int, default=32, help="data.batch_size (default 32)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run, >= 3 (default 5)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 256 images, 3 epochs")
    p.add_argument("--loader-only", action="store_true", help="time the DataLoader alone, with 0 and 2 workers")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.images, args.epochs = 1, 256, 3
    if args.epochs < 3:
        p.error("--epochs must be >= 3: the first and the last epoch are not timed")
    return args


# ---------------------------------------------------------------------------------------------- the data


def write_pngs(folder, count, size, seed):
    """`count` RGB PNGs in CLASSES class folders: smooth colour gradients with noise, so they compress like
    photographs more than like flat test patterns."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for c in range(CLASSES):
        (folder / f"class_{c}").mkdir(parents=True)
    for i in range(count):
        c = i % CLASSES
        angle = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([np.cos(a) * grid[:, None] + np.sin(a) * grid[None, :] for a in angle], -1)
        pixels = 127 + 60 * base + 20 * c / CLASSES + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"class_{c}" / f"{i:05d}.png")


def pre_decode(data_dir):
    """The image_folder splits, decoded once by image_folder's own dataset, as .safetensors files."""
    import torch
    from safetensors.torch import save_file

    from cr_accel.data.images import image_folder

    splits = image_folder(0, data_dir / "train", val_path=data_dir / "val")
    for name, dataset in (("train", splits.train), ("val", splits.val)):
        pairs = [dataset[i] for i in range(len(dataset))]
        inputs = torch.stack([p[0] for p in pairs]).contiguous()
        targets = torch.as_tensor([int(p[1]) for p in pairs], dtype=torch.int64)
        save_file({"inputs": inputs, "targets": targets}, str(data_dir / f"{name}.safetensors"))
    return tuple(splits.train[0][0].shape)


def write_config(path, data_dir, shape, args):
    import yaml

    from cr_accel.config import parse_yaml

    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    features = 1
    for n in shape:
        features *= n
    raw["model"] = {"name": "mlp", "in_features": features, "out_features": CLASSES, "hidden_sizes": [args.hidden]}
    raw["loss"] = {"name": "cross_entropy"}
    raw["data"] = {"name": "image_folder", "batch_size": args.batch, "path": str(data_dir / "train"),
                   "val_path": str(data_dir / "val")}
    raw["training"].update(epochs=args.epochs, eval_every=10**6, log_every=10**6, metrics=[])
    raw["checkpoint"].update(save_every=10**6, keep_last_n=1)
    raw["output"].update(samples_every=0)
    raw["dashboard"]["enabled"] = False
    path.write_text(yaml.safe_dump(raw))


def in_memory_overrides(data_dir):
    return ["data.name=tensor_files", f"data.path={data_dir / 'train.safetensors'}",
            f"data.val_path={data_dir / 'val.safetensors'}"]


# ---------------------------------------------------------------------------------------------- timing


def cost_per_batch(data_dir, shape, args):
    """(decode, step) seconds for one batch, in this process with one thread: what the sizing rests on."""
    import torch

    from cr_accel.data.images import image_folder
    from cr_accel.models import MLP

    torch.set_num_threads(1)
    dataset = image_folder(0, data_dir / "train", val_path=data_dir / "val").train
    started = time.perf_counter()
    batches = [torch.stack([dataset[i][0] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(8)]
    decode = (time.perf_counter() - started) / len(batches)
    model = MLP(batches[0][0].numel(), CLASSES, hidden_sizes=(args.hidden,))
    optimizer = torch.optim.AdamW(model.parameters())
    labels = torch.zeros(args.batch, dtype=torch.int64)
    times = []
    for x in batches * 3:
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return decode, statistics.median(times[4:])


def cpu_seconds():
    """(busy seconds of the whole machine, CPU seconds of this process's finished children and theirs)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


def run_variant(config, out_dir, overrides):
    """(median samples/s of the epochs between the first and the last, from metrics.csv; the cores that other
    tasks kept busy meanwhile, on average; this run's CPU seconds per 1,000 samples, start-up included)."""
    env = {**os.environ, **BENCH_ENV}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config), f"output.dir={out_dir}", *overrides]
    (busy, ours), started = cpu_seconds(), time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    (busy_after, ours_after), wall = cpu_seconds(), time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    samples = sum(float(r["samples_per_s"]) * float(r["epoch_time"]) for r in rows)
    others = max(0.0, (busy_after - busy) - (ours_after - ours)) / wall
    return statistics.median(float(r["samples_per_s"]) for r in rows[1:-1]), others, (ours_after - ours) / samples * 1e3


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="data_workers_") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        write_pngs(data_dir / "train", args.images, args.size, seed=1)
        write_pngs(data_dir / "val", VAL_IMAGES, args.size, seed=2)
        if args.loader_only:
            return loader_only(data_dir, args)
        shape = pre_decode(data_dir)
        config = tmp / "config.yaml"
        write_config(config, data_dir, shape, args)
        decode, step = cost_per_batch(data_dir, shape, args)
        print(f"images {args.images} x {shape}, batch {args.batch}, mlp hidden {args.hidden}: decoding a batch "
              f"{decode * 1e3:.1f} ms, a training step on it {step * 1e3:.1f} ms (one thread, this process)")
        runs = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name, (_, overrides) in VARIANTS.items():
                extra = in_memory_overrides(data_dir) if name == "M" else overrides
                runs[name].append(run_variant(config, tmp / f"run_{name}_{r}", extra))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1][0]:.0f}/s (others {v[-1][1]:.2f} cores)"
                                                 for n, v in runs.items()), flush=True)
    report(runs, args)


def loader_only(data_dir, args):
    import torch
    from torch.utils.data import DataLoader

    from cr_accel.data.images import image_folder

    torch.set_num_threads(1)
    dataset = image_folder(0, data_dir / "train", val_path=data_dir / "val").train
    speeds = {0: [], 2: []}
    for _ in range(args.rounds):
        for workers in speeds:
            options = {"num_workers": workers, "persistent_workers": workers > 0}
            loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, **options)
            for _ in loader:  # warm-up epoch: the workers start
                pass
            started, count = time.perf_counter(), 0
            for _ in range(2):
                for inputs, _ in loader:
                    count += len(inputs)
            speeds[workers].append(count / (time.perf_counter() - started))
            del loader
    for workers, values in speeds.items():
        print(f"num_workers {workers}: {statistics.median(values):.0f} samples/s (median of {args.rounds}; "
              f"{', '.join(f'{v:.0f}' for v in values)})")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")


def report(runs, args):
    print(f"\n| variant | samples/s (median of {args.rounds}) | ratio to M (median of rounds) | ratios per round | "
          "CPU s per 1,000 samples | cores other tasks used |")
    print("|---|---|---|---|---|---|")
    for name, (label, _) in VARIANTS.items():
        speed, others, cpu = ([v[i] for v in runs[name]] for i in range(3))
        ratios = [s / m[0] for s, m in zip(speed, runs["M"])]
        print(f"| {name}: {label} | {statistics.median(speed):.0f} | {statistics.median(ratios):.2f}x | "
              f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(cpu):.2f} | "
              f"{statistics.median(others):.2f} |")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
