"""Run folders as runs: `cr-accel dashboard --runs DIR` reads every run folder under DIR into the store and
keeps reading them as they grow, so a run shows on the dashboard without ever having reported to it.

A run folder is a folder holding a metrics.csv or a steps.csv, found up to MAX_DEPTH levels below DIR (DIR
itself may be one); hidden folders and a run's own checkpoints/, samples/ and trackers/ are not entered.
What is read from it:
    dashboard_run_id   its run id: the run is then the very run the trainer reported to the server, and the
                       folder fills in what never arrived; without it (or when a folder found earlier, in
                       path order, has the same id: a copied folder), an id made from the folder's path
    metrics.csv        the epochs
    steps.csv          the step records
    config.yaml        the resolved config (yaml.safe_load)
    environment.json   info; world size and device from it
    samples/epoch_NNNN.png   the highest-numbered picture
    train.log          the status: `training <status> after ...` on its last line (the tracker's own
                       `dashboard` notices after it aside), else running
A CSV file is read from where the last scan stopped, complete lines only. One that was replaced (another
inode), shrank or got another header (the trainer rewrites it after a resume, or to widen its header) is
read again whole, and the records after its last row are forgotten: the resumed run trains them again.
The other files are read again when their modification time changes. Everything goes into the store through
its methods, so the server reads a folder's run like any other; runs deleted on the page stay deleted (the
store remembers their ids).
"""

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
from pathlib import Path

from .schema import END_STATUSES, MAX_STEP_RECORDS, PNG_SIGNATURE, valid_run_id

logger = logging.getLogger("cr_accel.dashboard.folders")

MAX_DEPTH = 4  # levels below a --runs folder searched for run folders
RUN_FILES = ("metrics.csv", "steps.csv")
_NOT_RUNS = {"checkpoints", "samples", "trackers", "__pycache__"}
_SAMPLES = re.compile(r"epoch_(\d+)\.png")
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S*\s+(.*)")
_END_LINE = re.compile(r"training (\w+) after ")


class FolderImporter:
    """Reads the run folders under `roots` into `store`; call scan() again to read what changed."""

    def __init__(self, store, roots):
        self.store = store
        self.roots = [Path(r).resolve() for r in roots]
        self._folders = {}  # resolved path -> _Folder

    def scan(self):
        """One look at every run folder; returns the run ids seen."""
        claimed = {f.run_id for f in self._folders.values()}
        seen = set()
        for root in self.roots:
            for path in _find(root, MAX_DEPTH):
                real = path.resolve()
                if real in seen:  # also reached through a link (e.g. runs/latest -> runs/exp3): one run
                    continue
                seen.add(real)
                folder = self._folders.get(real)
                if folder is None:
                    folder = self._folders[real] = _Folder(real, _run_id(path, root, claimed))
                    claimed.add(folder.run_id)
                folder.sync(self.store)
        return sorted(claimed)


class FolderWatcher:
    """A FolderImporter scanned every `interval` seconds on a daemon thread (the first scan at once)."""

    def __init__(self, store, roots, interval):
        self.importer = FolderImporter(store, roots)
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cr_accel-run-folders", daemon=True)
        self._said = set()

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(10)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.importer.scan()
            except Exception as exc:  # a bug or an odd file: say it once, keep watching
                if type(exc) not in self._said:
                    self._said.add(type(exc))
                    logger.exception("dashboard: reading the run folders failed: %s", exc)
            self._stop.wait(self.interval)


