"""How fast the dashboard page loads and redraws with many long runs: 10 runs x 100,000 step records each.

    python bench/dashboard_page.py [--runs 10] [--steps 100000] [--epochs 300] [--reps 5]

A temporary store is filled through RunStore (the server's own writes: step records in batches of 5,000, so
the bucket summaries are built as a live run builds them): `--runs` runs, each with `--steps` step records
(one every step: loss, lr, grad_norm, loss/mse, loss/l1) and `--epochs` epochs (the epoch metrics the trainer
writes, at their step), every run with its own learning rate in its config. Then `cr-accel dashboard` serves it
from a subprocess (`python -m cr_accel.dashboard.server`), and the page is opened in headless Chromium through
playwright (Debian's /usr/bin/chromium, or $CR_ACCEL_CHROMIUM; never `playwright install`). Per repetition, in a
fresh browser context (nothing cached):
    (a) load: from the start of the navigation (performance.now() is 0 there) until every chart of the newest
        run has been drawn by uPlot (its draw hook has fired for the current drawing);
    (b) overlay: from the click on "all" (overlay every run) until every chart shows all runs and is drawn:
        the runs' records fetched from the server, downsampled there, and drawn;
    (c) smoothing: from moving the smoothing slider (3 moves a repetition) until every chart is redrawn.
The page polls its own condition every macrotask (a MessageChannel tick, not animation frames), so the times
have sub-millisecond resolution. Medians and min-max over the repetitions are printed as a markdown table,
with the machine line. See docs/benchmarks.md, "Dashboard page".
"""

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cr_accel.dashboard.store import RunStore  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STEP_BATCH = 5000

# In the page: a tick that is a macrotask but not an animation frame, and "every chart drawn for the current
# drawing, with these runs".
PAGE_HELPERS = """
window.__tick = () => new Promise(r => { const c = new MessageChannel(); c.port1.onmessage = () => r();
                                         c.port2.postMessage(0); });
window.__drawn = (runs) => { const root = document.getElementById('charts');
  if (!root || root.dataset.runs !== runs) return false;
  const charts = [...root.querySelectorAll('.chart')];
  return charts.length > 0 && charts.every(c => c.dataset.drawn === root.dataset.render); };
window.__until = async (runs) => { while (!window.__drawn(runs)) await window.__tick(); return performance.now(); };
window.__loaded = null;
(async () => { while (!window.__drawn || !document.getElementById('charts')) await window.__tick();
               const newest = () => (document.getElementById('detail') || {dataset: {}}).dataset.runId;
               while (!newest() || !window.__drawn(newest())) await window.__tick();
               window.__loaded = performance.now(); })();
"""


def fill(store, runs, steps, epochs):
    """The runs, oldest first (the page opens the newest)."""
    ids = []
    for r in range(runs):
        run_id = f"bench-{r:02d}"
        lr = 1e-3 * (1 + r)
        config = {"model": {"name": "conv_autoencoder", "depth": 3}, "optimizer": {"name": "adamw", "lr": lr},
                  "training": {"epochs": epochs, "log_every": 1}, "seed": 42}
        store.start_run(run_id, f"lr {lr:.0e}", config=config, world_size=1, device="cpu")
        rng = random.Random(r)
        per_epoch = max(1, steps // epochs)
        for start in range(1, steps + 1, STEP_BATCH):
            batch = []
            for step in range(start, min(steps, start + STEP_BATCH - 1) + 1):
                base = math.exp(-step / (steps / 4)) + 0.05
                noise = 1 + 0.3 * rng.random()
                batch.append((step, 1 + (step - 1) // per_epoch, {
                    "loss": base * noise, "lr": lr * 0.5 * (1 + math.cos(math.pi * step / steps)),
                    "grad_norm": 0.5 + rng.random() * (5 if rng.random() < 0.001 else 1),
                    "loss/mse": base * noise * 0.8, "loss/l1": base * noise * 0.2}))
            store.add_steps(run_id, batch)
        rows = []
        for epoch in range(1, epochs + 1):
            step = epoch * per_epoch
            train = math.exp(-step / (steps / 4)) + 0.05
            rows.append((epoch, step, {
                "train_loss": train, "val_loss": train * 1.1, "best_val": train * 1.1, "lr": lr,
                "grad_norm": 0.8, "samples_per_s": 9000 + rng.random() * 500, "epoch_time": 1.0 + rng.random() * 0.1,
                "val_psnr": 10 * math.log10(1 / train), "val_ssim": 1 - train / 2,
                "train_loss/mse": train * 0.8, "val_loss/mse": train * 0.9}))
        store.put_epochs(run_id, rows)
        ids.append(run_id)
        time.sleep(0.01)  # distinct created_at: "newest" is well defined
    return ids


