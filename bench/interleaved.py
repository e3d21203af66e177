"""A and B taking turns, a few optimizer steps each, in two processes: the median step of each, and B/A.

    python bench/interleaved.py [--workload mlp] [--steps 3000] [--turn 10] [--records] [--runs 3]

On the shared 2-core VM the machine's speed drifts within a second: A's median step over 200-step stretches of
one run moved between 1.45 and 1.89 ms. Two runs one after the other -- even in one process (bench/paired.py)
-- see different stretches of it, which puts +-7% on a single B/A. Here A (the hand-written loop) and B (the
Trainer) each run in a process of their own, as in bench/overhead.py, and take turns: every --turn optimizer
steps a loop hands the turn to the other through a pipe and blocks until it comes back (no CPU while it
waits), so both sample the same stretches of the machine. (Two threads of one process would not do: the same
hand-written loop ran ~2.5% slower in the main thread than in a second one.) Left out: the step after each
hand-over (it contains the wait) and each loop's first 10% (warm-up). Both run on one CPU (--cpu): unpinned,
the two processes sat on different cores, and a second hand-written loop as B (--control) came out 0.99x; on
one core it is 1.00x. B's own threads (the trackers' and the dashboard's) share that core, so what they do is
counted against B. The turns change at steps `turn // 2`,
`turn // 2 + turn`, ...: with a turn that divides 50, half a turn after B's log steps (every 50) and epoch
ends (every 100), so what its sinks' threads write after a record falls in B's own turn. With --records B has
everything `bench/variants.add_records` turns on (or the parts in CR_ACCEL_BENCH_RECORD_PARTS). Reported: B/A
of the median steps over the run, and over each fifth of it (the spread). The children run with the
benchmark's environment (`bench/ddp_throughput.BENCH_ENV`: one thread, fixed malloc thresholds).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mlp", help="a name in bench/workloads.py (default mlp)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps of each loop (default 3000)")
    p.add_argument("--turn", type=int, default=10, help="optimizer steps per turn; one that divides 50 (default 10)")
    p.add_argument("--records", action="store_true", help="B with every record on (bench/variants.add_records)")
    p.add_argument("--runs", type=int, default=3, help="runs of A and B, one after the other (default 3)")
    p.add_argument("--cpu", type=int, default=os.cpu_count() - 1,
                   help="the CPU both loops run on, with their threads (default the last; -1: any)")
    p.add_argument("--control", action="store_true",
                   help="B is a second hand-written loop: what the harness alone puts between two equal loops")
    args = p.parse_args(argv)
    if args.turn < 2 or 50 % args.turn:
        p.error(f"--turn must divide 50 (B's log steps), so turns change half a turn after them; got {args.turn}")
    return args


# ---------------------------------------------------------------------------------------- a child: one loop

CONTROL_ENV = "CR_ACCEL_BENCH_CONTROL"  # B runs the hand-written loop too (--control)
CPU_ENV = "CR_ACCEL_BENCH_CPU"  # the CPU the children run on (--cpu)


class Baton:
    """The child's side of the turns: says "ready" before its first step and "yield" every `turn` steps (at
    `turn // 2`, `turn // 2 + turn`, ...), each time waiting for "go" from the parent."""

    def __init__(self, turn, go_fd, said_fd):
        self.turn, self.go, self.said = turn, go_fd, said_fd
        self.resumed = []  # steps done when the turn came back: the next step's time holds the wait

    def between_steps(self, steps_done):
        if steps_done == 0:
            self._say(b"r")
        elif steps_done % self.turn == self.turn // 2:
            self._say(b"y")
            self.resumed.append(steps_done)

    def _say(self, message):
        os.write(self.said, message)
        if os.read(self.go, 1) != b"g":
            raise SystemExit("the benchmark's parent went away")


def child(variant, workload_name, steps, turn, go_fd, said_fd, result_path, workdir):
    cpu = int(os.environ.get(CPU_ENV, "-1"))
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})  # before torch starts any thread: they all inherit it
    import variants
    from workloads import WORKLOADS

    workload = WORKLOADS[workload_name]
    baton = Baton(turn, go_fd, said_fd)
    if variant == "A" or os.environ.get(CONTROL_ENV) == "1":
        stamps, _ = variants.run_hand_written(workload, steps, {}, baton.between_steps)
    else:
        sys.stdout = open(os.devnull, "w")  # B's progress lines and log
        stamps, _ = variants.run_cr_accel(workload, steps, {}, workdir, baton.between_steps)
    Path(result_path).write_text(json.dumps({"stamps": stamps, "resumed": baton.resumed}))


# ---------------------------------------------------------------------------------------- the parent

def start_child(variant, args, workdir, env):
    go_read, go_write = os.pipe()
    said_read, said_write = os.pipe()
    result = workdir / f"{variant}.json"
    cmd = [sys.executable, __file__, "--child", variant, args.workload, str(args.steps), str(args.turn),
           str(go_read), str(said_write), str(result), str(workdir / variant)]
    proc = subprocess.Popen(cmd, pass_fds=(go_read, said_write), env=env, cwd=HERE.parent)
    os.close(go_read)
    os.close(said_write)
    return {"proc": proc, "go": go_write, "said": said_read, "result": result}


def take_turns(children):
    """Both ready, then B first; each "yield" gives the turn to the other loop (or back, once it has ended)."""
    for c in children.values():
        if os.read(c["said"], 1) != b"r":
            raise SystemExit(f"a benchmark child ended before its first step (exit {c['proc'].wait()})")
    running, ended = "B", set()
    os.write(children["B"]["go"], b"g")
    while len(ended) < 2:
        message = os.read(children[running]["said"], 1)
        other = "A" if running == "B" else "B"
        if message == b"":  # it finished its steps and exited
            ended.add(running)
            if other not in ended:
                running = other
                os.write(children[running]["go"], b"g")
            continue
        if other not in ended:
            running = other
        os.write(children[running]["go"], b"g")


def one_run(args, workdir, env):
    from overhead import warm_up_steps

    children = {v: start_child(v, args, workdir, env) for v in "AB"}
    try:
        take_turns(children)
    finally:
        for c in children.values():
            os.close(c["go"])
            os.close(c["said"])
            code = c["proc"].wait()
            if code != 0:
                raise SystemExit(f"a benchmark child failed (exit {code})")
    times = {}
    for variant, c in children.items():
        data = json.loads(c["result"].read_text())
        times[variant] = clean_step_times(data["stamps"], set(data["resumed"]), warm_up_steps(args.steps))
    return times


def clean_step_times(stamps, resumed, first):
    """{step index: seconds} of the steps from `first` on whose time holds no wait for the other loop."""
    return {i: stamps[i] - stamps[i - 1] for i in range(max(first, 1), len(stamps)) if i not in resumed}


def ratios(times, parts=5):
    """B/A of the median step over all steps, and over each of `parts` equal stretches of the run."""
    overall = statistics.median(times["B"].values()) / statistics.median(times["A"].values())
    first = min(min(times["A"]), min(times["B"]))
    last = max(max(times["A"]), max(times["B"])) + 1
    bounds = [first + (last - first) * k // parts for k in range(parts + 1)]
    per_part = []
    for lo, hi in zip(bounds, bounds[1:]):
        a = [t for i, t in times["A"].items() if lo <= i < hi]
        b = [t for i, t in times["B"].items() if lo <= i < hi]
        per_part.append(statistics.median(b) / statistics.median(a))
    return overall, per_part


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        variant, workload, steps, turn, go_fd, said_fd, result, workdir = argv[1:]
        child(variant, workload, int(steps), int(turn), int(go_fd), int(said_fd), result, workdir)
        return
    from ddp_throughput import BENCH_ENV
    import variants

    args = parse_args(argv)
    env = {**os.environ, **BENCH_ENV, variants.RECORDS_ENV: "1" if args.records else "0",
           CONTROL_ENV: "1" if args.control else "0", CPU_ENV: str(args.cpu)}
    label = f"{args.workload}{' control (B = A)' if args.control else ' records on' if args.records else ''}"
    overall_ratios = []
    with tempfile.TemporaryDirectory(prefix="cr_accel_interleaved_") as tmp:
        for run in range(args.runs):
            workdir = Path(tmp) / f"run{run}"
            workdir.mkdir()
            times = one_run(args, workdir, env)
            overall, per_part = ratios(times)
            overall_ratios.append(overall)
            print(f"run {run + 1}: A {statistics.median(times['A'].values()) * 1e3:.3f} ms, "
                  f"B {statistics.median(times['B'].values()) * 1e3:.3f} ms, B/A {overall:.3f} "
                  f"(by fifths: {' '.join(f'{r:.3f}' for r in per_part)})", flush=True)
    print(f"{label}: B/A {statistics.median(overall_ratios):.3f}x (median over {args.runs} run(s) of "
          f"{args.steps} steps each, turns of {args.turn})")


if __name__ == "__main__":
    main()
