"""`cr-accel dashboard`: a small HTTP server (standard library only) that stores runs and shows them live.

    cr-accel dashboard --db runs.sqlite            # then open http://127.0.0.1:8765
    cr-accel dashboard --runs runs/                # also show every run folder under runs/ (folders.py)
    server = make_server("127.0.0.1", 0, "runs.sqlite", token="s3cret")   # in tests: any free port
    threading.Thread(target=server.serve_forever, daemon=True).start(); ...; server.shutdown()

API (JSON in and out; message fields in schema.py):
    GET  /                              the page (its script and uPlot under /static/, see assets.py)
    GET  /api/runs                      every run, newest first, with its last epoch's metrics and last step
    GET  /api/runs/<id>                 one run with its config
    GET  /api/runs/<id>/epochs[?after=N]  its epochs (after epoch N)
    GET  /api/runs/<id>/steps?max_points=N[&after=S]  its step records after step S, downsampled on the
                                        server to at most N points per series (step_store.py)
    GET  /api/runs/<id>/metrics.csv     its epochs as a CSV download (export.py)
    GET  /api/runs/<id>/steps.csv       its step records as a CSV download
    GET  /api/runs/<id>/samples.png     the latest sample picture
    POST /api/runs                      start a run          (token required when the server has one)
    POST /api/runs/<id>/epochs          one epoch's metrics  (token required when the server has one)
    POST /api/runs/<id>/steps           step records         (token required when the server has one)
    POST /api/runs/<id>/end             how it ended         (token required when the server has one)
    DELETE /api/runs/<id>               remove the run       (token required when the server has one)

Writes need `Authorization: Bearer <token>` when --token is set; reads stay open, so the page needs no
login: the server listens on 127.0.0.1 unless told otherwise, and what it shows is training curves.
Writes also need `Content-Type: application/json`, which a web page from another site cannot send
without the browser asking first (and this server never says yes), so a page cannot post fake runs; nor
can it send a DELETE, which always needs that preflight.
Bad input is answered with a 4xx and {"ok": false, "error": "..."}; the server keeps serving. A client
that stalls mid-request gets 408 after `request_timeout` seconds (default 5), its thread freed.
Every response carries security headers (`SECURITY_HEADERS`, and a Content-Security-Policy that allows
scripts from this server only, requests to this server only, and no framing: assets.py).
"""

import argparse
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import assets, export, schema
from .store import RunStore, StoreError

logger = logging.getLogger("cr_accel.dashboard.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "CR_ACCEL_DASHBOARD_TOKEN"
DEFAULT_REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request line, headers or body
DEFAULT_SCAN_INTERVAL = 2.0  # seconds between two looks at the run folders (--runs); the page polls as often
DEFAULT_MAX_POINTS = 2000
MAX_POINTS = 100_000
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # a PNG or JSON answer is never run as a script or page
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # with CSP frame-ancestors: no clickjacking in a frame
    "Cross-Origin-Resource-Policy": "same-origin",
}
_RUN = rf"/api/runs/(?P<run_id>{schema.RUN_ID_PATTERN})"
# (path pattern, {method: handler name}); a path that matches none is a 404, a method not listed a 405.
_ROUTES = [
    (re.compile(r"/"), {"GET": "page"}),
    (re.compile(r"/index\.html"), {"GET": "page"}),
    (re.compile(r"/static/(?P<name>[A-Za-z0-9._-]+)"), {"GET": "static"}),
    (re.compile(r"/api/runs"), {"GET": "list_runs", "POST": "start_run"}),
    (re.compile(_RUN), {"GET": "get_run", "DELETE": "delete_run"}),
    (re.compile(_RUN + r"/epochs"), {"GET": "get_epochs", "POST": "add_epoch"}),
    (re.compile(_RUN + r"/steps"), {"GET": "get_steps", "POST": "add_steps"}),
    (re.compile(_RUN + r"/metrics\.csv"), {"GET": "metrics_csv"}),
    (re.compile(_RUN + r"/steps\.csv"), {"GET": "steps_csv"}),
    (re.compile(_RUN + r"/end"), {"POST": "end_run"}),
    (re.compile(_RUN + r"/samples\.png"), {"GET": "get_samples"}),
]