def start_server(db):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "cr_accel.dashboard.server", "--port", "0", "--db", str(db)],
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the dashboard did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].split()[0]


def one_repetition(browser, url, all_runs, slider_values):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = context.new_page()
    page.add_init_script(PAGE_HELPERS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_function("() => window.__loaded !== null", timeout=60_000)
    load = page.evaluate("() => window.__loaded")
    overlay = page.evaluate("""async (runs) => { const t0 = performance.now();
                                 document.getElementById('overlay-all').click();
                                 return (await window.__until(runs)) - t0; }""", ",".join(all_runs))
    shown = page.get_attribute("#charts", "data-runs")
    smoothing = []
    for value in slider_values:
        smoothing.append(page.evaluate("""async ([value, runs]) => { const s = document.getElementById('smoothing');
                                            const before = document.getElementById('charts').dataset.render;
                                            const t0 = performance.now();
                                            s.value = String(value); s.dispatchEvent(new Event('input'));
                                            while (document.getElementById('charts').dataset.render === before)
                                              await window.__tick();
                                            return (await window.__until(runs)) - t0; }""",
                                       [value, shown]))
    charts = page.locator("#charts .chart").count()
    points = page.evaluate("""() => [...document.querySelectorAll('#charts .chart')]
                                     .map(c => JSON.parse(c.dataset.series).reduce((n, s) => n + s.points, 0))
                                     .reduce((a, b) => a + b, 0)""")
    context.close()
    if errors:
        raise SystemExit(f"the page reported errors: {errors}")
    return load, overlay, smoothing, charts, points


def machine_line(browser_version, db):
    load = os.getloadavg()
    mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return (f"Machine: {os.cpu_count()} CPUs ({model}), {int(mem['MemTotal'].split()[0]) // 2**20} GB RAM, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Python {platform.python_version()}, "
            f"Chromium {browser_version}; database {db.stat().st_size / 2**20:.0f} MB")


def server_read_ms(url, run_id, reps=5):
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        with urllib.request.urlopen(f"{url}/api/runs/{run_id}/steps?max_points=1500", timeout=60) as answer:
            body = json.loads(answer.read())
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), body


def spread(values):
    return f"{statistics.median(values):.0f} ms [{min(values):.0f}–{max(values):.0f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--steps", type=int, default=100_000, help="step records per run")
    p.add_argument("--epochs", type=int, default=300, help="epochs per run")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("CR_ACCEL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    tmp = Path(tempfile.mkdtemp(prefix="cr_accel-bench-dashboard-"))
    try:
        db = tmp / "runs.sqlite"
        store = RunStore(db)
        started = time.perf_counter()
        ids = fill(store, args.runs, args.steps, args.epochs)
        store.close()
        fill_s = time.perf_counter() - started
        proc, url = start_server(db)
        try:
            read_ms, body = server_read_ms(url, ids[-1])
            series_points = {k: len(v["step"]) for k, v in body["series"].items()}
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
                results = [one_repetition(browser, url, list(reversed(ids)), [0.6 + 0.1 * i for i in range(3)])
                           for _ in range(args.reps)]
                line = machine_line(browser.version, db)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loads, overlays = [r[0] for r in results], [r[1] for r in results]
    smooths = [t for r in results for t in r[2]]
    print(line)
    print(f"Store: {args.runs} runs x {args.steps:,} step records (5 series) and {args.epochs} epochs (11 metrics), "
          f"filled in {fill_s:.1f} s. One run's GET /steps?max_points=1500 from the server: {read_ms:.0f} ms "
          f"(median of 5), points per series {series_points}. Charts with all runs: {results[0][3]}, "
          f"holding {results[0][4]:,} points.\n")
    print(f"| {args.reps} repetitions, fresh browser context each | median [min–max] |")
    print("|---|---|")
    print(f"| (a) navigation until the newest run's charts are drawn | {spread(loads)} |")
    print(f"| (b) overlay all {args.runs} runs until redrawn | {spread(overlays)} |")
    print(f"| (c) smoothing slider moved until redrawn ({len(smooths)} moves) | {spread(smooths)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
