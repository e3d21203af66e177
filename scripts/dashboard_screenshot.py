"""Take docs/dashboard.png: a real dashboard server with demo runs, opened in headless Chromium.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png]

Needs Debian's chromium (`apt-get install -y chromium`) and `pip install playwright` (not `playwright
install`). The runs are sent through the real DashboardTracker, as the trainer sends them: a step record
every 5 optimizer steps and the epochs.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from cr_accel.dashboard.images import samples_png
from cr_accel.dashboard.server import make_server
from cr_accel.dashboard.tracker import DashboardTracker

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Every chart drawn by uPlot for the current drawing, with these runs (comma-separated).
DRAWN = """runs => { const root = document.getElementById('charts'), charts = [...root.querySelectorAll('.chart')];
                     return root.dataset.runs === runs && charts.length > 0
                            && charts.every(c => c.dataset.drawn === root.dataset.render); }"""
CONFIG = {
    "model": {"name": "conv_denoiser", "channels": 32, "depth": 4},
    "loss": {"name": "mse"},
    "data": {"name": "synthetic_blobs", "batch_size": 64, "num_workers": 2},
    "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.01},
    "scheduler": {"name": "cosine", "warmup_steps": 200},
    "training": {"epochs": 30, "mixed_precision": "bf16", "grad_clip": 1.0},
    "checkpoint": {"monitor": "val_loss", "mode": "min", "keep_last_n": 3},
    "seed": 42,
}


def blobs(rng, n=4, size=16):
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(4, size - 4, 2).tolist() + [rng.uniform(2, 4)]
        out.append(np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r)))
    return np.stack(out)


def send_run(url, name, epochs, lr, status, rng, noise_level, with_samples=False):
    tracker = DashboardTracker(url, name, start_info={"world_size": 2, "device": "cuda:0"})
    tracker.store_init_configuration({**CONFIG, "optimizer": {**CONFIG["optimizer"], "lr": lr}})
    targets = blobs(rng)
    best = math.inf
    for epoch in range(1, epochs + 1):
        progress = epoch / 30
        train = 0.02 + 0.5 * math.exp(-epoch / (6 if lr < 2e-3 else 4)) + rng.normal(0, 0.004)
        val = train * 1.08 + 0.004 + rng.normal(0, 0.004) + (0.0015 * max(0, epoch - 18) if lr > 2e-3 else 0)
        best = min(best, val)
        metrics = {
            "epoch": epoch, "step": 235 * epoch, "train_loss": train, "val_loss": val, "best_val": best,
            "lr": lr * 0.5 * (1 + math.cos(math.pi * progress)),
            "grad_norm": 0.3 + 2.5 * math.exp(-epoch / 5) + abs(rng.normal(0, 0.05)),
            "samples_per_s": 15200 + rng.normal(0, 250), "epoch_time": 1.0 + rng.normal(0, 0.02),
            "val_psnr": 10 * math.log10(1 / val), "val_mae": math.sqrt(val) * 0.6,
        }
        for step in range(235 * (epoch - 1) + 5, 235 * epoch + 1, 5):
            t = step / 235
            loss = 0.02 + 0.5 * math.exp(-t / (6 if lr < 2e-3 else 4)) * (1 + rng.normal(0, 0.08))
            tracker.log_step(step, epoch, {"loss": loss, "loss/mse": loss * 0.7, "loss/grad": loss * 0.3,
                                           "lr": lr * 0.5 * (1 + math.cos(math.pi * t / 30)),
                                           "grad_norm": 0.3 + 2.5 * math.exp(-t / 5) + abs(rng.normal(0, 0.15))})
        if with_samples:
            noisy = targets + rng.normal(0, noise_level, targets.shape)
            denoised = targets + rng.normal(0, noise_level * math.exp(-epoch / 5), targets.shape)
            metrics["samples_png"] = samples_png(noisy, denoised, targets, scale=5)
        tracker.log(metrics, step=epoch)
    if status != "running":
        tracker.set_status(status)
        tracker.finish()
    else:
        tracker.flush(5)
    return tracker


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"))
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("CR_ACCEL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    rng = np.random.default_rng(4)
    with tempfile.TemporaryDirectory() as tmp:
        server = make_server("127.0.0.1", 0, Path(tmp) / "runs.sqlite")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            send_run(server.url, "denoiser-lr3e-3", 30, 3e-3, "finished", rng, 0.3)
            send_run(server.url, "denoiser-fp32-baseline", 9, 1e-3, "preempted", rng, 0.3)
            send_run(server.url, "denoiser-no-warmup", 3, 1e-2, "failed", rng, 0.3)
            live = send_run(server.url, "denoiser-lr1e-3", 17, 1e-3, "running", rng, 0.3, with_samples=True)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 1320})
                page.goto(f"{server.url}/#run={live.run_id}")
                page.wait_for_function(DRAWN, arg=live.run_id)
                other = page.locator("tr.run", has_text="denoiser-lr3e-3").get_attribute("data-run-id")
                page.check(f'input[data-overlay="{other}"]')
                page.wait_for_function(DRAWN, arg=f"{live.run_id},{other}")
                page.wait_for_function("() => document.getElementById('samples').naturalWidth > 0")
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            server.shutdown()
            server.server_close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
