"""The live dashboard: the tracker never slows training, the server refuses bad input, the page draws runs.

The browser test needs Debian's chromium and the `playwright` package (see BROWSER_HINT); without them it
fails, on purpose: a dashboard whose page was never opened is not tested.
"""

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cr_accel.dashboard.images import samples_png
from cr_accel.dashboard.server import make_server
from cr_accel.dashboard.store import RunStore
from cr_accel.dashboard.tracker import DashboardTracker, remember_run_id, run_id_for

LOGGER = "cr_accel.dashboard"
FAST_RETRY = dict(retry_initial=0.05, retry_max=0.2)
BROWSER_HINT = ("the dashboard's browser test needs Debian's chromium and the playwright package: "
                "`apt-get install -y chromium` and `.venv/bin/pip install playwright` "
                "(do not run `playwright install`: it downloads a browser; set CR_ACCEL_CHROMIUM to use "
                "another chromium binary)")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# ---------------------------------------------------------------- helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(db, port=0, token=None, **options):
    server = make_server("127.0.0.1", port, db, token=token, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def broken_server(mode):
    """A listening socket that answers like a broken dashboard: hang (never answers), 500, or garbage."""
    replies = {
        "hang": None,
        "error500": b"HTTP/1.0 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 30\r\n\r\n{\"ok\": false, \"error\": \"boom\"}",
        "garbage": b"\x16\x03\x01\x00 this is not HTTP at all \xff\xfe\r\n\r\n",
    }
    reply = replies[mode]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held, stop = [], threading.Event()

    def serve():
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            if reply is None:
                held.append(conn)  # accepted, never answered
                continue
            conn.settimeout(0.2)
            with contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(reply)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        listener.close()


def http(url, method="GET", path="/", body=None, headers=None):
    """(status, headers, parsed JSON or raw bytes) with a real HTTP client."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json"):
        data = json.loads(data)
    return resp.status, resp, data


def raw_http(url, request_bytes, half_close=False):
    """Send exact bytes; (status, JSON body). For requests a normal client refuses to make."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as s:
        s.sendall(request_bytes)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def dashboard_warnings(caplog):
    return [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.WARNING]


def decode_png(data):
    """(width, height, PNG color type, pixel rows (H, W, channels)) of a PNG, read by Pillow."""
    import io

    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    picture = Image.open(io.BytesIO(data))
    picture.load()  # checks every chunk's CRC and decompresses the pixels
    color = {"L": 0, "RGB": 2}[picture.mode]
    pixels = np.asarray(picture).reshape(picture.height, picture.width, -1)
    return picture.width, picture.height, color, pixels


def fresh_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------- the tracker

@pytest.mark.parametrize("mode", ["refused", "hang", "error500", "garbage"])
def test_tracker_never_blocks_training_when_the_dashboard_is_broken(mode, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with contextlib.ExitStack() as stack:
        url = f"http://127.0.0.1:{free_port()}" if mode == "refused" else stack.enter_context(broken_server(mode))
        tracker = DashboardTracker(url, "broken", timeout=0.5, finish_timeout=1.0, **FAST_RETRY)
        tracker.start()
        tracker.store_init_configuration({"optimizer": {"lr": 0.1}})
        durations = []
        for epoch in range(1, 51):
            started = time.perf_counter()
            tracker.log({"epoch": epoch, "train_loss": 1.0 / epoch, "lr": torch.tensor(0.1)}, step=epoch)
            durations.append(time.perf_counter() - started)
            time.sleep(0.002)  # an epoch takes a while: let the sender try and fail meanwhile
        tracker.set_status("failed")
        started = time.perf_counter()
        tracker.finish()
        finish_s = time.perf_counter() - started
    # A blocking send would take the 0.5 s timeout (hang) per call; the bound leaves room for a busy machine.
    assert max(durations) < 0.025, f"slowest log() took {max(durations) * 1e3:.1f} ms"
    assert sum(durations) < 0.1
    assert finish_s < 1.0 + 0.3, f"finish() took {finish_s:.2f} s with a 1 s bound"
    warnings = dashboard_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert url in warnings[0].getMessage() and "cannot deliver" in warnings[0].getMessage()
    assert tracker.sent == 0 and tracker.dropped == 52  # start + 50 epochs + end, all left out at the end


def test_tracker_keeps_epochs_while_the_dashboard_is_down_and_delivers_them_in_order(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = free_port()
    tracker = DashboardTracker(f"http://127.0.0.1:{port}", "late-server", run_id="late-1", timeout=0.5,
                               start_info={"world_size": 2, "device": "cpu"}, **FAST_RETRY)
    tracker.start()
    tracker.store_init_configuration({"training": {"epochs": 8}})
    for epoch in range(1, 6):
        tracker.log({"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch}, step=epoch)
    deadline = time.monotonic() + 5
    while not dashboard_warnings(caplog) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dashboard_warnings(caplog), "the tracker never noticed the dashboard was down"
    assert tracker.pending == 6  # start + 5 epochs, all kept
    with running_server(tmp_path / "runs.sqlite", port=port) as server:
        for epoch in range(6, 9):
            tracker.log({"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch}, step=epoch)
        tracker.set_status("finished")
        # flush(), not finish() at once: finish() does not wait for a dashboard that never answered yet
        assert tracker.flush(10)
        tracker.finish()
        assert tracker.pending == 0 and tracker.sent == 1 + 8 + 1 and tracker.dropped == 0
        _, _, run = http(server.url, path="/api/runs/late-1")
        _, _, epochs = http(server.url, path="/api/runs/late-1/epochs")
    run, rows = run["run"], epochs["epochs"]
    assert run["status"] == "finished" and run["config"] == {"training": {"epochs": 8}}
    assert (run["world_size"], run["device"]) == (2, "cpu")
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert [r["step"] for r in rows] == [10 * e for e in range(1, 9)]
    received = [r["received_at"] for r in rows]
    assert received == sorted(received), "epochs were not delivered in order"
    messages = [r.getMessage() for r in dashboard_warnings(caplog)]
    assert len(messages) == 2 and "cannot deliver" in messages[0] and "reconnected" in messages[1], messages


def test_tracker_backs_off_while_the_dashboard_is_down_however_many_records_arrive():
    """New records do not cut the wait between tries short: otherwise each record brings a connection attempt
    (and its Python work, which takes the GIL from the training thread) while nothing listens."""
    tracker = DashboardTracker(f"http://127.0.0.1:{free_port()}", "backoff", run_id="backoff-1", timeout=0.5,
                               finish_timeout=0, retry_initial=0.4, retry_max=0.4)
    tracker.start()
    started = time.monotonic()
    for step in range(1, 101):  # 100 records over ~1 s
        tracker.log_step(step, 1, {"loss": 1.0})
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    tries, pending = tracker._tries, tracker.pending
    tracker.finish()
    # One try at the start, then one per 0.4 s wait.
    assert 1 <= tries <= 2 + elapsed / 0.4, (tries, elapsed)
    assert pending == 101  # start + 100 step records, all kept


def test_tracker_queue_is_bounded_and_never_drops_the_start_message(tmp_path):
    port = free_port()
    tracker = DashboardTracker(f"http://127.0.0.1:{port}", "bounded", run_id="bounded-1", max_pending=5,
                               timeout=0.5, finish_timeout=10, **FAST_RETRY)
    tracker.start()
    for epoch in range(1, 21):
        tracker.log({"epoch": epoch, "train_loss": float(epoch)}, step=epoch)
    assert tracker.pending <= 5
    with running_server(tmp_path / "runs.sqlite", port=port) as server:
        tracker.flush(10)  # finish() alone would not wait: the dashboard never answered during the run
        tracker.finish()
        _, _, run = http(server.url, path="/api/runs/bounded-1")
        _, _, epochs = http(server.url, path="/api/runs/bounded-1/epochs")
    got = [r["epoch"] for r in epochs["epochs"]]
    assert run["run"]["status"] == "finished"  # the start (and the end) made it
    assert got and got == list(range(got[0], 21)), f"not the newest epochs without holes: {got}"
    assert tracker.dropped == 20 - len(got)


def test_tracker_re_sends_the_start_when_the_dashboard_lost_the_run(tmp_path):
    port = free_port()
    with running_server(tmp_path / "old.sqlite", port=port):
        tracker = DashboardTracker(f"http://127.0.0.1:{port}", "lost", run_id="lost-1", timeout=0.5, **FAST_RETRY)
        tracker.store_init_configuration({"seed": 7})
        tracker.log({"epoch": 1, "train_loss": 1.0})
        assert tracker.flush(5)
    with running_server(tmp_path / "new.sqlite", port=port) as server:  # a fresh database: the run is unknown
        tracker.log({"epoch": 2, "train_loss": 0.5})
        tracker.finish()
        _, _, run = http(server.url, path="/api/runs/lost-1")
        _, _, epochs = http(server.url, path="/api/runs/lost-1/epochs")
    assert run["run"]["config"] == {"seed": 7} and run["run"]["status"] == "finished"
    assert [r["epoch"] for r in epochs["epochs"]] == [2]


def test_tracker_works_through_accelerate_and_sends_samples(tmp_path):
    from accelerate import Accelerator

    fresh_state()
    x = torch.rand(3, 8, 8)
    png = samples_png(x, x * 0.5, x)
    with running_server(tmp_path / "runs.sqlite", token="tok") as server:
        tracker = DashboardTracker(server.url, "via-accelerate", token="tok", run_id="acc-1")
        accelerator = Accelerator(cpu=True, log_with=[tracker])
        accelerator.init_trackers("cr_accel", config={"model": {"name": "mlp"}, "seed": 42})
        assert accelerator.get_tracker("cr_accel_dashboard") is tracker
        accelerator.log({"epoch": 1, "step": 4, "train_loss": 0.5, "val_loss": float("nan"), "val_acc": 0.9,
                         "note": "text is left out", "samples_png": png}, step=1)
        tracker.set_status("stopped_early")
        accelerator.end_training()
        _, _, run = http(server.url, path="/api/runs/acc-1")
        _, _, epochs = http(server.url, path="/api/runs/acc-1/epochs")
        status, resp, image = http(server.url, path="/api/runs/acc-1/samples.png")
    fresh_state()
    assert run["run"]["status"] == "stopped_early"
    assert run["run"]["config"] == {"model": {"name": "mlp"}, "seed": 42}
    assert epochs["epochs"][0]["metrics"] == {"train_loss": 0.5, "val_loss": None, "val_acc": 0.9}
    assert status == 200 and resp.getheader("Content-Type") == "image/png" and image == png
    assert run["run"]["samples_epoch"] == 1


def test_tracker_methods_never_raise(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    tracker = DashboardTracker(f"http://127.0.0.1:{free_port()}", "odd values", finish_timeout=0.2, **FAST_RETRY)
    tracker.store_init_configuration({"path": Path("/tmp"), "nested": {"t": (1, 2)}, "bad": float("inf")})
    tracker.log({"epoch": 0, "loss": 1.0})  # epochs are 1-based: left out with a warning
    tracker.log({"loss": object(), "nested": {"a": 1}, "none": None, "flag": True, "arr": np.float32(2)})
    tracker.log(None)  # not even a dict: swallowed
    tracker.set_status("exploded")  # not a status: ignored with a warning
    tracker.finish()
    tracker.finish()
    tracker.log({"epoch": 9, "loss": 1.0})  # after finish: ignored
    text = " | ".join(r.getMessage() for r in dashboard_warnings(caplog))
    assert "1-based" in text and "exploded" in text and "AttributeError" in text
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        DashboardTracker("localhost:8765", "x")
    with pytest.raises(ValueError, match="run_id"):
        DashboardTracker("http://127.0.0.1:1", "x", run_id="no spaces")


def test_a_resumed_run_reports_to_the_same_dashboard_run(tmp_path):
    out = tmp_path / "run"
    with running_server(tmp_path / "runs.sqlite") as server:
        first = DashboardTracker(server.url, "resumable", run_id=run_id_for(out, "resumable"))
        remember_run_id(out, first.run_id)
        first.set_start_info(world_size=1, epochs_done=0)
        for epoch in (1, 2, 3, 4):
            first.log({"epoch": epoch, "train_loss": 1.0})
        first.set_status("preempted")
        first.finish()
        # the requeued job resumes from the checkpoint after epoch 2: epochs 3 and 4 are trained again
        again = DashboardTracker(server.url, "resumable", run_id=run_id_for(out, "resumable"))
        again.set_start_info(world_size=1, epochs_done=2)
        again.start()
        again.log({"epoch": 3, "train_loss": 0.5})
        again.finish()
        runs = http(server.url, path="/api/runs")[2]["runs"]
        rows = http(server.url, path=f"/api/runs/{again.run_id}/epochs")[2]["epochs"]
    assert again.run_id == first.run_id and [(r["run_id"], r["status"]) for r in runs] == [(first.run_id, "finished")]
    assert [(r["epoch"], r["metrics"]["train_loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    with pytest.raises(ValueError, match="unknown start field"):
        again.set_start_info(gpu="A100")


def test_run_id_for_keeps_one_id_per_output_dir(tmp_path):
    first = run_id_for(tmp_path / "run", "my run!")
    assert not (tmp_path / "run").exists()  # nothing written before the run has really started
    remember_run_id(tmp_path / "run", first)
    assert first.startswith("my-run-") and run_id_for(tmp_path / "run", "other") == first
    assert run_id_for(tmp_path / "run2", "my run!") != first


@contextlib.contextmanager
def counting_server(db, **options):
    """running_server that counts the records of every POST .../steps it answered (`step_posts`), and answers
    a start message only once `go` is set."""
    with running_server(db, **options) as server:
        handler, posts, go = server.RequestHandlerClass, [], threading.Event()

        class Counting(handler):
            def _start_run(self, body):
                go.wait(10)
                super()._start_run(body)

            def _add_steps(self, body, run_id):
                super()._add_steps(body, run_id)
                posts.append(len(body["steps"]))

        server.RequestHandlerClass = Counting
        server.step_posts, server.go = posts, go
        yield server


def test_tracker_sends_step_records_in_batches(tmp_path):
    with counting_server(tmp_path / "runs.sqlite") as server:
        tracker = DashboardTracker(server.url, "steps", run_id="steps-1", max_step_batch=500)
        tracker.start()
        for step in range(1, 1201):  # queued while the server holds the start message: they leave in batches
            tracker.log_step(step, 1 + step // 400, {"loss": 1.0 / step, "lr": np.float32(0.5), "loss/mse": 2.0,
                                                     "nan": float("nan"), "note": "text is left out",
                                                     "n" * 300: 1.0})  # a name the server refuses: left out
        tracker.log({"epoch": 1, "step": 1200, "train_loss": 0.5})
        tracker.log_step(0, 1, {"loss": 1.0})  # not a step: left out with a warning, never raised
        server.go.set()
        assert tracker.flush(10)
        tracker.finish()
        answer = http(server.url, path="/api/runs/steps-1/steps?max_points=5000")[2]
        posts = list(server.step_posts)
    assert (answer["total"], answer["first_step"], answer["last_step"], answer["downsampled"]) == (1200, 1, 1200, False)
    assert answer["series"]["loss"]["step"] == list(range(1, 1201))
    assert answer["series"]["loss"]["value"] == [1.0 / s for s in range(1, 1201)]
    assert set(answer["series"]) == {"loss", "lr", "loss/mse"}  # NaN is null (no point), text is left out
    assert posts == [500, 500, 200], posts  # every record once, in order, at most 500 per request
    assert tracker.sent == 1 + 1200 + 1 + 1 and tracker.dropped == 0


def test_tracker_report_gets_the_notices_nothing_is_printed_and_finish_does_not_wait(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    lines = []
    tracker = DashboardTracker(f"http://127.0.0.1:{free_port()}", "reported", finish_timeout=30, report=lines.append,
                               **FAST_RETRY)
    tracker.start()
    for step in range(1, 6):
        tracker.log_step(step, 1, {"loss": 1.0})
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    tracker.finish()
    assert time.monotonic() - started < 5, "finish() waited for a dashboard that never answered"
    # One notice for a dashboard that never answered; the count of what it missed is in `dropped`.
    assert len(lines) == 1 and "cannot deliver" in lines[0] and "connection refused" in lines[0], lines
    assert tracker.dropped == 7  # start, 5 records, end
    assert not [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.INFO]
    out, err = capfd.readouterr()
    assert out == err == ""


# ---------------------------------------------------------------- the samples picture

def test_samples_png_is_a_valid_grid_with_clipped_values():
    n, h, w, scale = 2, 3, 5, 4
    inputs = torch.full((n, 1, h, w), 2.0)  # clipped to white
    outputs = np.full((n, h, w), -1.0)  # clipped to black
    targets = [[[0.5] * w] * h] * n
    width, height, color, pixels = decode_png(samples_png(inputs, outputs, targets, scale=scale))
    assert (width, height, color) == (3 * w * scale + 4, n * h * scale + n + 1, 2)
    cell = lambda row, col: pixels[1 + row * (h * scale + 1) + 2, 1 + col * (w * scale + 1) + 2]  # noqa: E731
    assert list(cell(0, 0)) == [255] * 3 and list(cell(1, 1)) == [0] * 3 and list(cell(1, 2)) == [128] * 3
    with pytest.raises(ValueError, match="as many outputs and targets"):
        samples_png(inputs, outputs[:1], targets)


def test_samples_png_shrinks_to_stay_small():
    big = np.random.default_rng(0).random((8, 64, 64))
    width, height, _, _ = decode_png(samples_png(big, big, big, scale=8, max_pixels=300_000))
    assert width * height <= 300_000 and width > 3 * 64


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("dash") / "runs.sqlite") as srv:
        status, _, _ = http(srv.url, "POST", "/api/runs", {"run_id": "known", "name": "known run"})
        assert status == 201
        yield srv


def _post(path, body, ctype="application/json", length=None, extra=b""):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    length = len(data) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
    if length != "omit":
        head += f"Content-Length: {length}\r\n"
    return head.encode() + extra + b"\r\n" + data


EPOCH = "/api/runs/known/epochs"
STEPS = "/api/runs/known/steps"
BAD_REQUESTS = {
    "malformed JSON": (_post("/api/runs", b'{"run_id": '), 400, "not valid JSON"),
    "not an object": (_post("/api/runs", [1, 2]), 400, "must be a JSON object"),
    "not UTF-8": (_post("/api/runs", b'{"name": "\xff"}'), 400, "not UTF-8"),
    "deeply nested": (_post("/api/runs", b"[" * 100000 + b"]" * 100000), 400, "not valid JSON"),
    "missing fields": (_post("/api/runs", {}), 422, "`run_id` is required"),
    "name not a string": (_post("/api/runs", {"run_id": "a", "name": 5}), 422, "`name` must be"),
    "bad run id": (_post("/api/runs", {"run_id": "../etc", "name": "x"}), 422, "`run_id` must be"),
    "unknown field": (_post("/api/runs", {"run_id": "a", "name": "x", "lr": 1}), 422, "unknown field(s) `lr`"),
    "world_size not int": (_post("/api/runs", {"run_id": "a", "name": "x", "world_size": "2"}), 422, "world_size"),
    "epoch zero": (_post(EPOCH, {"epoch": 0, "metrics": {}}), 422, "`epoch` must be an integer from 1"),
    "epoch a string": (_post(EPOCH, {"epoch": "3", "metrics": {}}), 422, "`epoch` must be"),
    "epoch fractional": (_post(EPOCH, {"epoch": 1.5, "metrics": {}}), 422, "`epoch` must be"),
    "epoch a boolean": (_post(EPOCH, {"epoch": True, "metrics": {}}), 422, "`epoch` must be"),
    "epoch huge": (_post(EPOCH, {"epoch": 10**30, "metrics": {}}), 422, "`epoch` must be"),
    "metric a string": (_post(EPOCH, {"epoch": 1, "metrics": {"train_loss": "low"}}), 422, "metric `train_loss`"),
    "metrics a list": (_post(EPOCH, {"epoch": 1, "metrics": [1]}), 422, "`metrics` must be an object"),
    "metrics missing": (_post(EPOCH, {"epoch": 1}), 422, "`metrics` is required"),
    "samples not base64": (_post(EPOCH, {"epoch": 1, "metrics": {}, "samples_png": "%%"}), 422, "base64"),
    "samples not a PNG": (_post(EPOCH, {"epoch": 1, "metrics": {},
                                        "samples_png": base64.b64encode(b"GIF89a").decode()}), 422, "PNG"),
    "bad end status": (_post("/api/runs/known/end", {"status": "exploded"}), 422, "one of finished"),
    "steps not a list": (_post(STEPS, {"steps": {"step": 1}}), 422, "`steps` must be an array of 1 to 5000"),
    "steps empty": (_post(STEPS, {"steps": []}), 422, "got 0 records"),
    "steps too many": (_post(STEPS, {"steps": [{"step": 1, "epoch": 1, "metrics": {}}] * 5001}), 422,
                       "got 5001 records"),
    "step zero": (_post(STEPS, {"steps": [{"step": 1, "epoch": 1, "metrics": {}}, {"step": 0, "epoch": 1,
                                                                                   "metrics": {}}]}),
                  422, "steps[1]: `step` must be an integer from 1"),
    "step epoch missing": (_post(STEPS, {"steps": [{"step": 3, "metrics": {}}]}), 422, "steps[0]: `epoch` must be"),
    "step metric a string": (_post(STEPS, {"steps": [{"step": 3, "epoch": 1, "metrics": {"loss": "low"}}]}), 422,
                             "steps[0]: metric `loss` must be a number"),
    "step unknown field": (_post(STEPS, {"steps": [{"step": 3, "epoch": 1, "metrics": {}, "loss": 1}]}), 422,
                           "steps[0]: unknown field(s) `loss`"),
    "steps of an unknown run": (_post("/api/runs/nobody/steps", {"steps": [{"step": 1, "epoch": 1, "metrics": {}}]}),
                                404, "unknown run `nobody`"),
    "bad max_points": (b"GET /api/runs/known/steps?max_points=2 HTTP/1.1\r\nHost: x\r\n\r\n", 400,
                       "`max_points` must be an integer from 4"),
    "bad after": (b"GET /api/runs/known/steps?after=-1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "`after`"),
    "delete an unknown run": (b"DELETE /api/runs/nobody HTTP/1.1\r\nHost: x\r\n\r\n", 404, "unknown run"),
    "unknown static file": (b"GET /static/server.py HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such file"),
    "unknown run": (_post("/api/runs/nobody/epochs", {"epoch": 1, "metrics": {}}), 404, "unknown run `nobody`"),
    "unknown path": (b"GET /api/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such path"),
    "wrong method": (b"PUT /api/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "PUT is not allowed"),
    "GET on a write path": (b"GET /api/runs/known/end HTTP/1.1\r\nHost: x\r\n\r\n", 405, "allowed: POST"),
    "bad query": (b"GET /api/runs/known/epochs?after=abc HTTP/1.1\r\nHost: x\r\n\r\n", 400, "`after`"),
    "no samples yet": (b"GET /api/runs/known/samples.png HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no samples"),
    "wrong content type": (_post("/api/runs", {"run_id": "a", "name": "x"}, ctype="text/plain"), 415,
                           "application/json"),
    "missing Content-Length": (_post("/api/runs", b"{}", length="omit"), 411, "Content-Length"),
    "invalid Content-Length": (_post("/api/runs", b"{}", length="abc"), 400, "invalid Content-Length"),
    "negative Content-Length": (_post("/api/runs", b"{}", length="-5"), 400, "invalid Content-Length"),
    "oversized body": (_post("/api/runs", b"{}", length=5 * 2**20), 413, "over the limit"),
    "chunked body": (_post("/api/runs", b"2\r\n{}\r\n0\r\n\r\n", length="omit",
                           extra=b"Transfer-Encoding: chunked\r\n"), 411, "chunked"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_server_answers_bad_requests_with_a_4xx_json_error(server, case):
    request, status, message = BAD_REQUESTS[case]
    got_status, body = raw_http(server.url, request)
    assert (got_status, body["ok"]) == (status, False), body
    assert message in body["error"]


def test_server_answers_a_body_shorter_than_its_content_length(server):
    status, body = raw_http(server.url, _post("/api/runs", b'{"a": 1}', length=100), half_close=True)
    assert status == 400 and "ended after 8 of 100 bytes" in body["error"]


def test_server_keeps_serving_after_bad_requests(server):
    for request, _, _ in BAD_REQUESTS.values():
        raw_http(server.url, request)
    status, _, body = http(server.url, "POST", EPOCH, {"epoch": 1, "step": 3, "metrics": {"train_loss": 0.25}})
    assert (status, body["ok"]) == (200, True)
    status, _, body = http(server.url, path="/api/runs/known/epochs")
    assert status == 200 and body["epochs"][0]["metrics"] == {"train_loss": 0.25}
    status, resp, page = http(server.url, path="/")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/html") and b'id="charts"' in page


def test_server_epochs_are_idempotent_and_a_resume_replaces_later_ones(tmp_path):
    with running_server(tmp_path / "runs.sqlite") as srv:
        assert http(srv.url, "POST", "/api/runs", {"run_id": "r", "name": "r"})[0] == 201
        assert http(srv.url, "POST", "/api/runs", {"run_id": "r", "name": "r"})[0] == 200  # re-sent start
        for epoch in (1, 2, 2, 3, 3, 3):  # retries after lost answers
            assert http(srv.url, "POST", "/api/runs/r/epochs", {"epoch": epoch, "metrics": {"x": epoch}})[0] == 200
        assert [r["epoch"] for r in http(srv.url, path="/api/runs/r/epochs")[2]["epochs"]] == [1, 2, 3]
        assert [r["epoch"] for r in http(srv.url, path="/api/runs/r/epochs?after=1")[2]["epochs"]] == [2, 3]
        # NaN and Infinity are not JSON, but Python clients send them: stored as null
        status, _, _ = http(srv.url, "POST", "/api/runs/r/epochs", b'{"epoch": 4, "metrics": {"x": NaN}}',
                            {"Content-Type": "application/json"})
        assert status == 200
        # a run resumed from the checkpoint after epoch 2 trains epoch 3 again
        assert http(srv.url, "POST", "/api/runs", {"run_id": "r", "name": "r", "epochs_done": 2})[0] == 200
        assert [r["epoch"] for r in http(srv.url, path="/api/runs/r/epochs")[2]["epochs"]] == [1, 2]


def test_server_steps_are_idempotent_and_a_resume_forgets_later_ones(tmp_path):
    def records(steps, loss):
        return {"steps": [{"step": s, "epoch": 1 + s // 10, "metrics": {"loss": loss, "lr": 0.1}} for s in steps]}

    with running_server(tmp_path / "runs.sqlite") as srv:
        assert http(srv.url, "POST", "/api/runs", {"run_id": "r", "name": "r"})[0] == 201
        assert http(srv.url, "POST", "/api/runs/r/steps", records(range(1, 31), 1.0))[2]["steps"] == 30
        assert http(srv.url, "POST", "/api/runs/r/steps", records(range(21, 31), 1.0))[0] == 200  # a retry
        assert http(srv.url, "POST", "/api/runs/r/steps", records([25], 0.5))[0] == 200  # a re-send replaces
        got = http(srv.url, path="/api/runs/r/steps")[2]
        assert (got["total"], got["downsampled"], got["max_points"]) == (30, False, 2000)
        assert got["series"]["loss"]["step"] == list(range(1, 31))
        assert got["series"]["loss"]["value"] == [0.5 if s == 25 else 1.0 for s in range(1, 31)]
        assert http(srv.url, path="/api/runs/r/steps?after=28")[2]["series"]["lr"] == {"step": [29, 30],
                                                                                        "value": [0.1, 0.1]}
        assert http(srv.url, path="/api/runs")[2]["runs"][0]["last_step"] == 30
        # a run resumed from the checkpoint at step 20 trains steps 21... again
        start = {"run_id": "r", "name": "r", "epochs_done": 2, "steps_done": 20}
        assert http(srv.url, "POST", "/api/runs", start)[0] == 200
        got = http(srv.url, path="/api/runs/r/steps")[2]
        assert got["series"]["loss"]["step"] == list(range(1, 21)) and (got["last_step"], got["total"]) == (20, 20)
        assert http(srv.url, path="/api/runs")[2]["runs"][0]["last_step"] == 20


def test_server_downsamples_steps_to_at_most_max_points_keeping_first_last_and_extremes(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(10, 200_001, 10)  # 20,000 records, every 10 steps
    loss = 1 + rng.random(len(steps))
    loss[1234], loss[17000] = 50.0, -3.0  # a spike and a dip at one step each
    records = [(int(s), 1, {"loss": float(v), "lr": 0.01, "late": float(v) if s > 150_000 else None})
               for s, v in zip(steps, loss)]
    store = RunStore(tmp_path / "runs.sqlite")
    store.start_run("big", "big")
    for i in range(0, len(records), 5000):
        store.add_steps("big", records[i:i + 5000])
    truth = {(int(s), float(v)) for s, v in zip(steps, loss)}
    for max_points, after in ((200, 0), (1000, 0), (4, 0), (300, 12_345)):
        got = store.get_steps("big", max_points, after)
        assert got["downsampled"] and got["total"] == int((steps > after).sum())
        assert got["bucket_steps"] is not None or after, "a read from the start uses the summaries"
        for name, series in got["series"].items():
            assert 1 <= len(series["step"]) <= max_points, (name, max_points, len(series["step"]))
            assert series["step"] == sorted(set(series["step"])), name
        kept = list(zip(got["series"]["loss"]["step"], got["series"]["loss"]["value"]))
        assert set(kept) <= truth, "a point that is not a record"
        expected = [(int(s), float(v)) for s, v in zip(steps, loss) if s > after]
        assert kept[0] == expected[0] and kept[-1] == expected[-1], "first or last point lost"
        assert max(kept, key=lambda p: p[1]) == max(expected, key=lambda p: p[1])  # the spike
        assert min(kept, key=lambda p: p[1]) == min(expected, key=lambda p: p[1])  # the dip
        assert got["series"]["late"]["step"][0] == 150_010 and got["series"]["lr"]["value"][0] == 0.01
    assert 100 < len(store.get_steps("big", 1000)["series"]["loss"]["step"])  # not needlessly coarse
    # a re-sent record with another value: the summaries follow (the spike is gone)
    store.add_steps("big", [(12_350, 1, {"loss": 1.5, "lr": 0.01})])
    assert max(store.get_steps("big", 200)["series"]["loss"]["value"]) < 50
    # a resume before the dip forgets it, in the summaries too
    store.start_run("big", "big", steps_done=150_000)
    got = store.get_steps("big", 200)
    assert got["last_step"] == 150_000 and min(got["series"]["loss"]["value"]) > 0 and "late" not in got["series"]
    store.close()


def test_server_deletes_a_run_only_with_the_token(tmp_path):
    with running_server(tmp_path / "runs.sqlite", token="tok") as srv:
        auth = {"Authorization": "Bearer tok"}
        assert http(srv.url, "POST", "/api/runs", {"run_id": "gone", "name": "g"}, auth)[0] == 201
        assert http(srv.url, "POST", "/api/runs/gone/epochs", {"epoch": 1, "metrics": {"x": 1}}, auth)[0] == 200
        steps = {"steps": [{"step": s, "epoch": 1, "metrics": {"loss": 1.0}} for s in range(1, 100)]}
        assert http(srv.url, "POST", "/api/runs/gone/steps", steps, auth)[0] == 200
        status, _, body = http(srv.url, "DELETE", "/api/runs/gone")
        assert status == 401 and "missing token" in body["error"]
        assert http(srv.url, "DELETE", "/api/runs/gone", headers={"Authorization": "Bearer nope"})[0] == 401
        assert http(srv.url, path="/api/runs/gone")[0] == 200  # still there
        status, _, body = http(srv.url, "DELETE", "/api/runs/gone", headers=auth)
        assert (status, body["deleted"]) == (200, True)
        assert http(srv.url, path="/api/runs/gone")[0] == 404 and http(srv.url, path="/api/runs")[2]["runs"] == []
        assert http(srv.url, "DELETE", "/api/runs/gone", headers=auth)[0] == 404
    with sqlite3.connect(tmp_path / "runs.sqlite") as con:  # its records went with it
        for table in ("epochs", "steps", "step_buckets"):
            assert con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table


def test_server_serves_a_runs_records_as_csv_downloads(tmp_path):
    with running_server(tmp_path / "runs.sqlite") as srv:
        assert http(srv.url, "POST", "/api/runs", {"run_id": "c", "name": "c"})[0] == 201
        for epoch, metrics in ((1, {"train_loss": 0.1, "val_loss": None}), (2, {"train_loss": 1 / 3, "val_psnr": 20})):
            assert http(srv.url, "POST", "/api/runs/c/epochs", {"epoch": epoch, "step": 5 * epoch,
                                                                "metrics": metrics})[0] == 200
        steps = [{"step": 5, "epoch": 1, "metrics": {"loss": 0.25}},
                 {"step": 10, "epoch": 2, "metrics": {"loss": 0.1 + 0.2, "loss/mse": 2.5}}]
        assert http(srv.url, "POST", "/api/runs/c/steps", {"steps": steps})[0] == 200
        status, resp, metrics_csv = http(srv.url, path="/api/runs/c/metrics.csv")
        assert status == 200 and resp.getheader("Content-Type").startswith("text/csv")
        assert resp.getheader("Content-Disposition") == 'attachment; filename="c-metrics.csv"'
        status, resp, steps_csv = http(srv.url, path="/api/runs/c/steps.csv")
        assert resp.getheader("Content-Disposition") == 'attachment; filename="c-steps.csv"'
        assert http(srv.url, path="/api/runs/nobody/steps.csv")[0] == 404
    assert metrics_csv.decode().splitlines() == ["epoch,step,train_loss,val_loss,val_psnr", "1,5,0.1,,",
                                                 f"2,10,{1 / 3!r},,20.0"]
    assert steps_csv.decode().splitlines() == ["step,epoch,loss,loss/mse", "5,1,0.25,", f"10,2,{0.1 + 0.2!r},2.5"]


def test_store_opens_a_version_1_database_and_adds_step_records(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as con:  # the file an earlier cr_accel wrote (schema version 1)
        con.executescript("""
            CREATE TABLE runs (run_id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, config TEXT,
              info TEXT, world_size INTEGER, device TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
              ended_at REAL, end_message TEXT, samples_epoch INTEGER, samples_png BLOB);
            CREATE TABLE epochs (run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
              epoch INTEGER NOT NULL, step INTEGER, metrics TEXT NOT NULL, received_at REAL NOT NULL,
              PRIMARY KEY (run_id, epoch));
            INSERT INTO runs VALUES ('old', 'old run', 'finished', '{"seed": 1}', NULL, 1, 'cpu', 1.0, 2.0, 2.0,
              NULL, NULL, NULL);
            INSERT INTO epochs VALUES ('old', 1, 10, '{"train_loss": 0.5}', 1.5);
            PRAGMA user_version=1;""")
    with running_server(db) as srv:
        runs = http(srv.url, path="/api/runs")[2]["runs"]
        assert [(r["run_id"], r["status"], r["epochs"], r["last_step"]) for r in runs] == [("old", "finished", 1, None)]
        assert http(srv.url, path="/api/runs/old")[2]["run"]["config"] == {"seed": 1}
        steps = {"steps": [{"step": 10, "epoch": 1, "metrics": {"loss": 0.5}}]}
        assert http(srv.url, "POST", "/api/runs/old/steps", steps)[0] == 200
        assert http(srv.url, path="/api/runs/old/steps")[2]["series"]["loss"] == {"step": [10], "value": [0.5]}
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2


def test_server_token_protects_writes(tmp_path):
    with running_server(tmp_path / "runs.sqlite", token="s3cret") as srv:
        start = {"run_id": "t", "name": "t"}
        status, resp, body = http(srv.url, "POST", "/api/runs", start)
        assert status == 401 and "missing token" in body["error"] and resp.getheader("WWW-Authenticate")
        status, _, body = http(srv.url, "POST", "/api/runs", start, {"Authorization": "Bearer nope"})
        assert status == 401 and "wrong token" in body["error"]
        status, _, _ = http(srv.url, "POST", "/api/runs", start, {"Authorization": "Basic s3cret"})
        assert status == 401
        assert http(srv.url, "POST", "/api/runs", start, {"Authorization": "Bearer s3cret"})[0] == 201
        assert http(srv.url, path="/api/runs")[0] == 200  # reads stay open
        tracker = DashboardTracker(srv.url, "t2", token="wrong", run_id="t2", finish_timeout=0.3, **FAST_RETRY)
        tracker.finish()
        assert http(srv.url, path="/api/runs/t2")[0] == 404 and tracker.sent == 0


def test_server_database_survives_a_restart(tmp_path):
    db = tmp_path / "runs.sqlite"
    png = samples_png(np.ones((1, 2, 2)), np.zeros((1, 2, 2)), np.ones((1, 2, 2)))
    with running_server(db) as srv:
        tracker = DashboardTracker(srv.url, "persistent", run_id="p1")
        tracker.store_init_configuration({"seed": 1})
        for epoch in (1, 2):
            tracker.log({"epoch": epoch, "train_loss": 0.5 / epoch, "samples_png": png})
        tracker.set_status("preempted")
        tracker.finish()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with running_server(db) as srv:
        runs = http(srv.url, path="/api/runs")[2]["runs"]
        assert [(r["run_id"], r["status"], r["epochs"], r["last_epoch"]) for r in runs] == [("p1", "preempted", 2, 2)]
        assert http(srv.url, path="/api/runs/p1")[2]["run"]["config"] == {"seed": 1}
        assert http(srv.url, path="/api/runs/p1/samples.png")[2] == png


def test_store_refuses_a_file_that_is_not_a_database(tmp_path):
    from cr_accel.dashboard.server import main

    bad = tmp_path / "notes.txt"
    bad.write_text("not a database at all " * 100)
    with pytest.raises(Exception, match="cannot use"):
        RunStore(bad)
    assert main(["--db", str(bad), "--port", "0"]) == 2


def test_dashboard_command_serves_quietly_and_stops_on_sigterm(tmp_path):
    from conftest import cli_env

    proc = subprocess.Popen([sys.executable, "-m", "cr_accel.dashboard.server", "--port", "0",
                             "--db", str(tmp_path / "runs.sqlite")], stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        line = proc.stderr.readline()
        assert "cr_accel dashboard on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        assert http(url, "POST", "/api/runs", {"run_id": "q", "name": "q"})[0] == 201
        assert http(url, "POST", "/api/runs/q/epochs", b"{", {"Content-Type": "application/json"})[0] == 400
        assert http(url, path="/api/runs")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr.read() == "", "the server logged requests without --verbose"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_dashboard_command_reports_a_busy_port(tmp_path, capsys):
    from cr_accel.dashboard.server import main

    with running_server(tmp_path / "a.sqlite") as srv:
        assert main(["--port", str(srv.server_address[1]), "--db", str(tmp_path / "b.sqlite")]) == 2
    assert "cannot listen" in capsys.readouterr().err


def test_dashboard_command_refuses_a_runs_folder_that_does_not_exist(tmp_path, capsys):
    from cr_accel.dashboard.server import main

    assert main(["--port", "0", "--db", str(tmp_path / "r.sqlite"), "--runs", str(tmp_path / "nope")]) == 2
    assert f"--runs {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "r.sqlite").exists()  # refused before anything is created


def test_server_answers_a_stalled_body_with_408_promptly(tmp_path, caplog, capfd):
    """Headers with a Content-Length, part of the body, then nothing: 408 after the request timeout, not a
    500 with a traceback after 30 s; the server keeps serving."""
    caplog.set_level(logging.INFO, logger="cr_accel.dashboard")
    with running_server(tmp_path / "runs.sqlite", request_timeout=0.5) as srv:
        with socket.create_connection(srv.server_address[:2], timeout=10) as s:
            s.sendall(_post("/api/runs", b'{"run_id": "stall", ', length=100))  # 20 of 100 bytes, then a stall
            started = time.monotonic()
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            waited = time.monotonic() - started
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == b"408", reply
        assert "did not arrive within 0.5 s" in json.loads(body)["error"]
        assert 0.4 < waited < 3, f"answered after {waited:.2f} s with a 0.5 s timeout"
        assert b"Content-Security-Policy" in head
        assert http(srv.url, path="/api/runs")[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert "Traceback" not in capfd.readouterr().err


def test_every_response_carries_the_security_headers(server):
    def headers_of(raw):
        with socket.create_connection(server.server_address[:2], timeout=5) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        return int(head[0].split()[1]), dict(line.split(": ", 1) for line in head[1:])

    responses = {
        "page": headers_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        "API": headers_of(b"GET /api/runs HTTP/1.1\r\nHost: x\r\n\r\n"),
        "API error": headers_of(b"GET /api/nothing HTTP/1.1\r\nHost: x\r\n\r\n"),
        "unknown method (http.server's own error)": headers_of(b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n"),
    }
    assert [status for status, _ in responses.values()] == [200, 200, 404, 501]
    for what, (_, headers) in responses.items():
        assert headers.get("X-Content-Type-Options") == "nosniff", what
        assert headers.get("Referrer-Policy") == "no-referrer", what
        assert headers.get("X-Frame-Options") == "DENY", what
        csp = dict(d.strip().split(" ", 1) for d in headers.get("Content-Security-Policy", "").split(";"))
        assert csp.get("default-src") == "'none'" and csp.get("frame-ancestors") == "'none'", (what, csp)
        assert csp.get("connect-src") == "'self'" and "unsafe-inline" not in csp["script-src"], (what, csp)
    # Scripts come from this server only: the page has no inline script (the browser test below runs the page
    # under this policy), and the script files are served with the same headers.
    import re

    page = http(server.url, path="/")[2]
    assert csp["script-src"] == "'self'"
    assert not re.search(rb"<script(?![^>]*\bsrc=)[^>]*>", page), "an inline script would be blocked"
    for src in re.findall(rb'<script src="([^"]+)"', page):
        status, resp, _ = http(server.url, path=src.decode())
        assert status == 200 and resp.getheader("Content-Type").startswith("text/javascript"), src
        assert resp.getheader("Content-Security-Policy") == headers["Content-Security-Policy"], src


def test_the_page_and_its_files_are_package_data():
    """An installed (not editable) cr_accel ships every file the page loads: pyproject.toml's package-data
    patterns cover each file in static/, and the server serves each one it names."""
    import ast
    import fnmatch
    import re

    from cr_accel.dashboard import assets

    root = Path(__file__).resolve().parents[1]
    line = re.search(r'^"cr_accel\.dashboard" = (\[.*\])$', (root / "pyproject.toml").read_text(), re.M)
    patterns = ast.literal_eval(line.group(1))  # tomllib is Python 3.11+; the project runs on 3.10
    static = root / "cr_accel" / "dashboard" / "static"
    files = sorted(p.name for p in static.iterdir())
    assert {"index.html", "dashboard.js", "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(f"static/{name}", pattern) for pattern in patterns), name
    assert set(assets.STATIC_FILES) == set(files) - {"index.html"}
    assert "MIT License" in (static / "uPlot.LICENSE").read_text()


def test_tracker_escapes_a_hostile_reply_before_printing_it(caplog):
    """A server's error text with terminal escape codes reaches the console as visible escapes only."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    hostile = "\x1b[31mred\x1b]0;title\x07\r\x1b[2Kgone\u202e"
    body = json.dumps({"ok": False, "error": hostile}).encode()
    replies = {
        "json 422": b"HTTP/1.0 422 Unprocessable\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body,
        "raw 500": b"HTTP/1.0 500 Oops\r\nContent-Length: 17\r\n\r\n\x1b[31mraw\x1b[0m\x07\r\n..",
        "raw status line": b"\x1b[31mHTTP/1.0 200 OK\r\n\r\n",
    }
    for name, reply in replies.items():
        caplog.clear()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)

            def answer():
                with contextlib.suppress(OSError):
                    conn, _ = listener.accept()
                    with conn:
                        conn.settimeout(2)
                        conn.recv(65536)
                        conn.sendall(reply)

            thread = threading.Thread(target=answer, daemon=True)
            thread.start()
            tracker = DashboardTracker(f"http://127.0.0.1:{listener.getsockname()[1]}", "hostile", timeout=1,
                                       finish_timeout=0.5, retry_initial=5, retry_max=5)
            tracker.start()
            thread.join(5)
            deadline = time.monotonic() + 5
            while not dashboard_warnings(caplog) and time.monotonic() < deadline:
                time.sleep(0.01)
            tracker.finish()
        text = "\n".join(r.getMessage() for r in dashboard_warnings(caplog))
        assert text, name
        assert "\\x1b[31m" in text, (name, text)
        assert not any(not c.isprintable() and c != "\n" for c in text), (name, repr(text))


# ---------------------------------------------------------------- run folders (--runs)

def write_csv(path, columns, rows, partial=""):
    """A CSV like the trainer's: floats as repr, None as an empty cell; replaced at once (a new inode), as the
    trainer rewrites it; `partial`: an unfinished last line, as seen while the trainer writes it."""
    lines = [",".join(columns)] + [",".join("" if v is None else repr(v) if isinstance(v, float) else str(v)
                                            for v in row) for row in rows]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n" + partial)
    tmp.replace(path)


def append_lines(path, *lines):
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def run_folder(path, epochs=3, steps=30, log="training started"):
    """A run folder written by hand, as the trainer writes one (10 steps an epoch)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("optimizer:\n  name: adamw\n  lr: 0.001\nseed: 7\n")
    (path / "environment.json").write_text(json.dumps({"world_size": 2, "device": "cuda:0"}))
    write_csv(path / "metrics.csv", ["epoch", "step", "train_loss", "val_loss", "val_psnr"],
              [(e, 10 * e, 1.0 / e, 1.1 / e, float("nan") if e == 2 else 20.0 + e) for e in range(1, epochs + 1)])
    write_csv(path / "steps.csv", ["step", "epoch", "loss", "lr"],
              [(s, 1 + (s - 1) // 10, 2.0 / s, 0.1) for s in range(1, steps + 1)])
    (path / "samples").mkdir()
    for epoch in range(1, epochs + 1):
        (path / "samples" / f"epoch_{epoch:04d}.png").write_bytes(samples_png(np.full((1, 2, 2), epoch / 9),
                                                                              np.zeros((1, 2, 2)), np.ones((1, 2, 2))))
    (path / "train.log").write_text(f"2025-01-01 10:00:00 {log}\n")
    return path


def test_folder_importer_follows_a_run_folder_as_it_grows_and_is_resumed(tmp_path):
    from cr_accel.dashboard.folders import FolderImporter
    from cr_accel.dashboard.schema import valid_run_id

    root = tmp_path / "runs"
    folder = run_folder(root / "exp" / "lr=1e-3 (a)")
    (root / "exp" / "lr=1e-3 (a)" / "checkpoints" / "step_10").mkdir(parents=True)  # never entered
    (root / "notes").mkdir()  # no metrics.csv or steps.csv: not a run
    (root / "latest").symlink_to(folder)  # a link to a run folder: the same run, not a second one
    store = RunStore(tmp_path / "runs.sqlite")
    importer = FolderImporter(store, [root])
    [run_id] = importer.scan()
    assert valid_run_id(run_id) and run_id.startswith("exp-lr-1e-3-a-")
    assert FolderImporter(store, [root]).scan() == [run_id]  # the same id on every scan and server start
    run = store.get_run(run_id)
    assert (run["name"], run["status"], run["folder"], run["world_size"], run["device"]) == (
        "lr=1e-3 (a)", "running", str(folder.resolve()), 2, "cuda:0")
    assert run["config"] == {"optimizer": {"name": "adamw", "lr": 0.001}, "seed": 7}
    assert store.get_samples(run_id) == (3, (folder / "samples" / "epoch_0003.png").read_bytes())
    epochs = store.get_epochs(run_id)
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, 10), (2, 20), (3, 30)]
    assert epochs[1]["metrics"] == {"train_loss": 0.5, "val_loss": 1.1 / 2, "val_psnr": None}
    assert store.get_steps(run_id, 1000)["series"]["loss"]["value"] == [2.0 / s for s in range(1, 31)]

    # it grows: complete lines are read, the line being written waits for the next scan
    append_lines(folder / "steps.csv", "31,4,0.0625,0.1", "32,4,0.03125,0.1")
    with open(folder / "steps.csv", "a") as f:
        f.write("33,4,0.01")
    importer.scan()
    assert store.get_steps(run_id, 1000)["last_step"] == 32
    append_lines(folder / "steps.csv", "5,0.1")  # the rest of step 33's line
    append_lines(folder / "metrics.csv", "4,40,0.25,0.275,24.0")
    importer.scan()
    assert store.get_steps(run_id, 1000)["series"]["loss"]["step"][-1] == 33
    assert store.get_steps(run_id, 1000)["series"]["loss"]["value"][-1] == 0.015
    assert [e["epoch"] for e in store.get_epochs(run_id)] == [1, 2, 3, 4]

    # a resume from the checkpoint after epoch 2 rewrites both files shorter, then trains on
    write_csv(folder / "metrics.csv", ["epoch", "step", "train_loss", "val_loss", "val_psnr"],
              [(1, 10, 1.0, 1.1, 21.0), (2, 20, 0.5, 0.55, None)])
    write_csv(folder / "steps.csv", ["step", "epoch", "loss", "lr"],
              [(s, 1 + (s - 1) // 10, 2.0 / s, 0.1) for s in range(1, 21)] + [(21, 3, 9.0, 0.1)])
    importer.scan()
    assert [e["epoch"] for e in store.get_epochs(run_id)] == [1, 2]
    got = store.get_steps(run_id, 1000)["series"]["loss"]
    assert got["step"] == list(range(1, 22)) and got["value"][-1] == 9.0

    # a new column widens the header: the file is rewritten with the same rows, read again whole
    write_csv(folder / "metrics.csv", ["epoch", "step", "train_loss", "val_loss", "val_psnr", "peak_mem_mb"],
              [(1, 10, 1.0, 1.1, 21.0, None), (2, 20, 0.5, 0.55, None, None), (3, 30, 0.3, 0.4, 22.0, 512.0)])
    importer.scan()
    assert store.get_epochs(run_id)[-1]["metrics"]["peak_mem_mb"] == 512.0

    # the end: the status is the last line's, the tracker's own notices after it aside
    append_lines(folder / "train.log", "2025-01-01 11:00:00 training preempted after 3 epochs, 30 optimizer steps",
                 "2025-01-01 11:00:01 dashboard: 2 message(s) could not be delivered to http://127.0.0.1:1")
    importer.scan()
    assert store.get_run(run_id)["status"] == "preempted"
    append_lines(folder / "train.log", "2025-01-01 12:00:00 resuming from checkpoints/last")  # requeued
    os.utime(folder / "train.log", (time.time() + 5, time.time() + 5))
    importer.scan()
    assert store.get_run(run_id)["status"] == "running"
    store.close()


def test_folder_runs_merge_with_posted_runs_and_deleted_runs_stay_deleted(tmp_path):
    root = tmp_path / "runs"
    reported = run_folder(root / "reported", epochs=3, log="training finished after 3 epochs, 30 optimizer steps")
    (reported / "dashboard_run_id").write_text("reported-1\n")
    run_folder(root / "folder-only")
    copy = run_folder(root / "reported-copy")  # a copy of a run folder: another run, another id (the folder
    # found first, in name order, keeps the id)
    (copy / "dashboard_run_id").write_text("reported-1\n")
    with running_server(tmp_path / "runs.sqlite", runs_dirs=[root], scan_interval=0.05) as srv:
        tracker = DashboardTracker(srv.url, "reported", run_id="reported-1")  # epoch 3 never arrived
        for epoch in (1, 2):
            tracker.log({"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch})
        tracker.finish()

        def runs():
            return {r["run_id"]: r for r in http(srv.url, path="/api/runs")[2]["runs"]}

        deadline = time.monotonic() + 10
        while not (len(runs()) == 3 and runs()["reported-1"]["epochs"] == 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        listed = runs()
        assert len(listed) == 3 and listed["reported-1"]["name"] == "reported", listed
        assert listed["reported-1"]["epochs"] == 3 and listed["reported-1"]["last_step"] == 30
        assert listed["reported-1"]["status"] == "finished" and listed["reported-1"]["folder"].endswith("reported")
        copied = next(r for r in listed.values() if r["name"] == "reported-copy")
        assert copied["run_id"] != "reported-1" and copied["folder"].endswith("reported-copy")
        folder_only = next(r["run_id"] for r in listed.values() if r["name"] == "folder-only")
        for run_id in ("reported-1", folder_only):
            assert http(srv.url, "DELETE", f"/api/runs/{run_id}")[0] == 200
        append_lines(root / "folder-only" / "steps.csv", "31,4,0.5,0.1")  # news in the folder: still deleted
        time.sleep(0.5)  # ten scans
        assert set(runs()) == {copied["run_id"]}
        # a run that starts again (a resume) comes back, and its folder fills it in again
        assert http(srv.url, "POST", "/api/runs", {"run_id": "reported-1", "name": "reported"})[0] == 201
        deadline = time.monotonic() + 10
        while runs()["reported-1"]["epochs"] != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runs()["reported-1"]["epochs"] == 3 and folder_only not in runs()


# ---------------------------------------------------------------- the page, in a real browser

@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {BROWSER_HINT}")
    exe = os.environ.get("CR_ACCEL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.fail(f"no chromium at {exe}: {BROWSER_HINT}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def fake_epoch(epoch, offset=0.0):
    return {"epoch": epoch, "step": 20 * epoch, "train_loss": 1.0 / epoch + offset, "val_loss": 1.1 / epoch + offset,
            "best_val": 1.1 / epoch, "lr": 0.1 * 0.9**epoch, "grad_norm": 2.0 / epoch, "samples_per_s": 5000 + epoch,
            "epoch_time": 1.5, "val_mae": 0.5 / epoch}


def fake_steps(tracker, epoch, offset=0.0):
    """The epoch's 20 step records, one every optimizer step."""
    for step in range(20 * (epoch - 1) + 1, 20 * epoch + 1):
        tracker.log_step(step, epoch, {"loss": 1.0 / (1 + step / 20) + offset, "lr": 0.1 * 0.9**(step / 20),
                                       "grad_norm": 2.0 / epoch, "loss/mse": 0.5 / epoch, "ones": 1.0})


DRAWN = """() => { const root = document.getElementById('charts'), charts = [...root.querySelectorAll('.chart')];
                   return charts.length > 0 && charts.every(c => c.dataset.drawn === root.dataset.render); }"""


def drawn_series(page, chart):
    """{(run, name, level): points} handed to uPlot for a chart that has been drawn."""
    page.wait_for_function(DRAWN, timeout=10_000)
    found = json.loads(page.get_attribute(f'#charts .chart[data-chart="{chart}"]', "data-series"))
    return {(s["run"], s["name"], s["level"]): s["points"] for s in found}


def test_page_shows_runs_live_in_a_real_browser(tmp_path, browser):
    """Step-level charts, overlays, the hyperparameter table, a CSV download, a run that exists only as a
    folder (--runs), deleting (with and without the token), under the server's CSP, with no console error."""
    x = torch.rand(4, 8, 8)
    png = samples_png(x, x * 0.8, x, scale=4)
    folder = run_folder(tmp_path / "runs" / "from-disk", epochs=3, steps=30,
                        log="training finished after 3 epochs, 30 optimizer steps")
    auth = dict(token="tok")
    with running_server(tmp_path / "runs.sqlite", runs_dirs=[tmp_path / "runs"], scan_interval=0.2, **auth) as srv:
        other = DashboardTracker(srv.url, "four epochs", run_id="four", **auth)
        other.store_init_configuration({"optimizer": {"name": "adamw", "lr": 0.003}, "seed": 7})
        for epoch in range(1, 5):
            fake_steps(other, epoch, offset=0.2)
            other.log(fake_epoch(epoch, offset=0.2), step=epoch)
        other.set_status("stopped_early")
        other.finish()
        main_run = DashboardTracker(srv.url, "seven epochs", run_id="seven", **auth)  # the newest: shown first
        main_run.store_init_configuration({"optimizer": {"name": "adamw", "lr": 0.001}, "seed": 7})
        for epoch in range(1, 8):
            fake_steps(main_run, epoch)
            main_run.log({**fake_epoch(epoch), "samples_png": png}, step=epoch)
        assert main_run.flush(5)

        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("dialog", lambda d: d.accept())
        page.goto(srv.url + "/")
        page.wait_for_selector('#detail[data-run-id="seven"]', timeout=10_000)
        loss = drawn_series(page, "loss")
        assert loss == {("seven", "loss", "step"): 140, ("seven", "train_loss", "epoch"): 7,
                        ("seven", "val_loss", "epoch"): 7}
        assert drawn_series(page, "lr") == {("seven", "lr", "step"): 140, ("seven", "lr", "epoch"): 7}
        assert drawn_series(page, "loss/mse") == {("seven", "loss/mse", "step"): 140}
        for chart in ("grad_norm", "samples_per_s", "val_mae"):
            assert ("seven", chart, "epoch") in drawn_series(page, chart), chart
        assert page.locator('#charts .chart[data-chart="ones"]').count() == 0  # constant: hidden, named below
        assert "ones = 1" in page.inner_text("#constant-note")
        assert page.locator("#charts canvas").count() >= 6
        assert '"adamw"' in page.inner_text("#config") and page.inner_text("#run-status") == "running"
        page.wait_for_function("() => document.getElementById('samples').naturalWidth > 0", timeout=5000)
        assert page.eval_on_selector("#samples", "img => img.naturalWidth") == 3 * 8 * 4 + 4  # Chromium decoded it

        fake_steps(main_run, 8)  # live: the next poll shows it
        main_run.log({**fake_epoch(8), "samples_png": png}, step=8)
        page.wait_for_function("""() => JSON.parse(document.querySelector('#charts .chart[data-chart="loss"]')
                                   .dataset.series)[0].points === 160""", timeout=6000)

        render = int(page.get_attribute("#charts", "data-render"))
        page.eval_on_selector("#smoothing", "s => { s.value = '0.9'; s.dispatchEvent(new Event('input')); }")
        page.wait_for_function(f"() => Number(document.getElementById('charts').dataset.render) > {render}")
        assert drawn_series(page, "loss")[("seven", "loss", "step")] == 160  # smoothed, the same points

        page.check('input[data-overlay="four"]')
        page.wait_for_function("() => document.getElementById('charts').dataset.runs === 'seven,four'", timeout=5000)
        assert drawn_series(page, "loss")[("four", "loss", "step")] == 80
        assert "stopped_early" in page.inner_text('tr[data-run-id="four"]')
        # the hyperparameter table: what differs between the two, and their final metrics
        assert [h.inner_text() for h in page.locator("#hparams th[data-param]").all()] == ["optimizer.lr"]
        assert page.inner_text('#hparams tr[data-run-id="four"]').split("\t")[1:4] == ["0.003", "4", "80"]
        assert "train_loss" in page.inner_text("#hparams thead")

        # the run that exists only as a folder
        disk = page.get_attribute('tr.run:has-text("from-disk")', "data-run-id", timeout=5000)
        assert "finished" in page.inner_text(f'tr[data-run-id="{disk}"]')
        page.click(f'tr[data-run-id="{disk}"]')
        page.wait_for_selector(f'#detail[data-run-id="{disk}"]')
        page.wait_for_function(f"() => document.getElementById('charts').dataset.runs.startsWith('{disk}')")
        assert drawn_series(page, "loss")[(disk, "loss", "step")] == 30
        assert folder.name in page.inner_text("#meta") and '"seed": 7' in page.inner_text("#config")

        with page.expect_download() as download:
            page.click("#csv-steps")
        lines = Path(download.value.path()).read_text().splitlines()
        assert lines[0] == "step,epoch,loss,lr" and len(lines) == 31 and lines[2] == f"2,1,{2.0 / 2!r},0.1"

        # deleting needs the token: without it the page says so, with ?token= it is gone
        page.click("#delete-run")
        page.wait_for_selector("#error:not([hidden])")
        assert "missing token" in page.inner_text("#error") and "?token=" in page.inner_text("#error")
        page.goto(srv.url + f"/?token=tok#run={disk}")
        page.wait_for_selector(f'#detail[data-run-id="{disk}"]')
        page.click("#delete-run")
        page.wait_for_function(f"() => !document.querySelector('tr[data-run-id=\"{disk}\"]')", timeout=5000)
        page.wait_for_selector('#detail[data-run-id="seven"]')  # the newest is shown again
        time.sleep(0.5)  # scans of the folder: the run stays deleted
        assert disk not in {r["run_id"] for r in http(srv.url, path="/api/runs")[2]["runs"]}

        main_run.set_status("finished")
        main_run.finish()
        page.wait_for_function("() => document.getElementById('run-status').textContent === 'finished'",
                               timeout=6000)
        page.close()
    # Chromium logs every answer of 400 or more; the one 401 is the delete without the token, asked for above.
    assert errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"], errors
    outside = [u for u in requests if not u.startswith(srv.url)]
    assert not outside, f"the page loaded something from elsewhere: {outside}"


# ---------------------------------------------------------------- the trainer, wired to the dashboard

def test_trainer_reports_every_epoch_to_the_dashboard(tmp_path):
    import csv

    from cr_accel.config import config_from_dict
    from cr_accel.trainer import Trainer

    fresh_state()
    out = tmp_path / "run"
    with running_server(tmp_path / "runs.sqlite", token="tok") as server:
        cfg = config_from_dict({
            "model": {"name": "conv_autoencoder", "in_channels": 1, "out_channels": 1, "base_channels": 4,
                      "depth": 1},
            "data": {"name": "synthetic_cr", "batch_size": 8, "num_train": 16, "num_val": 8},
            "training": {"epochs": 2, "log_every": 1000, "metrics": ["psnr"]},
            "output": {"dir": str(out)},
            "dashboard": {"enabled": True, "url": server.url, "token": "tok"},
        })
        assert Trainer(cfg).train() == "finished"
        run_id = (out / "dashboard_run_id").read_text().strip()
        run = http(server.url, path=f"/api/runs/{run_id}")[2]["run"]
        rows = http(server.url, path=f"/api/runs/{run_id}/epochs")[2]["epochs"]
    fresh_state()
    assert (run["status"], run["world_size"], run["samples_epoch"]) == ("finished", 1, 2)
    assert run["config"]["model"]["name"] == "conv_autoencoder"
    with open(out / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [1, 2]
    for row, csv_row in zip(rows, csv_rows):
        for key in ("train_loss", "val_loss", "val_psnr", "lr", "grad_norm", "samples_per_s"):
            assert row["metrics"][key] == pytest.approx(float(csv_row[key]), rel=1e-6), key
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
