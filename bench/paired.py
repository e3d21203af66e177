"""A and B in one process, alternating: the median step of each run, and B/A per pair.

    python bench/paired.py [--workload mlp] [--pairs 4] [--records] [--steps 1000]

`bench/overhead.py` starts every run in a fresh process, so a run's median step also carries that process's
luck (on the 2-core VM, A's own median moved by +-7% from one process to the next). Here A (the hand-written
loop) and B (the Trainer, with `--records` everything `bench/variants.add_records` turns on, or the parts in
CR_ACCEL_BENCH_RECORD_PARTS) run in turn in one process, B first in even pairs and A first in odd ones, so
the ratio of a pair compares the two loops under the same memory layout and machine state. Each run's median
step leaves out the first 10% of its steps (warm-up). Run it with the benchmark's environment
(`bench/ddp_throughput.BENCH_ENV`: one thread, fixed malloc thresholds); it re-executes itself with it.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mlp", help="a name in bench/workloads.py (default mlp)")
    p.add_argument("--pairs", type=int, default=4, help="A-B pairs (default 4)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000)")
    p.add_argument("--records", action="store_true", help="B with every record on (bench/variants.add_records)")
    return p.parse_args(argv)


def main(argv=None):
    from ddp_throughput import BENCH_ENV

    if os.environ.get("CR_ACCEL_BENCH_PAIRED") != "1":  # the benchmark's environment, set before torch loads
        env = {**os.environ, **BENCH_ENV, "CR_ACCEL_BENCH_PAIRED": "1"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    args = parse_args(argv)
    import variants
    from overhead import step_times  # the same warm-up and step times as bench/overhead.py
    from workloads import WORKLOADS

    os.environ[variants.RECORDS_ENV] = "1" if args.records else "0"
    workload = WORKLOADS[args.workload]
    ratios = []
    with tempfile.TemporaryDirectory(prefix="cr_accel_paired_") as tmp, open(os.devnull, "w") as null:
        for pair in range(args.pairs):
            steps = {}
            for which in ("BA" if pair % 2 == 0 else "AB"):
                stdout, sys.stdout = sys.stdout, null  # B's progress lines and log
                try:
                    if which == "B":
                        stamps, _ = variants.run_cr_accel(workload, args.steps, {}, Path(tmp) / f"run{pair}")
                    else:
                        stamps, _ = variants.run_hand_written(workload, args.steps, {})
                finally:
                    sys.stdout = stdout
                steps[which] = statistics.median(step_times(stamps))
            ratios.append(steps["B"] / steps["A"])
            print(f"pair {pair + 1}: A {steps['A'] * 1e3:.3f} ms, B {steps['B'] * 1e3:.3f} ms, B/A {ratios[-1]:.3f}",
                  flush=True)
    print(f"{args.workload}{' records on' if args.records else ''}: B/A median {statistics.median(ratios):.3f}x "
          f"({min(ratios):.3f}-{max(ratios):.3f}) over {args.pairs} pairs")


if __name__ == "__main__":
    main()
