"""GPU checks that CI (CPU only) cannot run: precision choice, fp16 with its GradScaler, peak memory, exact
resume on CUDA. Run on a machine with a CUDA GPU from the repository root:

    python scripts/gpu_check.py [OUT_DIR]

Prints one line per check (PASS/FAIL) and exits non-zero if any failed.
"""

import csv
import json
import subprocess
import sys
import tempfile
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
    (base / "gpu_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
