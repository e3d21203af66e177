"""Peak resident memory of `tensor_files` on data that stays on disk, for two dataset sizes.

    python bench/data_memory.py [--sizes-gb 1,8] [--dir DIR] [--workers 2] [--subset 2048]

For each size, a `.safetensors` file of that size is written in chunks (inputs: 3x64x64 float32 images, 48 KB a
sample; targets: one float32 a sample, so the task is regression with a `data_range`). Then a fresh process
builds `tensor_files` on it (val_ratio 0.1: headers, the seeded split, and the metadata's chunked passes over
every training sample: targets' range, then the per-channel mean and std) and iterates one epoch of a DataLoader
(batch 64, `--workers` workers) over a random `--subset` of the training samples. It reports
`resource.getrusage(...).ru_maxrss` after the imports, after the build and after the epoch (the main process),
and of the workers (RUSAGE_CHILDREN, once they have exited). If memory does not grow with the data, the two
sizes give the same figures. The files are removed at the end. See docs/benchmarks.md, "tensor_files memory".
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_SHAPE = (3, 64, 64)
CHUNK = 1024  # samples written at a time

CHILD = """
import json, resource, sys, time
import torch
from torch.utils.data import DataLoader, Subset
from cr_accel.data import tensor_files

def peak_mb(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024

path, workers, subset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = {"after_imports_mb": peak_mb()}
start = time.perf_counter()
splits = tensor_files(seed=0, path=path, val_ratio=0.1)
report["build_s"] = time.perf_counter() - start
report["after_build_mb"] = peak_mb()
picked = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:subset]
loader = DataLoader(Subset(splits.train, picked.tolist()), batch_size=64, shuffle=True, num_workers=workers,
                    generator=torch.Generator().manual_seed(1))
start = time.perf_counter()
seen = sum(len(x) for x, _ in loader)
report["epoch_s"] = time.perf_counter() - start
del loader
report["after_epoch_mb"] = peak_mb()
report["workers_mb"] = peak_mb(resource.RUSAGE_CHILDREN)
report["samples_seen"] = seen
report["num_train"] = splits.metadata["num_train"]
report["data_range"] = splits.metadata["data_range"]
print(json.dumps(report))
"""


def write_dataset(path, size_gb):
    """A .safetensors file of about `size_gb` GB, written CHUNK samples at a time (never held whole)."""
    import torch

    per_sample = 4 * SAMPLE_SHAPE[0] * SAMPLE_SHAPE[1] * SAMPLE_SHAPE[2]
    count = int(size_gb * 1e9) // per_sample
    inputs_bytes, targets_bytes = count * per_sample, count * 4
    header = {"inputs": {"dtype": "F32", "shape": [count, *SAMPLE_SHAPE], "data_offsets": [0, inputs_bytes]},
              "targets": {"dtype": "F32", "shape": [count, 1],
                          "data_offsets": [inputs_bytes, inputs_bytes + targets_bytes]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    generator = torch.Generator().manual_seed(int(size_gb * 1000))
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for start in range(0, count, CHUNK):
            out.write(torch.rand(min(CHUNK, count - start), *SAMPLE_SHAPE, generator=generator).numpy().data)
        out.write((torch.rand(count, 1, generator=generator) * 10 - 5).numpy().data)
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", default="1,8")
    parser.add_argument("--dir", default=None, help="where to write the files (default: the system temp folder)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subset", type=int, default=2048)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cr_accel_data_memory_", dir=args.dir))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    print(f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {platform.python_version()}\n")
    print("| file | samples | write s | build s | epoch s | peak RSS after imports | after build | after epoch "
          "| workers | num_train, data_range |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for size in (float(s) for s in args.sizes_gb.split(",")):
            path = root / f"data_{size:g}gb.safetensors"
            start = time.perf_counter()
            count = write_dataset(path, size)
            written = time.perf_counter() - start
            done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.workers), str(args.subset)],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(done.stderr)
            r = json.loads(done.stdout)
            print(f"| {path.stat().st_size / 1e9:.2f} GB | {count} | {written:.0f} | {r['build_s']:.1f} | "
                  f"{r['epoch_s']:.1f} | {r['after_imports_mb']:.0f} MB | {r['after_build_mb']:.0f} MB | "
                  f"{r['after_epoch_mb']:.0f} MB | {r['workers_mb']:.0f} MB | {r['num_train']}, "
                  f"[{r['data_range'][0]:.4f}, {r['data_range'][1]:.4f}] |", flush=True)
            path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nEach epoch: {args.subset} random training samples, batch 64, {args.workers} workers; load average "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
