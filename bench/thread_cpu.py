"""CPU time of each thread of a Trainer run, per optimizer step: what the records' background threads cost.

    python bench/thread_cpu.py [--workload mlp] [--steps 3000] [--records]

Runs B (the Trainer, `bench/variants.run_cr_accel`; with --records everything `bench/variants.add_records` turns
on, or the parts in CR_ACCEL_BENCH_RECORD_PARTS) and reads every thread's time on a CPU from
/proc/self/task/<tid>/schedstat (nanoseconds) at 20% and at 80% of the run; prints each thread's CPU time per
optimizer step in between. The median step (bench/interleaved.py) does not show work that a background thread
does in bursts; this does.
"""

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def thread_cpu_seconds():
    """{(tid, name): seconds on a CPU} of every thread of this process."""
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        task = Path("/proc/self/task") / tid
        try:
            threads[(int(tid), (task / "comm").read_text().strip())] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except FileNotFoundError:  # it ended meanwhile
            pass
    return threads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mlp", help="a name in bench/workloads.py (default mlp)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--records", action="store_true", help="every record on (bench/variants.add_records)")
    args = p.parse_args(argv)
    from ddp_throughput import BENCH_ENV

    if os.environ.get("CR_ACCEL_BENCH_THREAD_CPU") != "1":  # the benchmark's environment, set before torch loads
        env = {**os.environ, **BENCH_ENV, "CR_ACCEL_BENCH_THREAD_CPU": "1"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    import variants
    from workloads import WORKLOADS

    os.environ[variants.RECORDS_ENV] = "1" if args.records else "0"
    first, last = args.steps // 5, args.steps * 4 // 5
    readings = {}

    def between_steps(steps_done):
        if steps_done in (first, last):
            readings[steps_done] = (thread_cpu_seconds(), {t.native_id: t.name for t in threading.enumerate()})

    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # B's progress lines and log
    try:
        with tempfile.TemporaryDirectory(prefix="cr_accel_thread_cpu_") as tmp:
            variants.run_cr_accel(WORKLOADS[args.workload], args.steps, {}, Path(tmp) / "run", between_steps)
    finally:
        sys.stdout = stdout
    (before, _), (after, names) = readings[first], readings[last]
    print(f"{args.workload}{' records on' if args.records else ''}: CPU time per optimizer step, steps {first}-{last}")
    for (tid, comm), seconds in sorted(after.items()):
        spent = seconds - before.get((tid, comm), 0.0)
        print(f"  {names.get(tid, comm):24s} {spent / (last - first) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
