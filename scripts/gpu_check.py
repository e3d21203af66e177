"""GPU checks that CI (CPU only) cannot run: precision choice, fp16 with its GradScaler, peak memory, exact
resume on CUDA; FSDP2 (sharded and full state dict), DeepSpeed ZeRO-2 (if it installs) and
`training.compile: true`, each killed with kill -9 after a checkpoint and resumed from `latest`; pinned batches
with 2 DataLoader workers (non-blocking copies, an exact mid-epoch resume); bf16
samples/s of the default job against a hand-written loop. Run on a machine with a CUDA GPU from the
repository root (about 5 minutes on one H100/H200):

    python scripts/gpu_check.py [OUT_DIR]

Prints one line per check (PASS/FAIL/SKIP) and exits non-zero if any failed.
"""

import csv
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_train=128", "data.num_val=32", "training.log_every=1000"]


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def train(out, *overrides, script="train.py", extra=()):
    return run(script, "--config", "configs/default.yaml", f"output.dir={out}", *SMALL, *overrides, *extra)


def accelerate_launch(accelerate_config, *args):
    """`accelerate launch --config_file C --num_processes 1 tests/probe_train.py ...`, as a Popen."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(accelerate_config), "--num_processes", "1",
           "tests/probe_train.py", "--config", "configs/default.yaml", *SMALL, *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def killed_and_resumed(base, name, accelerate_config, *overrides, timeout=240):
    """Uninterrupted run vs a run killed with SIGKILL a few steps after its step-8 checkpoint was published,
    resumed from `latest`. Returns (identical weights, detail)."""
    opts = ["training.epochs=3", "training.deterministic=true", "checkpoint.save_every_steps=8",
            "training.log_every=1", *overrides]
    straight = accelerate_launch(accelerate_config, f"output.dir={base / name / 'straight'}", *opts,
                                 "--probe", base / name / "straight.json")
    out, _ = straight.communicate(timeout=timeout)
    if straight.returncode != 0:
        return False, f"uninterrupted run failed: {out[-2500:]}"
    run = f"output.dir={base / name / 'run'}"
    first = accelerate_launch(accelerate_config, run, *opts, "--probe", base / name / "first.json")
    seen, deadline = [], time.time() + timeout
    for line in first.stdout:
        seen.append(line)
        if " step 11/" in line or time.time() > deadline:
            break
    published = (base / name / "run/checkpoints/step_00000008/manifest.json").exists()
    first.send_signal(signal.SIGKILL)
    for child in _children(first.pid):  # the launcher's worker too: kill -9 reaches no handler
        subprocess.run(["kill", "-9", str(child)])
    first.wait(timeout=60)
    resumed = accelerate_launch(accelerate_config, run, *opts, "--probe", base / name / "resumed.json",
                                "--resume_from_checkpoint", "latest")
    out2, _ = resumed.communicate(timeout=timeout)
    if resumed.returncode != 0:
        return False, f"published={published}; resume failed: {out2[-2500:]}"
    a, b = load_file(base / name / "straight.safetensors"), load_file(base / name / "resumed.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a.keys() == b.keys() else None
    log = (base / name / "run/train.log").read_text()
    saves = "background" if "started in the background" in log else "synchronous"
    return diff == 0.0, f"max |diff| {diff}; step-8 checkpoint published before the kill: {published}; saves {saves}"


def _children(pid):
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    kids = [int(p) for p in result.stdout.split()]
    return kids + [g for k in kids for g in _children(k)]


def fsdp_config(base, state_dict_type):
    text = (ROOT / "accelerate_configs/fsdp.yaml").read_text()
    path = base / f"fsdp_{state_dict_type}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("fsdp_state_dict_type: SHARDED_STATE_DICT", f"fsdp_state_dict_type: {state_dict_type}"))
    return path


def deepspeed_installs():
    try:
        import deepspeed  # noqa: F401

        return True
    except ImportError:
        rc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "deepspeed"], capture_output=True).returncode
        return rc == 0


def hand_written_samples_per_s(epochs=3):
    """The default job's model and data in a plain bf16 loop: AdamW, clipping, cosine schedule."""
    from torch.utils.data import DataLoader

    from cr_accel import components
    from cr_accel.config import load_config

    cfg = load_config(ROOT / "configs/default.yaml", ["training.epochs=3"])
    torch.manual_seed(cfg.seed)
    data = components.build_datasets(cfg)
    model = components.build_model(cfg).cuda()
    loss_fn = components.build_loss(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    loader = DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=True)
    rates = []
    for _ in range(epochs):
        torch.cuda.synchronize()
        started, samples = time.perf_counter(), 0
        for inputs, targets in loader:
            inputs, targets = inputs.cuda(non_blocking=True), targets.cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(inputs).float(), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples += len(inputs)
        torch.cuda.synchronize()
        rates.append(samples / (time.perf_counter() - started))
    return max(rates[1:])  # the first epoch pays for CUDA start-up


