"""Records leaving the run for the dashboard, with real training (1 and 2 processes); trackers in the config.
(TensorBoard is read back in tests/test_records.py.)"""

import contextlib
import csv
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cr_accel.config import config_from_dict
from cr_accel.dashboard.server import make_server
from cr_accel.errors import ConfigError
from cr_accel.trainer import Trainer
from tests.runners import ROOT, free_port
from tests.test_dashboard import broken_server

CHECKED = ("train_loss", "val_loss", "val_psnr", "lr", "grad_norm", "best_val")


def tiny_config(out, epochs=3, **sections):
    raw = {
        "model": {"name": "conv_autoencoder", "base_channels": 4, "depth": 1},
        "data": {"name": "synthetic_cr", "batch_size": 8, "num_train": 32, "num_val": 8},
        "training": {"epochs": epochs, "metrics": ["psnr"]},
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def csv_rows(out):
    with open(Path(out) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


class CountingServer:
    """The real dashboard server, counting the write requests it answered."""

    def __init__(self, db, port):
        self.server = make_server("127.0.0.1", port, db)
        self.posts = []
        handler = self.server.RequestHandlerClass
        posts = self.posts

        class Counting(handler):
            def do_POST(self):
                super().do_POST()
                posts.append(self.path)

        self.server.RequestHandlerClass = Counting
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["refused", "hang", "error500"])
def test_training_is_not_held_up_by_a_broken_dashboard(tmp_path, mode, monkeypatch):
    """Handing an epoch to the dashboard takes no time whatever the dashboard does, and the end waits at
    most the tracker's bounded flush; the run itself finishes normally."""
    from cr_accel.dashboard.tracker import DashboardTracker

    spent = []
    original = DashboardTracker.log

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        original(self, *args, **kwargs)
        spent.append(time.perf_counter() - started)

    monkeypatch.setattr(DashboardTracker, "log", timed)
    with contextlib.ExitStack() as stack:
        url = f"http://127.0.0.1:{free_port()}" if mode == "refused" else stack.enter_context(broken_server(mode))
        trainer = Trainer(tiny_config(tmp_path / "run", epochs=6, dashboard={"enabled": True, "url": url}))
        started = time.perf_counter()
        status = trainer.train()
        total = time.perf_counter() - started
    rows = csv_rows(tmp_path / "run")
    assert status == "finished" and len(rows) == 6
    assert len(spent) == 6
    assert max(spent) < 0.025, spent  # a send in the loop would take the 2 s timeout (hang) or more
    # Training time plus at most the 3 s flush at the end (and a margin for start-up and the pictures).
    assert total < sum(float(r["epoch_time"]) for r in rows) + 3.0 + 2.0
    # The tracker's notices go into train.log (never the console): one line when nothing answers; a server that
    # answers errors also gets the count of what it did not take at the end.
    notices = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "cr_accel dashboard:" in line]
    assert f"cannot deliver to {url}" in notices[0], notices
    assert len(notices) == (2 if mode == "error500" else 1), notices


def test_two_processes_report_once_per_epoch_to_a_dashboard_started_late(tmp_path):
    """A real 2-process run; the dashboard comes up only after training began: the early epochs arrive too."""
    port = free_port()
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "model": {"name": "conv_autoencoder", "base_channels": 4, "depth": 1},
        "data": {"name": "synthetic_cr", "batch_size": 8, "num_train": 96, "num_val": 13},
        "training": {"epochs": 8, "metrics": ["psnr"], "log_every": 1000},
        "output": {"dir": str(out)},
        "dashboard": {"enabled": True, "url": f"http://127.0.0.1:{port}"},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(ROOT / "train.py"), "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = None
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.csv").exists() and len(csv_rows(out)) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "training never logged 2 epochs"
            time.sleep(0.1)
        server = CountingServer(tmp_path / "runs.sqlite", port)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        run_id = (out / "dashboard_run_id").read_text().strip()
        run = get_json(f"{server.url}/api/runs/{run_id}")["run"]
        epochs = get_json(f"{server.url}/api/runs/{run_id}/epochs")["epochs"]
        posts = list(server.posts)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server:
            server.close()
    assert (run["status"], run["world_size"]) == ("finished", 2)
    assert posts.count("/api/runs") == 1, posts  # one start message
    assert posts.count(f"/api/runs/{run_id}/end") == 1
    assert posts.count(f"/api/runs/{run_id}/epochs") == 8  # exactly one per epoch, not one per process
    rows = csv_rows(out)
    assert [e["epoch"] for e in epochs] == list(range(1, 9)) == [int(r["epoch"]) for r in rows]
    for sent, row in zip(epochs, rows):
        for key in CHECKED:
            assert sent["metrics"][key] == pytest.approx(float(row[key]), rel=1e-9), key
    # The one notice while the dashboard was not there yet: in train.log, never on the console.
    log = (out / "train.log").read_text()
    assert log.count("cannot deliver") == 1 and "cannot deliver" not in err


