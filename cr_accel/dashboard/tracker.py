"""DashboardTracker: sends a run's start, epochs and end to `cr-accel dashboard`, never slowing training.

    tracker = DashboardTracker("http://127.0.0.1:8765", run_name="mnist-mlp", token=None,
                               start_info={"world_size": 2, "device": "cuda:0"})
    accelerator = Accelerator(log_with=[tracker])
    accelerator.init_trackers("cr_accel", config=cfg.to_dict())       # start message (with the config)
    accelerator.log({"epoch": 1, "train_loss": 0.3, ...}, step=1)     # one epoch message
    tracker.set_status("finished"); accelerator.end_training()        # end message, flushed for <= 3 s

How it stays out of the way: `log()` only converts the values and appends them to an in-memory queue.
A daemon thread sends the queue in order, one message at a time, each with a short timeout. While the
dashboard is down, slow, or answers errors or garbage, the messages wait and are retried with backoff
(one warning line when it becomes unreachable, one when it is back), so the history has no holes. The
queue is bounded: past `max_pending`, the oldest epoch messages are dropped (never the start message),
and only the newest pending message keeps its samples picture (the dashboard shows only the latest).
`finish()` waits at most `finish_timeout` seconds to flush, then gives up without raising. No method
raises into the training loop.

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

from .schema import (END_STATUSES, MAX_BODY_BYTES, SKIP, START_FIELDS, check_url, metric_value, new_run_id,
                     plain_json, valid_run_id)

logger = logging.getLogger("cr_accel.dashboard")

_RUN_ID_FILE = "dashboard_run_id"


class _Message:
    __slots__ = ("kind", "path", "payload", "png", "restarts")

    def __init__(self, kind, path, payload, png=None):
        self.kind, self.path, self.payload, self.png, self.restarts = kind, path, payload, png, 0


class DashboardTracker(GeneralTracker):
    name = "cr_accel_dashboard"
    requires_logging_directory = False

    def __init__(self, url, run_name, token=None, run_id=None, timeout=2.0, max_pending=10000,
                 finish_timeout=3.0, start_info=None, retry_initial=0.5, retry_max=10.0,
                 max_body=MAX_BODY_BYTES):
        """`url`: the dashboard's address (http or https, e.g. http://127.0.0.1:8765).
        `run_id`: letters, digits, '.', '_', '-' (default: the name, the time and a random suffix; see
        `run_id_for` to keep one id across a resumed run). `start_info`: extra start-message fields:
        config, info, world_size, device, epochs_done. `timeout`: seconds per request; `retry_initial`
        and `retry_max`: the backoff between tries while the dashboard is unreachable.
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
        self._start_payload = {"run_id": self.run_id, "name": self.run_name, **plain_json(start_info or {})}
        self.status = None
        self.sent = 0  # messages delivered
        self.dropped = 0  # messages given up on: queue bound, rejected by the server, or left at finish()
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._in_flight = None
        self._thread = None
        self._started = self._finished = self._closing = self._hurry = False
        self._down = False
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

    def set_start_info(self, **fields):
        """More start-message fields (config, info, world_size, device, epochs_done), known after
        construction: call before init_trackers to send them with the start. Later calls send an update
        (without epochs_done, which only the first start may carry). Raises ValueError for unknown keys."""
        _check_start_info(fields)
        fields = plain_json(fields)
        if not self._started:
            self._start_payload = {**self._start_payload, **fields}
        else:
            self._guard(self._update_start, {k: v for k, v in fields.items() if k != "epochs_done"})

    def set_status(self, status):
        """How the run ended, sent by finish(): finished, failed, preempted or stopped_early."""
        if status in END_STATUSES:
            self.status = status
        else:
            self._warn_once(f"status:{status}", f"cr_accel dashboard: unknown status {status!r} ignored; "
                                                 f"one of {', '.join(END_STATUSES)}")

    def finish(self):
        """Queue the end message and wait at most `finish_timeout` s for the queue to drain. Never raises."""
        self._guard(self._finish)

    # ------------------------------------------------------------ extras

    @property
    def pending(self):
        """Messages not delivered yet."""
        with self._cond:
            return len(self._queue)

    def flush(self, timeout=None):
        """Wait until every queued message is delivered or given up on; True if the queue is empty."""
        deadline = time.monotonic() + (self.finish_timeout if timeout is None else timeout)
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            while self._queue and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
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
                    if msg.kind == "epoch" and msg is not self._in_flight:
                        msg.png = None
            self._enqueue(_Message("epoch", f"/api/runs/{self.run_id}/epochs", payload, png))

    def _finish(self):
        self._ensure_started()
        with self._cond:
            if self._finished:
                return
            self._finished = True
            end = {"status": self.status or "finished"}
            self._enqueue(_Message("end", f"/api/runs/{self.run_id}/end", end))
        self.flush(self.finish_timeout)
        with self._cond:
            self._closing = True  # the thread stops after its current try
            left = len(self._queue)
            if left:
                self.dropped += left
                self._queue.clear()
            self._cond.notify_all()
        if left:
            # INFO, not WARNING: the outage was already reported once; `dropped` has the count.
            logger.info("cr_accel dashboard: %d message(s) not delivered to %s within %.1f s; left out",
                        left, self.url, self.finish_timeout)

    def _resent_start(self):
        """A start message sent again (config update, or a server that lost the run). Without
        `epochs_done`: only the first start may tell the server to forget later epochs."""
        payload = {k: v for k, v in self._start_payload.items() if k != "epochs_done"}
        return _Message("start", "/api/runs", payload)

    def _enqueue(self, msg):
        """Append (lock held); past the bound, drop the oldest epoch message that is not being sent."""
        self._queue.append(msg)
        if len(self._queue) > self.max_pending:
            for old in self._queue:
                if old.kind == "epoch" and old is not self._in_flight and old is not msg:
                    self._queue.remove(old)
                    self.dropped += 1
                    self._warn_once("full", f"cr_accel dashboard: {self.max_pending} messages waiting for "
                                            f"{self.url}; dropping the oldest epochs from now on")
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
                msg = self._in_flight = self._queue[0]
                payload, png = msg.payload, msg.png
            outcome, detail = self._deliver(msg, payload, png)
            with self._cond:
                self._in_flight = None
                if outcome == "ok" and msg.payload is not payload:
                    pass  # changed while on its way (the config arrived): send the new version too
                elif outcome in ("ok", "drop") and self._queue and self._queue[0] is msg:
                    self._queue.popleft()
                    if outcome == "ok":
                        self.sent += 1
                    else:
                        self.dropped += 1
                elif outcome == "restart":  # the server does not know the run: send the start again first
                    msg.restarts += 1
                    self._queue.appendleft(self._resent_start())
                self._cond.notify_all()
            if outcome == "retry":
                if not self._down:
                    self._down = True
                    logger.warning("cr_accel dashboard: cannot deliver to %s (%s); training continues, metrics "
                                   "are kept and sent when it answers", self.url, detail)
                with self._cond:
                    if not self._closing:
                        self._cond.wait(min(delay, 0.1) if self._hurry else delay)
                delay = min(delay * 2, self.retry_max)
                continue
            delay = self.retry_initial
            if self._down and outcome != "retry":
                self._down = False
                logger.warning("cr_accel dashboard: reconnected to %s; sending %d waiting message(s)",
                               self.url, self.pending)
            if outcome == "drop":
                self._warn_once(f"drop:{msg.kind}:{detail.split(':')[0]}",
                                f"cr_accel dashboard: {self.url} rejected a {msg.kind} message ({detail}); left out")

    def _deliver(self, msg, payload, png):
        """One try: ("ok" | "retry" | "drop" | "restart", detail). The detail quotes what the server sent,
        so it is made printable here, before any warning shows it."""
        try:
            outcome, detail = self._try(msg, payload, png)
        except Exception as exc:  # not a network error: a bug or an odd value; the thread must not die
            outcome, detail = "retry", f"{type(exc).__name__}: {exc}"
        return outcome, printable(detail)

    def _try(self, msg, payload, png):
        try:
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
            logger.warning(message)


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
