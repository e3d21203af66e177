"""Overhead of cr_accel's Trainer (B) over a hand-written PyTorch loop (A), on the same model and data.

    python bench/overhead.py [--rounds 5] [--workloads mlp,cnn] [--steps N] [--quick] [--control] [--json F]
    python bench/overhead.py --breakdown [--workloads mlp,cnn,tiny] [--quick]

Each run is a fresh subprocess (so start-up counts), with one torch thread and glibc malloc told to keep
its memory; the variants alternate A B A B ... (A B A' with --control, A' being A again, to show the noise
floor) and ratios are taken within a round. Prints markdown tables. `--breakdown` instead times, in one
process, the parts of B's step that A does without, and B's start-up phase by phase. docs/benchmarks.md
says exactly what is measured and how to read it.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCH_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # Without these, glibc returns freed memory to the OS and takes it back with page faults, which
    # dominates run-to-run noise on compute-bound CPU workloads (with them, ratios repeat within about 0.03).
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
}
VARIANTS = {"A": "hand-written loop", "B": "cr_accel Trainer", "A'": "hand-written loop again (control)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="A B pairs per workload (default 5)")
    p.add_argument("--workloads", default="mlp,cnn",
                   help="comma-separated: mlp, cnn, tiny (default mlp,cnn; tiny shows the fixed cost per step)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default: 1000 for mlp, 100 for cnn, 3000 for tiny)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of a few steps")
    p.add_argument("--json", type=Path, default=None, help="also write every run's raw timings here")
    p.add_argument("--control", action="store_true",
                   help="also run the hand-written loop a second time per round (A'), to show the noise floor")
    p.add_argument("--retries", type=int, default=0,
                   help="run a round again (keeping the calmer one) when other tasks wanted the CPUs during it "
                        "(more than 0.25 other runnable tasks on average); default 0")
    p.add_argument("--max-contention", type=float, default=0.25, help=argparse.SUPPRESS)
    p.add_argument("--wait-quiet", type=float, default=5.0, metavar="S",
                   help="before each A B pair, wait up to S seconds for other tasks to leave the CPUs (default 5)")
    p.add_argument("--records", action="store_true",
                   help="B with everything it can record on: loss terms, TensorBoard, histograms every 2 epochs, "
                        "the dashboard (see bench/variants.py add_records)")
    p.add_argument("--breakdown", action="store_true",
                   help="instead of the A/B runs, time the parts of B's step that A does not have")
    args = p.parse_args(argv)
    from workloads import WORKLOADS

    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.quick:
        args.rounds = 1
        args.wait_quiet = 0.0
        args.retries = 0
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.steps is not None and args.steps < 4:
        p.error("--steps must be >= 4")
    return args


# ---------------------------------------------------------------------------------------------- runs


RECORDS = False  # --records: B records everything (bench/variants.py reads CR_ACCEL_BENCH_RECORDS)


def run_variant(variant, workload, steps, workdir):
    """One fresh process; returns its JSON result with the parent's start time in marks['t0']."""
    program = "B" if variant == "B" else "A"  # A' (the control) is the same program as A
    run_dir = Path(tempfile.mkdtemp(prefix=f"{program}-{workload}-", dir=workdir))
    result = run_dir / "result.json"
    env = {**os.environ, **BENCH_ENV, "CR_ACCEL_BENCH_RECORDS": "1" if RECORDS else "0"}
    busy = []
    with open(run_dir / "console.txt", "w") as console:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "variants.py"), program, workload, str(steps), str(result),
             str(run_dir / "out"), repr(t0)],
            stdout=console, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent,
        )
        while True:  # sample how many other tasks want a CPU while the run goes on
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                busy.append(other_runnable(ours=2))  # this reader and the child
        wall = time.monotonic() - t0
    console_text = (run_dir / "console.txt").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{variant} on {workload} failed (exit {proc.returncode}):\n{console_text[-3000:]}")
    data = json.loads(result.read_text())
    data["wall"] = wall
    data["others_runnable"] = statistics.mean(busy) if busy else other_runnable(ours=1)
    if variant == "B":
        check_outputs_on(run_dir, console_text, steps)
    return data


def check_outputs_on(run_dir, console_text, steps):
    """B must have trained with its progress lines, text log and CSV on, not silenced."""
    out = run_dir / "out"
    problems = []
    if steps >= 50 and " step 50/" not in console_text:  # training.log_every is 50
        problems.append("no progress line (`step 50/...`) in its console output")
    if not (out / "train.log").is_file() or "epoch 1/" not in (out / "train.log").read_text():
        problems.append("no epoch line in train.log")
    if not (out / "metrics.csv").is_file() or len((out / "metrics.csv").read_text().splitlines()) < 2:
        problems.append("no rows in metrics.csv")
    if problems:
        raise SystemExit(f"cr_accel run in {run_dir} did not write its outputs: " + "; ".join(problems))


