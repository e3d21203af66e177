"""DashboardTracker: sends a run's start, epochs and end to `cr-accel dashboard`, never slowing training.

    tracker = DashboardTracker("http://127.0.0.1:8765", run_name="mnist-mlp", token=None,
                               start_info={"world_size": 2, "device": "cuda:0"})
    accelerator = Accelerator(log_with=[tracker])
    accelerator.init_trackers("cr_accel", config=cfg.to_dict())       # start message (with the config)
    accelerator.log({"epoch": 1, "train_loss": 0.3, ...}, step=1)     # one epoch message
    tracker.log_step(50, 1, {"loss": 0.41, "lr": 1e-3})               # one step record
    tracker.set_status("finished"); accelerator.end_training()        # end message, flushed for <= 3 s

How it stays out of the way: `log()` and `log_step()` only convert the values and append them to an
in-memory queue. A daemon thread sends the queue in order, each request with a short timeout; consecutive
step records go together, up to `max_step_batch` in one request. While the dashboard is down, slow, or
answers errors or garbage, the messages wait and are retried with backoff (one notice when it becomes
unreachable, one when it is back), so the history has no holes. The queue is bounded: past `max_pending`,
the oldest step records are dropped first, then the oldest epochs (never the start message), and only the
newest pending epoch keeps its samples picture (the dashboard shows only the latest). `finish()` waits at
most `finish_timeout` seconds to flush (not at all when the dashboard never answered), then gives up
without raising. No method raises into the training loop. The notices go to `report` (the trainer's
train.log) when given, else to the `cr_accel.dashboard` logger.

Only the main process constructs it (the trainer's job), so it never looks at ranks.
"""

import base64
import collections
import http.client
import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from accelerate.tracking import GeneralTracker

from .schema import (END_STATUSES, MAX_BODY_BYTES, MAX_EPOCH, MAX_METRICS, MAX_NAME, MAX_STEP, SKIP, START_FIELDS,
                     check_url, metric_value, new_run_id, plain_json, valid_run_id)

logger = logging.getLogger("cr_accel.dashboard")

_RUN_ID_FILE = "dashboard_run_id"


_ONLY_FIRST_START = ("epochs_done", "steps_done")  # start fields that only the first start may carry


class _Message:
    __slots__ = ("kind", "path", "payload", "png", "restarts", "encoded")

    def __init__(self, kind, path, payload, png=None):
        self.kind, self.path, self.payload, self.png, self.restarts = kind, path, payload, png, 0
        self.encoded = None  # a step record's JSON, made once by the sender thread


