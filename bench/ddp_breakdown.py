"""Where cr_accel's 2-process step time goes, against a hand-written DDP loop, in one pair of processes.

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no bench/ddp_breakdown.py [--repeats 8] [--epochs 5] [--variants a,b]

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
  trainer-novote  the Trainer's epoch with Preemption.agreed replaced by `return False`
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

    def trainer_novote():
        saved = trainer.preemption.agreed
        trainer.preemption.agreed = lambda: False
        try:
            trainer._run_epoch()
        finally:
            trainer.preemption.agreed = saved

    return {
        "trainer": trainer_epoch,
        "hand": hand(),
        "hand+vote": hand(after_step=vote.agreed),
        "hand+vote/sep": hand(after_step=vote_sep.agreed),
        "hand+loader": hand(loader=trainer.train_loader),
        "hand+stats": hand(stats=True),
        "trainer-novote": trainer_novote,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5, help="epochs per timed block (default 5)")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
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
               str(args.epochs)] + (["--variants", args.variants] if args.variants else [])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        return subprocess.run(cmd, env={**env, **BENCH_ENV}, cwd=ROOT).returncode

    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="cr_accel_ddp_breakdown_") as tmp:
        trainer = build(tmp)
        table = variants(trainer)
        names = args.variants.split(",") if args.variants else list(table)
        times = {n: [] for n in names}
        for name in names:  # warm-up, untimed
            table[name]()
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                dist.barrier()
                started = time.perf_counter()
                for _ in range(args.epochs):
                    table[name]()
                dist.barrier()
                times[name].append((time.perf_counter() - started) / args.epochs)
        if trainer.accelerator.is_main_process:
            base = statistics.median(times["hand"]) if "hand" in times else None
            print(f"\n{args.repeats} repeats of {args.epochs} epochs ({trainer.steps_per_epoch} steps each), "
                  f"{trainer.accelerator.num_processes} processes; median per epoch (min-max)")
            # The fastest block is the least disturbed by other load on a shared machine: compare those too.
            best = min(times["hand"]) if "hand" in times else None
            print("| variant | per epoch, median (min-max) | per step | / hand (medians) | / hand (fastest blocks) |\n"
                  "|---|---|---|---|---|")
            for name in names:
                t = times[name]
                ratio = f"{statistics.median(t) / base:.3f}x" if base else ""
                ratio_min = f"{min(t) / best:.3f}x" if best else ""
                print(f"| {name} | {statistics.median(t) * 1e3:.1f} ms ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}) "
                      f"| {statistics.median(t) / trainer.steps_per_epoch * 1e3:.2f} ms | {ratio} | {ratio_min} |")
        trainer.preemption.uninstall()
        trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