def _find(root, depth):
    """Run folders at or below `root` (resolved paths), not entering a run folder."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    if any(e.name in RUN_FILES and e.is_file() for e in entries):
        yield Path(root)
        return
    if depth == 0:
        return
    for entry in sorted(entries, key=lambda e: e.name):
        # Links to folders are followed (runs linked into one place); MAX_DEPTH bounds a loop of links.
        if not entry.name.startswith(".") and entry.name not in _NOT_RUNS and entry.is_dir():
            yield from _find(entry.path, depth - 1)


def _run_id(path, root, claimed):
    """The id in the folder's dashboard_run_id (unless another folder has it: a copied run), else one made
    from the path: readable, and stable across scans and server restarts."""
    try:
        text = (path / "dashboard_run_id").read_text().strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if valid_run_id(text) and text not in claimed:
        return text
    relative = path.relative_to(root).as_posix() if path != root else root.name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", relative).strip("-._")[-80:].lstrip("-._") or "run"
    return f"{slug}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


class _Folder:
    """One run folder and how far it has been read."""

    def __init__(self, path, run_id):
        self.path, self.run_id = path, run_id
        self._reset()

    def _reset(self):
        self.epochs = _CsvFile(self.path / "metrics.csv")
        self.steps = _CsvFile(self.path / "steps.csv")
        self.seen = {}  # file name -> modification time last read
        self.status = None
        self.deleted = False

    def sync(self, store):
        outcome = store.import_run(self.run_id, self.path.name, str(self.path), self._created_at())
        if outcome == "deleted":
            self.deleted = True
            return
        if self.deleted:  # started again by a run after its deletion: read everything again
            self._reset()
        self._sync_epochs(store)
        self._sync_steps(store)
        self._sync_config(store)
        self._sync_samples(store)
        self._sync_status(store, outcome == "new")
        newest = max((_mtime(self.path / n) or 0 for n in (*RUN_FILES, "train.log")), default=0)
        store.update_run(self.run_id, updated_at=newest or None)

    def _created_at(self):
        times = [t for t in (_mtime(self.path / n) for n in ("config.yaml", "environment.json", "train.log",
                                                           *RUN_FILES)) if t]
        return min(times) if times else 0.0

    def _sync_epochs(self, store):
        rows, rewritten = self.epochs.read()
        records = []
        for row in rows:
            epoch = _int(row.pop("epoch", None))
            step = _int(row.pop("step", None))
            if epoch is not None and epoch >= 1:
                records.append((epoch, step, _metrics(row)))
        if rows or rewritten:
            after = max((r[0] for r in records), default=0) if rewritten else None
            store.put_epochs(self.run_id, records, after=after)

    def _sync_steps(self, store):
        rows, rewritten = self.steps.read()
        records = []
        for row in rows:
            step, epoch = _int(row.pop("step", None)), _int(row.pop("epoch", None))
            if step is not None and epoch is not None and step >= 1 and epoch >= 1:
                records.append((step, epoch, _metrics(row)))
        after = max((r[0] for r in records), default=0) if rewritten else None
        if rewritten:
            store.put_steps(self.run_id, [], after=after)
        for i in range(0, len(records), MAX_STEP_RECORDS):  # one transaction each: requests are not held up
            store.put_steps(self.run_id, records[i:i + MAX_STEP_RECORDS])

    def _sync_config(self, store):
        config = self._changed("config.yaml", _read_yaml)
        env = self._changed("environment.json", lambda p: json.loads(p.read_text()))
        fields = {}
        if isinstance(config, dict):
            fields["config"] = config
        if isinstance(env, dict):
            fields["info"] = env
            if isinstance(env.get("world_size"), int) and env["world_size"] >= 1:
                fields["world_size"] = env["world_size"]
            if isinstance(env.get("device"), str):
                fields["device"] = env["device"][:200]
        if fields:
            store.update_run(self.run_id, **fields)

    def _sync_samples(self, store):
        try:
            names = [(int(m.group(1)), e.name) for e in os.scandir(self.path / "samples")
                     if (m := _SAMPLES.fullmatch(e.name))]
        except OSError:
            return
        if not names:
            return
        epoch, name = max(names)
        png = self._changed(f"samples/{name}", lambda p: p.read_bytes())
        if isinstance(png, bytes) and png.startswith(PNG_SIGNATURE) and epoch >= 1:
            store.put_samples(self.run_id, epoch, png)

    def _sync_status(self, store, new):
        tail = self._changed("train.log", _read_tail)
        if tail is None:
            status = self.status or "running"
        else:
            status = _status(tail)
        if status == self.status:
            return
        first = self.status is None
        self.status = status
        # On first sight, a folder that says "running" does not overrule how the server saw the run end: the
        # tracker's end message is the later news (the train.log line comes first).
        if first and not new and status == "running":
            return
        store.set_status(self.run_id, status, _mtime(self.path / "train.log"))

    def _changed(self, name, read):
        """read(path) when the file's modification time changed since the last time, else None."""
        path = self.path / name
        mtime = _mtime(path)
        if mtime is None or self.seen.get(name) == mtime:
            return None
        try:
            value = read(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # half-written or not what it should be
            logger.debug("dashboard: cannot read %s: %s", path, exc)
            return None
        self.seen[name] = mtime
        return value


class _CsvFile:
    """A CSV file read as it grows: read() -> (rows as {column: text}, rewritten)."""

    def __init__(self, path):
        self.path = path
        self.inode = self.header = None
        self.offset = 0

    def read(self):
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                header = f.readline()
                if not header.endswith(b"\n"):
                    return [], False  # the header is being written
                rewritten = self.inode is not None and (
                    st.st_ino != self.inode or st.st_size < self.offset or header != self.header)
                if self.inode is not None and not rewritten:
                    f.seek(self.offset)
                data = f.read()
        except OSError:
            return [], False
        end = data.rfind(b"\n") + 1  # complete lines only: the trainer may be writing the next one
        start_offset = len(header) if (self.inode is None or rewritten) else self.offset
        self.inode, self.header, self.offset = st.st_ino, header, start_offset + end
        columns = next(csv.reader([header.decode("utf-8", "replace")]))
        text = data[:end].decode("utf-8", "replace")
        rows = [dict(zip(columns, cells)) for cells in csv.reader(io.StringIO(text)) if cells]
        return rows, rewritten


def _metrics(row):
    """CSV cells as metrics: numbers, None for nan/inf; empty cells and text are left out."""
    out = {}
    for name, text in row.items():
        if not name or text is None or text == "":
            continue
        try:
            value = float(text)
        except ValueError:
            continue
        out[name] = value if math.isfinite(value) else None
    return out


def _int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            value = float(text)
        except (TypeError, ValueError):
            return None
        return int(value) if value.is_integer() else None


def _status(tail):
    """The run's status from the end of its train.log."""
    for line in reversed(tail.splitlines()):
        match = _LOG_LINE.match(line)
        message = (match.group(1) if match else line).strip()
        if not message or message.startswith(("dashboard", "cr_accel dashboard")):
            continue
        end = _END_LINE.match(message)
        return end.group(1) if end and end.group(1) in END_STATUSES else "running"
    return "running"


def _read_tail(path, size=16384):
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - size))
        return f.read().decode("utf-8", "replace")


def _read_yaml(path):
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def _mtime(path):
    try:
        return path.stat().st_mtime
    except OSError:
        return None
