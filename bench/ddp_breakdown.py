"""Where cr_accel's 2-process step time goes, against a hand-written DDP loop, in one pair of processes.

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no bench/ddp_breakdown.py [--repeats 30] [--epochs 1] [--variants a,b]

(`python bench/ddp_breakdown.py --launch [...]` runs that command with the benchmark's environment.)

One Trainer is built for the default job (configs/default.yaml); every variant then trains the SAME prepared
DDP model and optimizer for `--epochs` epochs (4 optimizer steps each with 2 processes), in a rotating order,
`--repeats` times; rank 0 prints the median time per epoch of each variant and its ratio to `hand`:

  trainer      Trainer._run_epoch as train() calls it (loader, per-step stats, the preemption vote, epoch log, CSV)
  hand         the hand-written loop: DistributedSampler loader, forward, backward, clip, step, schedule, zero_grad,
               one all-reduce of the epoch's loss
  hand+vote    hand, plus Preemption.agreed() after each optimizer step (as the Trainer calls it)
  hand+vote/sep  hand, plus the vote on a separate gloo group (dist.new_group(backend="gloo"))
  hand+loader  hand, iterating the Trainer's prepared (accelerate) loader instead of its own
  hand+stats   hand, plus StepStats.add_loss / add_grad_norm per step and epoch_totals() per epoch
  hand+vote/every4  hand, plus the vote every 4th optimizer step
  trainer-novote  the Trainer's epoch with Preemption.agreed replaced by `return False`
  trainer-vote/sep, trainer-vote/every4  the Trainer's epoch with the vote on a separate group / every 4th step
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build(out_dir):
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from cr_accel.config import load_config
    from cr_accel.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "default.yaml", [
        "training.epochs=1000000", "training.eval_every=1000000", "checkpoint.save_every=1000000",
        f"output.dir={out_dir}", "dashboard.enabled=false"])
    return Trainer(cfg)


def variants(trainer):
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from cr_accel.preemption import Preemption

    acc = trainer.accelerator
    model, optimizer, schedule, loss_fn = trainer.model, trainer.step_optimizer, trainer.schedule, trainer.loss_fn
    params, clip = trainer.params, trainer.max_grad_norm
    world, rank = acc.num_processes, acc.process_index
    sampler = DistributedSampler(trainer.data.train, num_replicas=world, rank=rank, shuffle=True, seed=trainer.cfg.seed)
    plain_loader = DataLoader(trainer.data.train, batch_size=trainer.cfg.data.batch_size, sampler=sampler)
    vote = trainer.preemption
    vote_sep = Preemption(acc)
    vote_sep._group = dist.new_group(backend="gloo")
    epoch_counter = [0]

    def hand(loader=None, after_step=None, stats=False):
        def run():
            e = epoch_counter[0] = epoch_counter[0] + 1
            if loader is None:
                sampler.set_epoch(e)
                batches = plain_loader
            else:
                loader.set_epoch(e)
                batches = loader
            loss_sum = torch.zeros((), dtype=torch.float64)
            if stats:
                trainer.stats.reset_epoch()
            for inputs, targets in batches:
                loss = loss_fn(model(inputs), targets)
                if stats:
                    trainer.stats.add_loss(loss, 0)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                if stats:
                    trainer.stats.add_grad_norm(norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                if after_step is not None:
                    after_step()
            if stats:
                trainer.stats.epoch_totals()
            else:
                dist.all_reduce(loss_sum)
        return run

    def trainer_epoch():
        trainer._run_epoch()

    def trainer_with_vote(agreed):
        def run():
            saved = trainer.preemption.agreed
            trainer.preemption.agreed = agreed
            try:
                trainer._run_epoch()
            finally:
                trainer.preemption.agreed = saved
        return run

    def every(k, vote):
        count = [0]

        def agreed():
            count[0] += 1
            return vote.agreed() if count[0] % k == 0 else False
        return agreed

    return {
        "trainer": trainer_epoch,
        "hand": hand(),
        "hand+vote": hand(after_step=vote.agreed),
        "hand+vote/sep": hand(after_step=vote_sep.agreed),
        "hand+loader": hand(loader=trainer.train_loader),
        "hand+stats": hand(stats=True),
        "hand+vote/every4": hand(after_step=every(4, vote)),
        "trainer-novote": trainer_with_vote(lambda: False),
        "trainer-vote/sep": trainer_with_vote(vote_sep.agreed),
        "trainer-vote/every4": trainer_with_vote(every(4, vote)),
    }


def paired(t, base):
    r = sorted(a / b for a, b in zip(t, base))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return f"{statistics.median(r):.3f}x ({q[0]:.3f}-{q[2]:.3f})"


def report(times, cpu, args, steps_per_epoch):
    """Per variant: median block time per epoch, and the median over repeats of its ratio to `hand` in the same
    repeat (neighbouring blocks share the machine's load at that moment, so the paired ratio is the steadier)."""
    lines = [f"\n{args.repeats} repeats of {args.epochs} epoch(s) ({steps_per_epoch} steps each) per variant, "
             "rotating order; 2 processes", "",
             "| variant | per epoch, median (min-max) | per step | / hand, paired (median, quartiles) "
             "| rank 0 CPU per step | CPU / hand, paired |",
             "|---|---|---|---|---|---|"]
    for name, t in times.items():
        ratio = paired(t, times["hand"]) if "hand" in times else ""
        cpu_ratio = paired(cpu[name], cpu["hand"]) if "hand" in times else ""
        lines.append(f"| {name} | {statistics.median(t) * 1e3:.1f} ms ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}) "
                     f"| {statistics.median(t) / steps_per_epoch * 1e3:.2f} ms | {ratio} "
                     f"| {statistics.median(cpu[name]) / steps_per_epoch * 1e3:.2f} ms | {cpu_ratio} |")
    return "\n".join(lines)


def time_collectives(trainer, n=2000):
    """Wall and CPU time per call, with nothing else running in the processes: the vote (same group as DDP,
    separate group), a blocking 1-element all-reduce and accelerate's gather of one value (StepStats' NaN check)."""
    import torch
    import torch.distributed as dist

    from cr_accel.preemption import Preemption

    acc = trainer.accelerator
    same = Preemption(acc)
    same._group = None
    sep = Preemption(acc)
    sep._group = dist.new_group(backend="gloo")
    one = torch.zeros(1)
    calls = {
        "Preemption.agreed(), DDP's group": same.agreed,
        "Preemption.agreed(), own gloo group": sep.agreed,
        "blocking all_reduce of 1 value": lambda: dist.all_reduce(one),
        "accelerator.gather of 1 value": lambda: acc.gather(one),
    }
    rows = []
    for name, call in calls.items():
        for _ in range(50):
            call()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            call()
        rows.append((name, (time.perf_counter() - t0) / n, (time.process_time() - c0) / n))
        dist.barrier()
    for p in (same, sep):
        p.uninstall()
    return "\n".join(["", f"{n} calls each, nothing else running; rank 0", "",
                      "| call | wall per call | CPU per call (all threads) |", "|---|---|---|"]
                     + [f"| {name} | {w * 1e6:.0f} us | {c * 1e6:.0f} us |" for name, w, c in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed block (default 1)")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--collectives", action="store_true", help="time single collectives instead (see time_collectives)")
    p.add_argument("--launch", action="store_true", help="start the 2-process run with the benchmark's environment")
    args, rest = p.parse_known_args(argv)
    if args.launch:
        sys.path.insert(0, str(HERE))
        from ddp_throughput import BENCH_ENV

        sys.path.insert(0, str(ROOT))
        from tests.runners import free_port

        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(Path(__file__).resolve()), "--repeats", str(args.repeats), "--epochs",
               str(args.epochs)] + (["--variants", args.variants] if args.variants else []) \
            + (["--collectives"] if args.collectives else [])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        return subprocess.run(cmd, env={**env, **BENCH_ENV}, cwd=ROOT).returncode

    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="cr_accel_ddp_breakdown_") as tmp:
        trainer = build(tmp)
        if args.collectives:
            text = time_collectives(trainer)
            if trainer.accelerator.is_main_process:
                print(text)
            trainer.accelerator.end_training()
            return 0
        table = variants(trainer)
        names = args.variants.split(",") if args.variants else list(table)
        times = {n: [] for n in names}
        cpu = {n: [] for n in names}  # this process's CPU time (all its threads): steadier under outside load
        for name in names:  # warm-up, untimed
            table[name]()
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                dist.barrier()
                started, cpu_started = time.perf_counter(), time.process_time()
                for _ in range(args.epochs):
                    table[name]()
                cpu[name].append((time.process_time() - cpu_started) / args.epochs)
                dist.barrier()
                times[name].append((time.perf_counter() - started) / args.epochs)
        if trainer.accelerator.is_main_process:
            print(report(times, cpu, args, trainer.steps_per_epoch))
        trainer.preemption.uninstall()
        trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