def cluster_checks(base, check):
    for state_dict_type in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        ok, detail = killed_and_resumed(base, f"fsdp2_{state_dict_type}", fsdp_config(base, state_dict_type))
        check(f"FSDP2 1 process {state_dict_type}: kill -9, resume latest, identical", ok, detail)
    if deepspeed_installs():
        ok, detail = killed_and_resumed(base, "deepspeed_zero2", ROOT / "accelerate_configs/deepspeed.yaml")
        check("DeepSpeed ZeRO-2 1 process: kill -9, resume latest, identical", ok, detail)
    else:
        print("SKIP DeepSpeed ZeRO-2: `pip install deepspeed` failed on this machine", flush=True)
    ok, detail = killed_and_resumed(base, "compile", ROOT / "accelerate_configs/single_gpu.yaml", "training.compile=true")
    check("training.compile=true: async save, kill -9, resume latest, identical", ok, detail)
    rc, log = train(base / "bf16_speed", "training.epochs=3", "training.mixed_precision=bf16", "data.num_train=256")
    if rc == 0:
        rows = list(csv.DictReader(open(base / "bf16_speed/metrics.csv")))
        ours = max(float(r["samples_per_s"]) for r in rows[1:])
        theirs = hand_written_samples_per_s()
        check("bf16 default job: cr_accel samples/s vs a hand-written loop", ours >= 0.9 * theirs,
              f"{ours:.0f} vs {theirs:.0f} samples/s ({ours / theirs:.2f}x; best epoch after the first)")
    else:
        check("bf16 default job runs", False, log[-2000:])


PINNED_PROBE = """
import json, sys
from cr_accel.config import load_config
from cr_accel.trainer import Trainer
trainer = Trainer(load_config("configs/default.yaml", sys.argv[1:]))
loader = trainer.train_loader
inputs, _ = next(iter(loader))
print("PINNED", json.dumps({"device": str(inputs.device), "pin_memory": loader.pin_memory,
                            "non_blocking": loader._non_blocking, "num_workers": loader.num_workers}))
"""


def pinned_workers_checks(base, check):
    """data.pin_memory null is on for CUDA and the prepared loader copies without blocking; with 2 persistent
    workers and pinned batches a mid-epoch resume is still exact."""
    workers = ["data.num_workers=2", "data.persistent_workers=true", "dashboard.enabled=false"]
    rc, log = run("-c", PINNED_PROBE, f"output.dir={base / 'pinned'}", *SMALL, *workers)
    seen = json.loads(log.split("PINNED ", 1)[1].splitlines()[0]) if "PINNED " in log else {}
    check("pinned batches copied without blocking", rc == 0 and seen.get("device", "").startswith("cuda")
          and seen.get("pin_memory") is True and seen.get("non_blocking") is True, f"rc={rc} {seen}"
          + ("" if rc == 0 else log[-2000:]))
    opts = ["training.epochs=3", "training.deterministic=true", "model.dropout=0.1", *workers]
    rcs, logs = [], ""
    for name, extra in (("straight", []), ("first", ["--stop-at-step", 6]),
                        ("resumed", ["--resume_from_checkpoint", "latest"])):
        run_dir = base / ("workers_straight" if name == "straight" else "workers_resumed")
        rc, log = train(run_dir, *opts, script="tests/probe_train.py", extra=["--probe", base / f"workers_{name}.json",
                                                                               *extra])
        rcs.append(rc)
        logs += log
    same = False
    if rcs == [0, 75, 0]:
        a, b = load_file(base / "workers_straight.safetensors"), load_file(base / "workers_resumed.safetensors")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check("exact resume on CUDA with 2 persistent workers, pinned", same,
          f"rc={rcs}" + ("" if rcs == [0, 75, 0] else logs[-3000:]))


def main():
    base = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    results = {}

    def check(name, ok, detail=""):
        results[name] = bool(ok)
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    assert torch.cuda.is_available(), "no CUDA GPU here"
    rc, log = train(base / "auto", "training.epochs=3")
    env = json.loads((base / "auto/environment.json").read_text()) if rc == 0 else {}
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    check("auto precision", rc == 0 and env.get("mixed_precision") == expected and env["device"].startswith("cuda"),
          f"rc={rc} env={ {k: env.get(k) for k in ('mixed_precision', 'device', 'gpu')} }" + ("" if rc == 0 else log[-2000:]))
    if rc == 0:
        rows = list(csv.DictReader(open(base / "auto/metrics.csv")))
        check("peak memory column", all(float(r["peak_mem_mb"]) > 0 for r in rows), rows[-1].get("peak_mem_mb"))
        check("auto learns", float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]),
              f"{rows[0]['val_loss']} -> {rows[-1]['val_loss']}")

    rc, log = train(base / "fp16", "training.epochs=3", "training.mixed_precision=fp16")
    env = json.loads((base / "fp16/environment.json").read_text()) if rc == 0 else {}
    check("fp16 runs with a GradScaler", rc == 0 and env.get("mixed_precision") == "fp16"
          and (base / "fp16/checkpoints/last/scaler.pt").exists(), "" if rc == 0 else log[-2000:])

    for precision in ("fp16", "bf16"):
        opts = [f"training.mixed_precision={precision}", "training.epochs=4", "training.deterministic=true",
                "model.dropout=0.1"]
        rc1, log1 = train(base / f"straight_{precision}", *opts, script="tests/probe_train.py",
                          extra=["--probe", base / f"straight_{precision}.json"])
        rc2, log2 = train(base / f"resumed_{precision}", *opts, script="tests/probe_train.py",
                          extra=["--probe", base / f"first_{precision}.json", "--stop-at-step", 10])
        rc3, log3 = train(base / f"resumed_{precision}", *opts, script="tests/probe_train.py",
                          extra=["--probe", base / f"resumed_{precision}.json", "--resume_from_checkpoint", "latest"])
        same = False
        if (rc1, rc2, rc3) == (0, 75, 0):
            a = load_file(base / f"straight_{precision}.safetensors")
            b = load_file(base / f"resumed_{precision}.safetensors")
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        check(f"exact resume on CUDA ({precision}, deterministic)", same,
              f"rc={rc1},{rc2},{rc3}" + ("" if (rc1, rc2, rc3) == (0, 75, 0) else (log1 + log2 + log3)[-3000:]))
    pinned_workers_checks(base, check)
    cluster_checks(base, check)
    (base / "gpu_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