class HTTPError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = HTTPStatus(status), message, headers or {}


class DashboardServer(ThreadingHTTPServer):
    """The HTTP server with its store and settings; `url` is where it listens."""

    daemon_threads = True  # a hanging client never keeps the process alive
    allow_reuse_address = True

    def __init__(self, address, store, token=None, verbose=False, max_body=schema.MAX_BODY_BYTES,
                 request_timeout=DEFAULT_REQUEST_TIMEOUT, runs_dirs=(), scan_interval=DEFAULT_SCAN_INTERVAL):
        self.store, self.token, self.verbose, self.max_body = store, token or None, verbose, max_body
        self.request_timeout = float(request_timeout)
        self.folders = None
        super().__init__(address, Handler)
        if runs_dirs:  # after the bind: a busy port leaves no thread behind
            from .folders import FolderWatcher

            self.folders = FolderWatcher(store, runs_dirs, scan_interval)
            self.folders.start()

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request, client_address):
        # A client that disconnects mid-answer is not worth a traceback on the console.
        if self.verbose:
            super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        if self.folders:
            self.folders.stop()
        self.store.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "cr_accel-dashboard"

    def setup(self):
        # The socket timeout for everything read from the client (StreamRequestHandler applies it): a
        # stalled request frees its thread; a stalled body gets 408 (`_read_json`).
        self.timeout = self.server.request_timeout
        super().setup()

    def end_headers(self):
        # Every response, including the ones http.server makes itself (send_error: bad request lines).
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Content-Security-Policy", assets.CONTENT_SECURITY_POLICY)
        super().end_headers()

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------ plumbing

    def _dispatch(self, method):
        try:
            url = urlsplit(self.path)
            handler, params = self._route(method, url.path)
            if method == "POST":
                self._check_token()
                body = self._read_json()
                handler(body, **params)
            elif method == "DELETE":
                self._check_token()
                if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get(
                        "Transfer-Encoding"):
                    self.close_connection = True  # a body is not read: the connection cannot be reused
                handler(**params)
            else:
                handler(_query(url.query), **params)
        except HTTPError as exc:
            self._send_json({"ok": False, "error": exc.message}, exc.status, exc.headers)
        except Exception:  # a bug, not bad input: say so without killing the server
            logger.error("dashboard: error answering %s %s\n%s", method, self.path, traceback.format_exc())
            self._send_json({"ok": False, "error": "internal server error (see the server's log)"},
                            HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, method, path):
        for pattern, methods in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method not in methods:
                allowed = ", ".join(methods)
                raise HTTPError(405, f"{method} is not allowed on {path}; allowed: {allowed}", {"Allow": allowed})
            return getattr(self, "_" + methods[method]), match.groupdict()
        raise HTTPError(404, f"no such path: {path} (the API is under /api/runs)")

    def _check_token(self):
        token = self.server.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            why = "missing" if not given else "wrong"
            raise HTTPError(401, f"{why} token: writes need `Authorization: Bearer <token>` (the server's --token)",
                            {"WWW-Authenticate": 'Bearer realm="cr_accel"'})

    def _read_json(self):
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise HTTPError(415, f"Content-Type must be application/json, got {ctype or 'none'}")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "chunked bodies are not accepted: send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise HTTPError(411, "a Content-Length header is required")
        if not length.strip().isdigit():
            self.close_connection = True
            raise HTTPError(400, f"invalid Content-Length {length!r}")
        length = int(length)
        if length > self.server.max_body:
            self.close_connection = True  # the body stays unread: this connection cannot be reused
            raise HTTPError(413, f"body of {length} bytes is over the limit of {self.server.max_body} bytes "
                                 "(a smaller samples picture fits)")
        try:
            raw = self.rfile.read(length) if length else b""
        except TimeoutError:  # socket.timeout: the client sent the headers, then stalled
            self.close_connection = True
            raise HTTPError(408, f"the body did not arrive within {self.server.request_timeout:g} s "
                                 f"(Content-Length {length})") from None
        if len(raw) < length:
            self.close_connection = True
            raise HTTPError(400, f"body ended after {len(raw)} of {length} bytes")
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=lambda name: None)  # NaN, Infinity: null
        except UnicodeDecodeError:
            raise HTTPError(400, "body is not UTF-8") from None
        except (ValueError, RecursionError) as exc:
            raise HTTPError(400, f"body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"body must be a JSON object, got {schema.type_name(body)}")
        return body

    def _send_json(self, payload, status=HTTPStatus.OK, headers=None):
        data = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        self._send(data, "application/json", status, headers)

    def _send(self, data, ctype, status=HTTPStatus.OK, headers=None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ------------------------------------------------------------ reads

    def _page(self, query):
        self._send(assets.page_html(), "text/html; charset=utf-8")

    def _static(self, query, name):
        found = assets.static_file(name)
        if found is None:
            raise HTTPError(404, f"no such file: /static/{name}")
        self._send(*found)

    def _list_runs(self, query):
        self._send_json({"ok": True, "now": time.time(), "runs": self.server.store.list_runs()})

    def _get_run(self, query, run_id):
        run = self.server.store.get_run(run_id)
        if run is None:
            raise _unknown_run(run_id)
        self._send_json({"ok": True, "run": run})

    def _get_epochs(self, query, run_id):
        after = query.get("after", "0")
        if not after.isdigit() or int(after) > schema.MAX_EPOCH:
            raise HTTPError(400, f"query `after` must be an epoch number (0 or more), got {after!r}")
        epochs = self.server.store.get_epochs(run_id, int(after))
        if epochs is None:
            raise _unknown_run(run_id)
        self._send_json({"ok": True, "run_id": run_id, "epochs": epochs})

    def _get_steps(self, query, run_id):
        max_points = _int_query(query, "max_points", DEFAULT_MAX_POINTS, 4, MAX_POINTS)
        after = _int_query(query, "after", 0, 0, schema.MAX_STEP)
        steps = self.server.store.get_steps(run_id, max_points, after)
        if steps is None:
            raise _unknown_run(run_id)
        self._send_json({"ok": True, "run_id": run_id, "max_points": max_points, "after": after, **steps})

    def _metrics_csv(self, query, run_id):
        epochs = self.server.store.get_epochs(run_id)
        if epochs is None:
            raise _unknown_run(run_id)
        self._send_csv(export.epochs_csv(epochs), f"{run_id}-metrics.csv")

    def _steps_csv(self, query, run_id):
        records = self.server.store.step_rows(run_id)
        if records is None:
            raise _unknown_run(run_id)
        self._send_csv(export.steps_csv(records), f"{run_id}-steps.csv")

    def _send_csv(self, data, filename):
        # The run id pattern allows no quote or space: the file name needs no escaping.
        self._send(data, "text/csv; charset=utf-8", headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    def _get_samples(self, query, run_id):
        found = self.server.store.get_samples(run_id)
        if found is None:
            if self.server.store.get_run(run_id) is None:
                raise _unknown_run(run_id)
            raise HTTPError(404, f"run `{run_id}` has sent no samples picture yet")
        epoch, png = found
        self._send(png, "image/png", headers={"X-Epoch": str(epoch)})

    # ------------------------------------------------------------ writes

    def _start_run(self, body):
        fields = _checked(schema.check_start, body)
        created = self.server.store.start_run(**fields)
        status = HTTPStatus.CREATED if created else HTTPStatus.OK
        self._send_json({"ok": True, "run_id": fields["run_id"], "created": created}, status)

    def _add_epoch(self, body, run_id):
        epoch, step, metrics, png = _checked(schema.check_epoch, body)
        if not self.server.store.add_epoch(run_id, epoch, metrics, step=step, samples_png=png):
            raise _unknown_run(run_id)
        self._send_json({"ok": True, "run_id": run_id, "epoch": epoch})

    def _add_steps(self, body, run_id):
        records = _checked(schema.check_steps, body)
        if not self.server.store.add_steps(run_id, records):
            raise _unknown_run(run_id)
        self._send_json({"ok": True, "run_id": run_id, "steps": len(records)})

    def _delete_run(self, run_id):
        if not self.server.store.delete_run(run_id):
            raise HTTPError(404, f"unknown run `{run_id}`")
        self._send_json({"ok": True, "run_id": run_id, "deleted": True})

    def _end_run(self, body, run_id):
        status, message = _checked(schema.check_end, body)
        if not self.server.store.end_run(run_id, status, message):
            raise _unknown_run(run_id)
        self._send_json({"ok": True, "run_id": run_id, "status": status})


def _checked(check, body):
    try:
        return check(body)
    except schema.ValidationError as exc:
        raise HTTPError(422, str(exc)) from None


def _unknown_run(run_id):
    return HTTPError(404, f"unknown run `{run_id}`: start it first with POST /api/runs")


def _query(text):
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


def _int_query(query, key, default, low, high):
    text = query.get(key)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise HTTPError(400, f"query `{key}` must be an integer from {low} to {high}, got {text!r}")
    return int(text)


def make_server(host=DEFAULT_HOST, port=DEFAULT_PORT, db_path="runs.sqlite", token=None, verbose=False,
                request_timeout=DEFAULT_REQUEST_TIMEOUT, runs_dirs=(), scan_interval=DEFAULT_SCAN_INTERVAL):
    """A ready DashboardServer (socket bound; port 0 picks a free one, see `.url`). Call serve_forever().
    `request_timeout`: seconds a client may stall mid-request before it gets 408 (or is dropped).
    `runs_dirs`: folders whose run folders are read into the store too, every `scan_interval` seconds."""
    store = RunStore(db_path)
    try:
        return DashboardServer((host, port), store, token=token, verbose=verbose, request_timeout=request_timeout,
                               runs_dirs=runs_dirs, scan_interval=scan_interval)
    except BaseException:
        store.close()
        raise


def parser(prog="cr-accel dashboard"):
    p = argparse.ArgumentParser(prog=prog, description="Live dashboard: receives runs' metrics and shows them.",
                                epilog="example: %(prog)s --db runs.sqlite --port 8765; then in the config: "
                                       "dashboard.enabled=true dashboard.url=http://127.0.0.1:8765")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s: this machine "
                   "only; 0.0.0.0 for every interface, then also set --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0: any free one)")
    p.add_argument("--db", default="runs.sqlite", help="SQLite file holding the runs (default %(default)s)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"require `Authorization: Bearer TOKEN` on writes (default: ${TOKEN_ENV}, else none)")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="S",
                   help="seconds a client may stall mid-request before it gets 408 (default %(default)s)")
    p.add_argument("--runs", action="append", default=[], metavar="DIR",
                   help="also show the run folders under DIR (any folder holding a metrics.csv or steps.csv), "
                        f"re-read every {DEFAULT_SCAN_INTERVAL:g} s as they grow; repeatable")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """`cr-accel dashboard ...`; returns the exit code (2 for a bad address or database)."""
    args = parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be 0-65535, got {args.port}", file=sys.stderr)
        return 2
    if not args.request_timeout > 0:
        print(f"error: --request-timeout must be more than 0 seconds, got {args.request_timeout}", file=sys.stderr)
        return 2
    missing = [d for d in args.runs if not Path(d).is_dir()]
    if missing:
        print(f"error: --runs {missing[0]}: no such folder", file=sys.stderr)
        return 2
    try:
        server = make_server(args.host, args.port, args.db, token=args.token, verbose=args.verbose,
                             request_timeout=args.request_timeout, runs_dirs=args.runs)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
              "(is another dashboard running? choose another --port)", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: listening on {args.host} without --token: anyone who can reach it can post runs",
              file=sys.stderr)
    folders = f"; run folders under {', '.join(args.runs)}" if args.runs else ""
    print(f"cr_accel dashboard on {server.url} (database {args.db}{folders}); Ctrl-C to stop", file=sys.stderr,
          flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a scheduler stopping the job: close the file cleanly
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