class DashboardTracker(GeneralTracker):
    name = "cr_accel_dashboard"
    requires_logging_directory = False

    def __init__(self, url, run_name, token=None, run_id=None, timeout=2.0, max_pending=10000,
                 finish_timeout=3.0, start_info=None, retry_initial=0.5, retry_max=10.0,
                 max_body=MAX_BODY_BYTES, report=None, max_step_batch=500):
        """`url`: the dashboard's address (http or https, e.g. http://127.0.0.1:8765).
        `run_id`: letters, digits, '.', '_', '-' (default: the name, the time and a random suffix; see
        `run_id_for` to keep one id across a resumed run). `start_info`: extra start-message fields:
        config, info, world_size, device, epochs_done, steps_done. `timeout`: seconds per request;
        `retry_initial` and `retry_max`: the backoff between tries while the dashboard is unreachable.
        `report`: called with each notice (unreachable, back, left out) as one line of text, from any
        thread; default: the `cr_accel.dashboard` logger's warning. `max_step_batch`: step records per request.
        Raises ValueError for a malformed url or run_id (before training, when the config is checked).
        """
        super().__init__()
        problem = check_url(url)
        if problem:
            raise ValueError(problem)
        parts = urlsplit(str(url))
        self.url = str(url).rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.run_name = str(run_name)
        self.run_id = run_id if run_id is not None else new_run_id(self.run_name)
        if not valid_run_id(self.run_id):
            raise ValueError(f"dashboard run_id {self.run_id!r} must be 1-128 letters, digits, '.', '_' or '-'")
        _check_start_info(start_info or {})
        if token is not None and (not isinstance(token, str) or not token or any(c.isspace() for c in token)):
            raise ValueError("dashboard token must be a non-empty string without spaces or line breaks")
        self.token = token
        self.timeout, self.finish_timeout = float(timeout), float(finish_timeout)
        self.max_pending, self.max_body = max(2, int(max_pending)), int(max_body)
        self.retry_initial, self.retry_max = float(retry_initial), float(retry_max)
        self.max_step_batch = max(1, int(max_step_batch))
        self._report = report
        self._start_payload = {"run_id": self.run_id, "name": self.run_name, **plain_json(start_info or {})}
        self.status = None
        self.sent = 0  # messages delivered
        self.dropped = 0  # messages given up on: queue bound, rejected by the server, or left at finish()
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._in_flight = set()  # messages on their way: never dropped or changed meanwhile
        self._thread = None
        self._started = self._finished = self._closing = self._hurry = False
        self._down = False
        self._answered = False  # any HTTP answer from the dashboard at all, during the whole run
        self._tries = 0  # tries that have ended, answered or not
        self._last_epoch = 0
        self._said = set()  # one-off warnings already given

    # ------------------------------------------------------------ GeneralTracker

    @property
    def tracker(self):
        return self

    def start(self):
        """Queue the start message and start the sender thread (accelerate calls this in init_trackers)."""
        self._guard(self._ensure_started)

    def store_init_configuration(self, values):
        """The run's resolved config: sent with the start message (or as an update if that already left)."""
        self._guard(self._store_config, values)

    def log(self, values, step=None, samples_png=None, **kwargs):
        """Queue one epoch message; returns at once. The epoch is values["epoch"], else `step`, else one
        more than the last (1-based). Numbers (and 0-d tensors) become metrics, NaN/inf null; bytes under
        "samples_png" (in `values`, or as the keyword, which `accelerator.log(..., log_kwargs=
        {"cr_accel_dashboard": {"samples_png": png}})` passes to this tracker alone) are a PNG sent
        base64; anything else is left out."""
        if samples_png is not None:
            values = {**values, "samples_png": samples_png}
        self._guard(self._log, values, step)

    def log_step(self, step, epoch, metrics):
        """Queue one step record (`step`: the global optimizer step, `epoch`: 1-based); returns at once.
        Numbers (and 0-d tensors) in `metrics` are sent, NaN/inf as null, anything else left out."""
        self._guard(self._log_step, step, epoch, metrics)

    def set_start_info(self, **fields):
        """More start-message fields (config, info, world_size, device, epochs_done, steps_done), known
        after construction: call before init_trackers to send them with the start. Later calls send an
        update (without epochs_done and steps_done, which only the first start may carry). Raises
        ValueError for unknown keys."""
        _check_start_info(fields)
        fields = plain_json(fields)
        if not self._started:
            self._start_payload = {**self._start_payload, **fields}
        else:
            self._guard(self._update_start, {k: v for k, v in fields.items() if k not in _ONLY_FIRST_START})

    def set_status(self, status):
        """How the run ended, sent by finish(): finished, failed, preempted or stopped_early."""
        if status in END_STATUSES:
            self.status = status
        else:
            self._warn_once(f"status:{status}", f"cr_accel dashboard: unknown status {status!r} ignored; "
                                                 f"one of {', '.join(END_STATUSES)}")

    def finish(self):
        """Queue the end message and wait at most `finish_timeout` s for the queue to drain (not at all when
        the dashboard never answered during the run: it is not there). Never raises."""
        self._guard(self._finish)

    # ------------------------------------------------------------ extras

    @property
    def pending(self):
        """Messages not delivered yet."""
        with self._cond:
            return len(self._queue)

    def flush(self, timeout=None):
        """Wait until every queued message is delivered or given up on; True if the queue is empty."""
        return self._drain(self.finish_timeout if timeout is None else timeout)

    def _drain(self, timeout, unless_absent=False):
        """flush(); `unless_absent`: stop as soon as a try has ended without any answer and none ever came
        (nothing listens, or it hangs or is not HTTP): waiting for such a dashboard only delays the run."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            while self._queue and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0 or (unless_absent and self._tries and not self._answered):
                    break
                self._cond.wait(left)
            self._hurry = False
            return not self._queue

    # ------------------------------------------------------------ the caller's side

    def _guard(self, fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # whatever happens here, training goes on
            self._warn_once(f"internal:{type(exc).__name__}",
                            f"cr_accel dashboard: {type(exc).__name__}: {exc} (ignored; training continues)")

    def _ensure_started(self):
        with self._cond:
            if self._started:
                return
            self._started = True
            self._queue.append(_Message("start", "/api/runs", dict(self._start_payload)))
            self._thread = threading.Thread(target=self._run, name="cr_accel-dashboard", daemon=True)
            self._thread.start()

    def _store_config(self, values):
        self._update_start({"config": plain_json(dict(values))})

    def _update_start(self, fields):
        self._start_payload = {**self._start_payload, **fields}
        self._ensure_started()
        with self._cond:
            for msg in self._queue:
                if msg.kind == "start":  # not delivered yet (if it is on its way, _run sends it again)
                    msg.payload = {**msg.payload, **fields}
                    return
            self._enqueue(self._resent_start())

    def _log(self, values, step):
        if self._finished:
            return
        epoch = metric_value(values.get("epoch", step))
        epoch = int(epoch) if isinstance(epoch, float) else self._last_epoch + 1
        if epoch < 1:
            self._warn_once("epoch<1", f"cr_accel dashboard: epoch {epoch} left out: epochs are 1-based")
            return
        self._last_epoch = epoch
        png, metrics, msg_step = None, {}, values.get("step")
        for key, value in values.items():
            if key in ("epoch", "step"):
                continue
            if key == "samples_png":
                png = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
                continue
            number = metric_value(value)
            if number is not SKIP:
                metrics[str(key)] = number
        payload = {"epoch": epoch, "metrics": metrics}
        msg_step = metric_value(msg_step)
        if isinstance(msg_step, float) and msg_step >= 0:
            payload["step"] = int(msg_step)
        self._ensure_started()
        with self._cond:
            if png is not None:  # the dashboard keeps only the latest picture: older queued ones go
                for msg in self._queue:
                    if msg.kind == "epoch" and msg not in self._in_flight:
                        msg.png = None
            self._enqueue(_Message("epoch", f"/api/runs/{self.run_id}/epochs", payload, png))

    def _log_step(self, step, epoch, metrics):
        if self._finished:
            return
        step, epoch = metric_value(step), metric_value(epoch)
        if not all(isinstance(v, float) and v.is_integer() for v in (step, epoch)) or not (
                1 <= step <= MAX_STEP and 1 <= epoch <= MAX_EPOCH):
            self._warn_once("step<1", f"cr_accel dashboard: step record (step {step}, epoch {epoch}) left out: "
                                      "both are integers from 1")
            return
        values = {}
        for key, value in metrics.items():
            number, name = metric_value(value), str(key)
            if number is not SKIP and 1 <= len(name) <= MAX_NAME and len(values) < MAX_METRICS:
                values[name] = number
        # Checked here, as the server checks it: one bad record would make it refuse its whole batch.
        payload = {"step": int(step), "epoch": int(epoch), "metrics": values}
        self._ensure_started()
        with self._cond:
            self._enqueue(_Message("steps", f"/api/runs/{self.run_id}/steps", payload))

    def _finish(self):
        self._ensure_started()
        with self._cond:
            if self._finished:
                return
            self._finished = True
            end = {"status": self.status or "finished"}
            self._enqueue(_Message("end", f"/api/runs/{self.run_id}/end", end))
        self._drain(self.finish_timeout, unless_absent=True)
        with self._cond:
            self._closing = True  # the thread stops after its current try
            left = len(self._queue)
            if left:
                self.dropped += left
                self._queue.clear()
            said_down, self._down = self._down, True  # the thread's try still on its way says nothing more
            self._cond.notify_all()
        if not left:
            return
        if not said_down:  # the first try was still on its way: say once that the dashboard was not reached
            self._notice(f"cr_accel dashboard: cannot deliver to {self.url}: no answer by the end of the run; "
                         f"{left} message(s) left out")
        elif self._answered:  # INFO, not WARNING: the outage was already reported once; `dropped` has the count.
            self._notice(f"cr_accel dashboard: {left} message(s) not delivered to {self.url} within "
                         f"{self.finish_timeout:.1f} s; left out", logging.INFO)
        # A dashboard that never answered: its one notice (unreachable) said it all; `dropped` has the count.

    def _resent_start(self):
        """A start message sent again (config update, or a server that lost the run). Without
        `epochs_done` and `steps_done`: only the first start may tell the server to forget later records."""
        payload = {k: v for k, v in self._start_payload.items() if k not in _ONLY_FIRST_START}
        return _Message("start", "/api/runs", payload)

    def _enqueue(self, msg):
        """Append (lock held); past the bound, drop the oldest step record, else the oldest epoch message,
        that is not being sent: epochs (with the validation metrics) are worth more than step records."""
        self._queue.append(msg)
        if len(self._queue) > self.max_pending:
            for kind in ("steps", "epoch"):
                old = next((m for m in self._queue if m.kind == kind and m not in self._in_flight and m is not msg),
                           None)
                if old is not None:
                    self._queue.remove(old)
                    self.dropped += 1
                    self._warn_once("full", f"cr_accel dashboard: {self.max_pending} messages waiting for "
                                            f"{self.url}; dropping the oldest step records (then epochs) from now on")
                    break
        self._cond.notify_all()

    # ------------------------------------------------------------ the sender thread

    def _run(self):
        delay = self.retry_initial
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                batch = self._next_batch()
                self._in_flight = set(batch)
                msg = batch[0]
                payload, png = msg.payload, msg.png
            outcome, detail = self._deliver(batch, payload, png)
            with self._cond:
                self._in_flight = set()
                self._tries += 1
                # Decided under the lock, so that either this thread or finish() says it, never both.
                say_down = outcome == "retry" and not self._down and not self._closing
                self._down = self._down or outcome == "retry"
                if outcome == "ok" and msg.payload is not payload:
                    pass  # changed while on its way (the config arrived): send the new version too
                elif outcome in ("ok", "drop"):
                    while self._queue and self._queue[0] in batch:
                        self._queue.popleft()
                        if outcome == "ok":
                            self.sent += 1
                        else:
                            self.dropped += 1
                elif outcome == "restart":  # the server does not know the run: send the start again first
                    msg.restarts += 1
                    self._queue.appendleft(self._resent_start())
                self._cond.notify_all()
            if say_down:
                self._notice(f"cr_accel dashboard: cannot deliver to {self.url} ({detail}); training continues, "
                             "metrics are kept and sent when it answers")
            if self._closing:
                return  # finish() has given up: whatever this try gave, nothing more is sent
            if outcome == "retry":
                self._back_off(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            delay = self.retry_initial
            if self._down:
                self._down = False
                self._notice(f"cr_accel dashboard: reconnected to {self.url}; sending {self.pending} waiting message(s)")
            if outcome == "drop":
                self._warn_once(f"drop:{msg.kind}:{detail.split(':')[0]}",
                                f"cr_accel dashboard: {self.url} rejected a {msg.kind} message ({detail}); left out")

    def _back_off(self, delay):
        """Wait `delay` seconds before the next try (0.1 s once finish() or flush() is waiting). New records do
        not end the wait: each would otherwise bring a try (a connection and its Python work, taking the GIL
        from training) while the dashboard is down."""
        start = time.monotonic()
        with self._cond:
            while not self._closing:
                left = start + (min(delay, 0.1) if self._hurry else delay) - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _next_batch(self):
        """The head message, or (lock held) the step records at the head of the queue: as many in a row as
        fit in one request of at most `max_step_batch` records and `max_body` bytes."""
        head = self._queue[0]
        if head.kind != "steps":
            return [head]
        batch, size = [], 64
        for msg in self._queue:
            if msg.kind != "steps" or len(batch) == self.max_step_batch:
                break
            if msg.encoded is None:
                msg.encoded = json.dumps(msg.payload, allow_nan=False, separators=(",", ":")).encode()
            size += len(msg.encoded) + 1
            if batch and size > self.max_body:
                break
            batch.append(msg)
        return batch

    def _deliver(self, batch, payload, png):
        """One try: ("ok" | "retry" | "drop" | "restart", detail). The detail quotes what the server sent,
        so it is made printable here, before any warning shows it."""
        try:
            outcome, detail = self._try(batch, payload, png)
        except Exception as exc:  # not a network error: a bug or an odd value; the thread must not die
            outcome, detail = "retry", f"{type(exc).__name__}: {exc}"
        return outcome, printable(detail)

    def _try(self, batch, payload, png):
        msg = batch[0]
        try:
            if msg.kind == "steps":
                body = b'{"steps":[' + b",".join(m.encoded for m in batch) + b"]}"
                if len(body) > self.max_body:
                    raise ValueError(f"a step record of {len(body)} bytes is over the limit of {self.max_body}")
            else:
                body = self._encode(msg, payload, png)
        except ValueError as exc:
            return "drop", str(exc)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            conn.request("POST", self._prefix + msg.path, body=body, headers=headers)
            resp = conn.getresponse()
            self._answered = True
            status, text = resp.status, resp.read(65536)
        except (OSError, http.client.HTTPException) as exc:
            return "retry", _describe(exc)
        finally:
            conn.close()
        answer = _parse_answer(text)
        if 200 <= status < 300:
            if answer.get("ok") is True:
                return "ok", ""
            return "retry", f"HTTP {status} with an answer that is not the dashboard's: {text[:60]!r}"
        error = answer.get("error") or text[:100].decode("utf-8", "replace")
        if status == 404 and msg.kind != "start" and "unknown run" in error and msg.restarts == 0:
            return "restart", error
        if status in (400, 404, 413, 415, 422) and "error" in answer:
            return "drop", f"HTTP {status}: {error}"
        return "retry", f"HTTP {status}: {error}"

    def _encode(self, msg, payload, png):
        if png is not None:
            payload = {**payload, "samples_png": base64.b64encode(png).decode("ascii")}
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        if len(body) > self.max_body and png is not None:
            self._warn_once("big-png", f"cr_accel dashboard: a samples picture of {len(png)} bytes makes the "
                                       f"message over {self.max_body} bytes; sent without it")
            msg.png = None
            payload = {k: v for k, v in payload.items() if k != "samples_png"}
            body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        if len(body) > self.max_body:
            raise ValueError(f"message of {len(body)} bytes is over the limit of {self.max_body}")
        return body

    def _warn_once(self, key, message):
        if key not in self._said:
            self._said.add(key)
            self._notice(message)

    def _notice(self, message, level=logging.WARNING):
        """One line to `report`, else to the logger; never raises (a broken report must not stop sending)."""
        if self._report is None:
            logger.log(level, message)
            return
        try:
            self._report(message)
        except Exception:
            logger.debug("cr_accel dashboard: the report function failed", exc_info=True)


def _check_start_info(fields):
    unknown = set(fields) - set(START_FIELDS)
    if unknown:
        raise ValueError(f"unknown start field(s) {sorted(unknown)}; allowed: {', '.join(START_FIELDS)}")


def run_id_for(output_dir, name):
    """The run id kept in `<output_dir>/dashboard_run_id`, or a new one: a resumed run (same output dir)
    keeps reporting to the same dashboard run instead of starting a new one. Writes nothing: the caller
    keeps a new id with `remember_run_id` once the run has really started."""
    try:
        run_id = (Path(output_dir) / _RUN_ID_FILE).read_text().strip()
        if valid_run_id(run_id):
            return run_id
    except OSError:
        pass
    return new_run_id(name)


def remember_run_id(output_dir, run_id):
    path = Path(output_dir) / _RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")


def printable(text, limit=300):
    """`text` safe for a terminal: control and other non-printing characters (ESC and its colour or
    cursor codes, carriage returns, bidi overrides) written as escapes like \\x1b, at most `limit` chars."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _parse_answer(text):
    try:
        answer = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _describe(exc):
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "no answer within the timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