def test_unknown_or_missing_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown tracker `tensorbord`; did you mean `tensorboard`\?"):
        tiny_config(tmp_path, output={"trackers": ["tensorbord"]})


def test_histogram_of_counts_like_torch_histogram_and_leaves_out_non_finite_values():
    import torch

    from cr_accel.histogram import histogram_of

    torch.manual_seed(0)
    values = torch.randn(5000) * 3
    with_bad = torch.cat([values, torch.tensor([float("nan"), float("inf"), -float("inf")])])
    for tensor in (values, with_bad):
        h = histogram_of(tensor, bins=64)
        finite = values.double()
        counts, edges = torch.histogram(finite, bins=64, range=(float(finite.min()), float(finite.max())))
        assert h["bucket_counts"] == counts.tolist()
        assert h["bucket_limits"] == pytest.approx(edges[1:].tolist(), rel=1e-12)
        assert (h["min"], h["max"], h["num"]) == (float(finite.min()), float(finite.max()), 5000)
        assert h["sum"] == pytest.approx(float(finite.sum()), rel=1e-12)
        assert h["sum_squares"] == pytest.approx(float((finite**2).sum()), rel=1e-12)
    constant = histogram_of(torch.full((10,), 2.0), bins=4)
    assert (constant["min"], constant["max"], sum(constant["bucket_counts"])) == (2.0, 2.0, 10)
    assert histogram_of(torch.tensor([float("nan"), float("inf")])) is None
    assert histogram_of(torch.zeros(0)) is None


def test_tensorboard_records_are_checksummed_in_c_with_tensorboards_own_values(tmp_path):
    """The `tensorboard` extra's google-crc32c replaces TensorBoard's pure-Python record checksum: the same values,
    and the event file a run writes is read back by TensorBoard's reader (which checks every record's checksum)."""
    import random

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboards
    from tensorboard.summary.writer import record_writer

    from cr_accel.sinks.trackers import masked_crc32c

    rng = random.Random(0)
    for data in (b"", b"\x00" * 8, b"cr_accel", bytes(rng.randrange(256) for _ in range(1500))):
        assert masked_crc32c(data) == tensorboards(data)
    out = tmp_path / "run"
    Trainer(tiny_config(out, epochs=1, output={"trackers": ["tensorboard"]})).train()
    assert record_writer.masked_crc32c is masked_crc32c
    events = EventAccumulator(str(out / "trackers" / "cr_accel"))
    events.Reload()
    assert events.Scalars("epoch/train_loss")


def test_the_event_file_taken_over_from_tensorboards_writer_holds_the_same_events_and_its_thread_is_gone(tmp_path):
    """sinks/event_file.take_over: a SummaryWriter's events go to the same file, written without TensorBoard's
    writing thread, and read back (checksums checked) equal to what TensorBoard's own writer writes -- a resumed
    run's purge marker included."""
    import threading

    import torch
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    from cr_accel.histogram import histogram_of
    from cr_accel.sinks.event_file import take_over
    from cr_accel.sinks.trackers import masked_crc32c

    def write(writer):
        for step in (5, 6, 7):
            writer.add_scalar("train/loss", 1.0 / step, global_step=step, walltime=100.0 + step)
        histogram = histogram_of(torch.arange(100.0))
        writer.add_histogram_raw("weights/w", **histogram, global_step=7, walltime=200.0)
        writer.close()

    def tensorboard_threads():
        return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())

    theirs = SummaryWriter(str(tmp_path / "theirs"), purge_step=5)
    write(theirs)
    ours = SummaryWriter(str(tmp_path / "ours"), purge_step=5)
    threads = tensorboard_threads()
    event_file = take_over(ours, masked_crc32c)
    assert event_file is not None and tensorboard_threads() == threads - 1
    write(ours)
    files = {name: list((tmp_path / name).glob("events.out.tfevents.*")) for name in ("theirs", "ours")}
    assert len(files["theirs"]) == len(files["ours"]) == 1 and files["ours"][0] == event_file.path
    events = {name: list(EventFileLoader(str(paths[0])).Load()) for name, paths in files.items()}
    for event in events["theirs"][:3] + events["ours"][:3]:  # the file's version, the purge marker: stamped
        event.wall_time = 0.0  # with the time they were written
    assert len(events["ours"]) == 3 + 3 + 1 and events["ours"] == events["theirs"]
    assert events["ours"][2].session_log.status == events["ours"][2].session_log.START  # the purge marker
