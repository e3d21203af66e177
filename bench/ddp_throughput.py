"""Data-parallel throughput of cr_accel's Trainer against a hand-written DDP loop, 1 and 2 CPU processes.

    python bench/ddp_throughput.py [--rounds 5] [--epochs 60] [--eval-every N] [--quick] [--json F]
    python bench/ddp_throughput.py --validation [--rounds 5] [--quick]

Training (default): the default job (`configs/default.yaml`: conv_autoencoder, synthetic_cr, batch 32 per
process, AdamW, cosine schedule, grad_clip 1.0) for `--epochs` epochs, with no checkpoint, no validation
before the last step and no dashboard, trained by
  H  a hand-written loop: plain torch.distributed (gloo) + DistributedDataParallel + DistributedSampler,
     clip_grad_norm_, AdamW, a LambdaLR cosine, the epoch's mean loss all-reduced once per epoch;
  C  cr_accel's Trainer, everything a user gets on (progress lines, text log, CSV, per-step stats, the
     preemption vote);
each run a fresh process (`accelerate launch --multi_gpu --num_processes 2 ...` with ACCELERATE_USE_CPU=1 for
both programs' 2-process runs), alternating H C H C within each world size and round. Both record
`time.perf_counter()` on rank 0 right after every optimizer step (H inline, C from an `on_step_end` callback);
steady-state samples/s = samples trained between the end of the first `WARMUP_EPOCHS` epochs and the last step,
divided by that time (epoch ends, the loader's restarts and per-epoch reductions included, start-up and the
final validation left out). Ratios are C/H within a round; the table gives the median over rounds (min-max).

Validation (`--validation`): the time of one `Trainer.validate()` (median of repeats, after one untimed call)
with 4,096 and with 64 validation samples, in 1 and 2 processes; the difference is the cost of validating
4,032 more samples, and 1-process / 2-process is its speed-up.

Every run: OMP_NUM_THREADS=1, MKL_NUM_THREADS=1 and the MALLOC_* thresholds of bench/overhead.py.
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
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "default.yaml"
WARMUP_EPOCHS = 2
VAL_SIZES = (64, 4096)

BENCH_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "ACCELERATE_USE_CPU": "1",
    "PYTHONPATH": str(ROOT),  # this checkout's cr_accel
}
PROGRAMS = {"H": "hand-written DDP loop", "C": "cr_accel Trainer"}


# ---------------------------------------------------------------------------------------- the children


def job_config(epochs, out_dir, num_val=64, eval_every=0, extra=()):
    """The default job with the benchmark's changes: fewer epochs, no checkpoints, validation every `eval_every`
    epochs (0: only after the last step, outside the timed window)."""
    from cr_accel.config import load_config

    overrides = [f"training.epochs={epochs}", f"training.eval_every={eval_every or 1000000}",
                 "checkpoint.save_every=1000000",
                 f"output.dir={out_dir}", "dashboard.enabled=false", f"data.num_val={num_val}", *extra]
    return load_config(CONFIG, overrides)


def run_hand_written(cfg, clock, eval_every):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from cr_accel import components
    from workloads import cosine_with_warmup

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(cfg.seed)
    data = components.build_datasets(cfg)  # the same tensors the Trainer trains on
    model = components.build_model(cfg)
    loss_fn = components.build_loss(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    batch = cfg.data.batch_size
    if world > 1:
        sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        loader = DataLoader(data.train, batch_size=batch, sampler=sampler)
        # 64 validation samples split evenly: DistributedSampler's padding adds no duplicates here
        val_loader = DataLoader(data.val, batch_size=batch,
                                sampler=DistributedSampler(data.val, num_replicas=world, rank=rank, shuffle=False))
        model = DistributedDataParallel(model)
    else:
        sampler = None
        loader = DataLoader(data.train, batch_size=batch, shuffle=True,
                            generator=torch.Generator().manual_seed(cfg.seed))
        val_loader = DataLoader(data.val, batch_size=batch)
    metrics = components.build_metrics(cfg)

    def validate():  # each process its own shard, one all-reduce of the sums
        model.eval()
        sums = torch.zeros(2 + len(metrics), dtype=torch.float64)
        with torch.no_grad():
            for inputs, targets in val_loader:
                outputs = model(inputs)
                n = len(targets)
                sums += torch.stack([loss_fn(outputs, targets).double() * n,
                                     *(fn(outputs, targets).double().sum() for fn in metrics.values()),
                                     torch.tensor(float(n), dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(sums)
        model.train()
        return (sums[:-1] / sums[-1]).tolist()

    epochs = cfg.training.epochs
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total, int(cfg.scheduler.warmup_ratio * total)))
    clip = cfg.training.grad_clip
    model.train()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            clock.tick()
        if world > 1:
            dist.all_reduce(loss_sum)  # the epoch's train loss, as any loop that logs one does
        val = validate() if eval_every and (epoch + 1) % eval_every == 0 else []
        if rank == 0:
            print(f"epoch {epoch + 1} train_loss {float(loss_sum) / (len(loader) * world):.6g} val {val}", flush=True)
    if world > 1:
        dist.barrier()  # both processes done with DDP's collectives: tearing gloo down mid-call aborts (SIGABRT)
        dist.destroy_process_group()
    return {"world_size": world, "rank": rank, "steps_per_epoch": len(loader), "batch": batch}


def run_cr_accel(cfg, clock):
    from cr_accel.callbacks import Callback
    from cr_accel.trainer import Trainer

    class StepClock(Callback):
        def on_step_end(self, trainer, state):
            clock.tick()

    trainer = Trainer(cfg, callbacks=[StepClock()])
    status = trainer.train()
    acc = trainer.accelerator
    if status != "finished":
        raise SystemExit(f"cr_accel run ended {status}")
    return {"world_size": acc.num_processes, "rank": acc.process_index, "steps_per_epoch": trainer.steps_per_epoch,
            "batch": cfg.data.batch_size}


def run_validation(cfg, repeats):
    """Time Trainer.validate() (rank 0's clock; every rank takes part)."""
    from cr_accel.trainer import Trainer

    trainer = Trainer(cfg)
    acc = trainer.accelerator
    first = trainer.validate()  # untimed: first-call allocations
    times, cpu = [], []
    for _ in range(repeats):
        acc.wait_for_everyone()
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.validate()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    acc.wait_for_everyone()
    return {"world_size": acc.num_processes, "rank": acc.process_index, "times": times, "cpu": cpu, "result": first}


class Clock:
    """Wall time (perf_counter) and this process's CPU time (all its threads) after every optimizer step."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def tick(self):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


def child(argv):
    p = argparse.ArgumentParser()
    p.add_argument("program", choices=["H", "C", "V"])
    p.add_argument("result")
    p.add_argument("out_dir")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cfg = job_config(a.epochs, a.out_dir, a.num_val, a.eval_every, a.set)
    clock = Clock()
    if a.program == "H":
        info = run_hand_written(cfg, clock, a.eval_every)
    elif a.program == "C":
        info = run_cr_accel(cfg, clock)
    else:
        info = run_validation(cfg, a.repeats)
    info["threads"] = torch.get_num_threads()
    result = Path(a.result) if info["rank"] == 0 else Path(f"{a.result}.rank{info['rank']}")
    result.write_text(json.dumps({**info, "stamps": clock.wall, "cpu_stamps": clock.cpu}))


# ---------------------------------------------------------------------------------------- the parent


def launch(program, world, workdir, *args):
    run_dir = Path(tempfile.mkdtemp(prefix=f"{program}{world}-", dir=workdir))
    result = run_dir / "result.json"
    script = [str(Path(__file__).resolve()), "--child", program, str(result), str(run_dir / "out"), *map(str, args)]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        from tests.runners import free_port

        accelerate = Path(sys.executable).parent / "accelerate"
        cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(world), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *script]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(BENCH_ENV)
    busy = []
    with open(run_dir / "console.txt", "w") as console:
        proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:  # how many other tasks want a CPU while the run goes on
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                busy.append(other_runnable(ours=world + 1))  # the children and this reader
    if proc.returncode != 0:
        raise SystemExit(f"{program} with {world} process(es) failed (exit {proc.returncode}):\n"
                         f"{(run_dir / 'console.txt').read_text()[-3000:]}")
    data = json.loads(result.read_text())
    if data["world_size"] != world or data["threads"] != 1:
        raise SystemExit(f"{program}: ran as {data['world_size']} process(es) with {data['threads']} threads")
    data["others_runnable"] = statistics.mean(busy) if busy else 0.0
    data["cpu_stamps_by_rank"] = [data["cpu_stamps"]] + [
        json.loads(Path(f"{result}.rank{r}").read_text())["cpu_stamps"] for r in range(1, world)]
    return data


def steady_samples_per_s(data):
    stamps = data["stamps"]
    start = WARMUP_EPOCHS * data["steps_per_epoch"] - 1  # the end of the warm-up epochs' last step
    steps = len(stamps) - 1 - start
    return steps * data["batch"] * data["world_size"] / (stamps[-1] - stamps[start])


def cpu_per_step(data):
    """CPU time per optimizer step over the steady-state window, averaged over the ranks (seconds)."""
    start = WARMUP_EPOCHS * data["steps_per_epoch"] - 1
    per_rank = [(c[-1] - c[start]) / (len(c) - 1 - start) for c in data["cpu_stamps_by_rank"]]
    return statistics.mean(per_rank)


def step_split(data):
    """(median step inside an epoch, median extra of the first step of an epoch: the epoch end's work), seconds."""
    stamps, spe = data["stamps"], data["steps_per_epoch"]
    start = WARMUP_EPOCHS * spe
    inside = [stamps[i] - stamps[i - 1] for i in range(start, len(stamps)) if i % spe]
    first = [stamps[i] - stamps[i - 1] for i in range(start, len(stamps)) if i % spe == 0]
    step = statistics.median(inside)
    return step, (statistics.median(first) - step) if first else 0.0


def other_runnable(ours):
    """Tasks in the run queue now (/proc/loadavg's 4th field) less `ours` (this reader is asleep)."""
    try:
        return max(0, int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - ours)
    except (OSError, IndexError, ValueError):
        return 0


def wait_for_quiet(max_wait):
    """Wait (up to `max_wait` seconds) until nothing else has wanted a CPU for about a second."""
    deadline = time.monotonic() + max_wait
    quiet = 0
    while time.monotonic() < deadline and quiet < 5:
        quiet = quiet + 1 if other_runnable(ours=1) == 0 else 0
        time.sleep(0.2)


def bench_training(args, workdir):
    rates = {(p, w): [] for w in args.worlds for p in "HC"}
    contention = args.contention
    splits = args.splits = {(p, w): [] for w in args.worlds for p in "HC"}
    cpus = args.cpus = {(p, w): [] for w in args.worlds for p in "HC"}
    for r in range(args.rounds):
        for world in args.worlds:
            for program in "HC":
                wait_for_quiet(args.wait_quiet)
                data = launch(program, world, workdir, "--epochs", args.epochs, "--eval-every", args.eval_every)
                rate = steady_samples_per_s(data)
                rates[program, world].append(rate)
                splits[program, world].append(step_split(data))
                contention.append(data["others_runnable"])
                cpu = cpu_per_step(data)
                cpus[program, world].append(cpu)
                step, extra = step_split(data)
                print(f"round {r + 1}/{args.rounds} {program} x{world}: {rate:7.1f} samples/s, median step "
                      f"{step * 1e3:.2f} ms, epoch end +{extra * 1e3:.2f} ms, CPU {cpu * 1e3:.2f} ms/step/rank "
                      f"(other runnable tasks {data['others_runnable']:.2f})", file=sys.stderr, flush=True)
    return rates


def spread(values, fmt="{:.3f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report_training(args, rates):
    lines = [
        f"Training throughput, default job, {args.epochs} epochs, {args.rounds} round(s) of H C per world size, "
        f"steady state after {WARMUP_EPOCHS} epochs, "
        + (f"validation every {args.eval_every} epoch(s) included" if args.eval_every else "training only"),
        "",
        "| processes | H samples/s | C samples/s | C/H (median, min-max over rounds) |",
        "|---|---|---|---|",
    ]
    for w in args.worlds:
        h, c = rates["H", w], rates["C", w]
        lines.append(f"| {w} | {spread(h, '{:.0f}')} | {spread(c, '{:.0f}')} | **{spread([b / a for a, b in zip(h, c)])}** |")
    lines += ["", "Where the time goes (medians over rounds): the median step inside an epoch, and what the first step "
                  "of an epoch takes beyond it (the previous epoch's end: reductions, logs, the loader's restart)",
              "and the CPU time per optimizer step of each process (all its threads; the mean over processes)", "",
              "| processes | program | median step | epoch-end extra | CPU per step and process | C/H CPU per step |",
              "|---|---|---|---|---|---|"]
    for w in args.worlds:
        for p in "HC":
            sp, cpu = args.splits[p, w], args.cpus[p, w]
            cpu_ratio = spread([c / h for h, c in zip(args.cpus["H", w], cpu)]) if p == "C" else ""
            lines.append(f"| {w} | {p} | {statistics.median(s for s, _ in sp) * 1e3:.2f} ms "
                         f"| {statistics.median(e for _, e in sp) * 1e3:+.2f} ms "
                         f"| {statistics.median(cpu) * 1e3:.2f} ms | {cpu_ratio} |")
    if 1 in args.worlds and 2 in args.worlds:
        lines += ["", "| program | 2-process / 1-process samples/s (per round) |", "|---|---|"]
        for p in "HC":
            lines.append(f"| {PROGRAMS[p]} | {spread([b / a for a, b in zip(rates[p, 1], rates[p, 2])])} |")
    return lines


def bench_validation(args, workdir):
    times = {(n, w): [] for w in args.worlds for n in VAL_SIZES}
    cpu_times = args.cpu_times = {(n, w): [] for w in args.worlds for n in VAL_SIZES}
    for r in range(args.rounds):
        for world in args.worlds:
            for n in VAL_SIZES:
                wait_for_quiet(args.wait_quiet)
                data = launch("V", world, workdir, "--num-val", n, "--repeats", args.repeats)
                args.contention.append(data["others_runnable"])
                times[n, world].append(statistics.median(data["times"]))
                cpu_times[n, world].append(statistics.median(data["cpu"]))
                print(f"round {r + 1}/{args.rounds} validate {n} samples x{world}: "
                      f"{statistics.median(data['times']) * 1e3:.1f} ms (load {os.getloadavg()[0]:.2f})",
                      file=sys.stderr, flush=True)
    return times


def report_validation(args, times):
    small, big = VAL_SIZES
    lines = [
        f"Validation, default job, {args.rounds} round(s), median of {args.repeats} `Trainer.validate()` calls per run",
        "",
        f"| processes | validate {small} | validate {big} | added by {big - small} more samples |",
        "|---|---|---|---|",
    ]
    added = {}
    for w in args.worlds:
        added[w] = [b - a for a, b in zip(times[small, w], times[big, w])]
        lines.append(f"| {w} | {spread(times[small, w], '{:.3f}')} s | {spread(times[big, w], '{:.3f}')} s "
                     f"| {spread(added[w], '{:.3f}')} s |")
    if 1 in added and 2 in added:
        lines += ["", f"Speed-up of the added validation time, 1 -> 2 processes (per round): "
                      f"**{spread([a / b for a, b in zip(added[1], added[2])])}x**"]
        c = args.cpu_times
        cpu_added = {w: [b - a for a, b in zip(c[small, w], c[big, w])] for w in (1, 2)}
        lines += ["", f"CPU time of rank 0 for the {big - small} added samples: 1 process "
                      f"{spread(cpu_added[1], '{:.3f}')} s, 2 processes {spread(cpu_added[2], '{:.3f}')} s per process "
                      f"(ratio {spread([a / b for a, b in zip(cpu_added[1], cpu_added[2])])}x: the work each process "
                      "does; the wall-time speed-up reaches it only when nothing else wants the 2 cores)"]
    return lines


def header(args):
    import accelerate
    import torch

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return [f"machine: {cpu}, {os.cpu_count()} cores | python {platform.python_version()} | torch {torch.__version__}, "
            f"accelerate {accelerate.__version__} | load average at the start {os.getloadavg()[0]:.2f}", ""]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        sys.path.insert(0, str(HERE))
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=60, help="epochs per training run (default 60)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validate every N epochs inside the timed window, both programs (the default job: 1); "
                        "default 0: training only")
    p.add_argument("--repeats", type=int, default=5, help="validate() calls per validation run (default 5)")
    p.add_argument("--worlds", default="1,2", help="process counts (default 1,2)")
    p.add_argument("--validation", action="store_true", help="measure validation instead of training")
    p.add_argument("--quick", action="store_true", help="2 rounds of short runs (a few minutes)")
    p.add_argument("--wait-quiet", type=float, default=5.0, metavar="S",
                   help="before each run, wait up to S seconds for other tasks to leave the CPUs (default 5)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    args.worlds = [int(w) for w in args.worlds.split(",")]
    args.contention = []
    if args.quick:
        args.rounds, args.epochs, args.repeats = 2, 20, 3
    if args.epochs <= WARMUP_EPOCHS + 1:
        p.error(f"--epochs must be > {WARMUP_EPOCHS + 1}")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="cr_accel_ddp_") as workdir:
        if args.validation:
            raw = bench_validation(args, workdir)
            lines = report_validation(args, raw)
        else:
            raw = bench_training(args, workdir)
            lines = report_training(args, raw)
    lines += ["", f"other runnable tasks during the runs (mean of samples every 0.25 s, per run): "
                  f"median {statistics.median(args.contention):.2f}, max {max(args.contention):.2f}"]
    print("\n".join(header(args) + lines))
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}x{k[1]}": v for k, v in raw.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