def other_runnable(ours):
    """Tasks in the run queue right now (/proc/loadavg's 4th field), less `ours`; 0 where unknown."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0
    return max(0, running - ours)


def wait_for_quiet(max_wait):
    """Wait (up to `max_wait` seconds) until nothing else has wanted a CPU for about a second."""
    deadline = time.monotonic() + max_wait
    quiet = 0
    while time.monotonic() < deadline and quiet < 5:
        quiet = quiet + 1 if other_runnable(ours=1) == 0 else 0
        time.sleep(0.2)


def warm_up_steps(n):
    """Steps left out as warm-up (first-call allocations, lazy init) of a run of `n` steps."""
    return max(2, n // 10)


def step_times(stamps):
    """The time of each step after the warm-up, from the stamps taken after every step."""
    warm = warm_up_steps(len(stamps))
    return [b - a for a, b in zip(stamps[warm:], stamps[warm + 1:])]


def summarize_run(data):
    """Per-step and start-up numbers of one run (seconds)."""
    stamps, cpu = data["stamps"], data["cpu_stamps"]
    n = len(stamps)
    warm = warm_up_steps(n)
    deltas, cpu_deltas = step_times(stamps), step_times(cpu)
    m = data["marks"]
    return {
        "median_step": statistics.median(deltas),
        "mean_step": (stamps[-1] - stamps[warm]) / (n - 1 - warm),
        "median_cpu_step": statistics.median(cpu_deltas),
        "mean_cpu_step": (cpu[-1] - cpu[warm]) / (n - 1 - warm),
        "others_runnable": data["others_runnable"],
        "startup": stamps[0] - m["t0"],
        "interpreter": m["start"] - m["t0"],
        "imports": m["imports"] - m["start"],
        "build": m["built"] - m["imports"],
        "first_step": stamps[0] - m["built"],
        "after_last_step": m["end"] - stamps[-1],
        "wall": data["wall"],
        "threads": m["threads"],
    }


def run_benchmark(args):
    from workloads import WORKLOADS

    steps_for = {w: args.steps or (WORKLOADS[w].quick_steps if args.quick else WORKLOADS[w].default_steps)
                 for w in args.workloads}
    variants = ("A", "B", "A'") if args.control else ("A", "B")
    results = {w: {v: [] for v in variants} for w in args.workloads}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="cr_accel_bench_") as workdir:
        warm_page_cache()
        for r in range(args.rounds):
            for w in args.workloads:
                best = None
                for attempt in range(args.retries + 1):
                    wait_for_quiet(args.wait_quiet)
                    pair = {}
                    for variant in variants:
                        data = run_variant(variant, w, steps_for[w], workdir)
                        s = summarize_run(data)
                        if s["threads"] != 1:
                            raise SystemExit(f"{variant} ran with {s['threads']} torch threads, not 1")
                        pair[variant] = {**s, "raw": data}
                        print(f"round {r + 1}/{args.rounds} {w:4s} {variant:2s}: median step "
                              f"{s['median_step'] * 1e3:7.3f} ms (CPU {s['median_cpu_step'] * 1e3:7.3f} ms), "
                              f"start-up {s['startup']:.2f} s, other runnable tasks {s['others_runnable']:.2f}",
                              file=sys.stderr, flush=True)
                    contention = max(run["others_runnable"] for run in pair.values())
                    if best is None or contention < best[0]:
                        best = (contention, pair)
                    if contention <= args.max_contention:
                        break
                    if attempt < args.retries:
                        print(f"  (other tasks wanted the CPUs: {contention:.2f}; running this pair again)",
                              file=sys.stderr, flush=True)
                for variant in variants:
                    results[w][variant].append(best[1][variant])
            loads.append(os.getloadavg()[0])
    return steps_for, results, loads


def warm_page_cache():
    """Import everything once, untimed, so the first round does not pay for a cold page cache alone."""
    import accelerate  # noqa: F401
    import torch  # noqa: F401

    import cr_accel.trainer  # noqa: F401


# ---------------------------------------------------------------------------------------------- report


def report(args, steps_for, results, loads):
    lines = [
        f"cr_accel overhead: {args.rounds} round(s) of A B per workload, each run a fresh process, "
        f"1 torch thread, malloc thresholds set",
        f"machine: {machine()} | python {platform.python_version()} | {versions()}",
        f"load average (1 min) over the run: {min(loads):.2f}-{max(loads):.2f}; other runnable tasks during "
        f"the runs (mean of samples every 0.25 s): {other_load(results):.2f}",
    ]
    if other_load(results) > 0.3:
        lines.append("WARNING: other processes wanted the CPUs during the runs; absolute times are inflated and "
                     "ratios noisier than usual. Re-run when `uptime` shows a load below 1.")
    lines += [
        "",
        "A: hand-written loop; B: cr_accel Trainer. Per-step times are medians (over rounds) of each run's median "
        "step after warm-up; ratios are medians over rounds of B/A within the round (min-max in brackets). "
        "Targets: B/A at most 1.05x (mlp) and 1.02x (cnn), start-up at most 0.3 s over A's.",
        "",
        "| workload | steps | A median step | B median step | B/A step (wall) | B/A step (CPU time) "
        "| B/A mean step incl. epoch ends | A start-up | B start-up | B - A start-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    controls = []
    for w, by_variant in results.items():
        a, b = by_variant["A"], by_variant["B"]

        def ratio(key, b=b):
            values = [rb[key] / ra[key] for ra, rb in zip(a, b)]
            return f"{statistics.median(values):.3f}x ({min(values):.3f}-{max(values):.3f})"

        if "A'" in by_variant:
            c = by_variant["A'"]
            diffs = [rc["startup"] - ra["startup"] for ra, rc in zip(a, c)]
            controls.append(f"| {w} | {ratio('median_step', c)} | {ratio('median_cpu_step', c)} "
                            f"| {ratio('mean_step', c)} | {statistics.median(diffs):+.2f} s "
                            f"({min(diffs):+.2f} to {max(diffs):+.2f}) |")

        start_diffs = [rb["startup"] - ra["startup"] for ra, rb in zip(a, b)]
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        lines.append(
            f"| {w} | {steps_for[w]} | {fmt_ms(med(a, 'median_step'))} | {fmt_ms(med(b, 'median_step'))} "
            f"| **{ratio('median_step')}** | {ratio('median_cpu_step')} | {ratio('mean_step')} "
            f"| {med(a, 'startup'):.2f} s | {med(b, 'startup'):.2f} s "
            f"| **{statistics.median(start_diffs):+.2f} s** ({min(start_diffs):+.2f} to {max(start_diffs):+.2f}) |"
        )
    if controls:
        lines += [
            "",
            "Control: the hand-written loop run a second time in each round (A', after B), against A. "
            "Its spread is the noise floor of the ratios above.",
            "",
            "| workload | A'/A step (wall) | A'/A step (CPU time) | A'/A mean step | A' - A start-up |",
            "|---|---|---|---|---|",
            *controls,
        ]
    lines += [
        "",
        "Start-up by phase (medians, seconds): parent starts the process -> interpreter runs the script -> "
        "imports done -> model, data, optimizer (B: Trainer) built -> end of the first optimizer step",
        "",
        "| workload | variant | interpreter | imports | build | first step | start-up total "
        "| after the last step (B: validation, finish) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, by_variant in results.items():
        for variant, runs in by_variant.items():
            med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
            lines.append(
                f"| {w} | {variant} ({VARIANTS[variant]}) | {med('interpreter'):.3f} | {med('imports'):.3f} "
                f"| {med('build'):.3f} | {med('first_step'):.3f} | {med('startup'):.3f} "
                f"| {med('after_last_step'):.3f} |"
            )
    return "\n".join(lines)


def other_load(results):
    values = [r["others_runnable"] for by_variant in results.values() for runs in by_variant.values() for r in runs]
    return statistics.mean(values) if values else 0.0


def fmt_ms(seconds):
    return f"{seconds * 1e3:.3f} ms"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def versions():
    import accelerate
    import torch

    return f"torch {torch.__version__}, accelerate {accelerate.__version__}"


def main(argv=None):
    args = parse_args(argv)
    if args.breakdown:  # in a child, so that it runs with the benchmark's environment too
        cmd = [sys.executable, str(HERE / "breakdown.py"), ",".join(args.workloads)] + (["--quick"] if args.quick else [])
        env = {**os.environ, **BENCH_ENV, "CR_ACCEL_BENCH_RECORDS": "1" if args.records else "0"}
        return subprocess.run(cmd, env=env).returncode
    global RECORDS
    RECORDS = args.records
    steps_for, results, loads = run_benchmark(args)
    print(report(args, steps_for, results, loads))
    if args.json:
        args.json.write_text(json.dumps({"steps": steps_for, "loads": loads, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
