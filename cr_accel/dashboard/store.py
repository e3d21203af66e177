"""Where the dashboard keeps runs: one SQLite file (WAL mode), so history survives a server restart.

Tables:
    runs    one row per run id: name, status, config (JSON), world size, device, times, latest sample PNG,
            the run folder it was read from (if any)
    epochs  one row per (run_id, epoch): step and the epoch's metrics (JSON); a re-sent epoch replaces
            its row, so a retried POST never duplicates and a resumed run's re-run epochs win
    steps, step_buckets   step records and their summaries for downsampled reads (step_store.py)
    deleted_runs          ids deleted on the page: a run folder never brings them back (folders.py)

All writes are idempotent: a client may re-send any message after a lost response.
One connection is shared by the server's request threads behind a lock: SQLite serializes writers
anyway, and the dashboard's load (a few requests a second) is far below what that costs.
"""

import contextlib
import json
import sqlite3
import threading
import time

from . import step_store

SCHEMA_VERSION = 2  # 1: runs, epochs. 2: steps, step_buckets, deleted_runs; runs.folder, .step_width, .step_count

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    config        TEXT,
    info          TEXT,
    world_size    INTEGER,
    device        TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    ended_at      REAL,
    end_message   TEXT,
    samples_epoch INTEGER,
    samples_png   BLOB,
    folder        TEXT,
    step_width    INTEGER,
    step_count    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id      TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    epoch       INTEGER NOT NULL,
    step        INTEGER,
    metrics     TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS deleted_runs (
    run_id     TEXT PRIMARY KEY,
    deleted_at REAL NOT NULL
);
""" + step_store.SCHEMA
# What version 1 lacks besides the new tables (which CREATE TABLE IF NOT EXISTS adds).
_MIGRATE_FROM_1 = ("ALTER TABLE runs ADD COLUMN folder TEXT", "ALTER TABLE runs ADD COLUMN step_width INTEGER",
                   "ALTER TABLE runs ADD COLUMN step_count INTEGER NOT NULL DEFAULT 0")

# Run columns a listing returns (never the PNG blob).
_RUN_COLUMNS = ("run_id", "name", "status", "world_size", "device", "created_at", "updated_at", "ended_at",
                "end_message", "samples_epoch", "folder")


class StoreError(Exception):
    """The database file cannot be used (not SQLite, or written by an incompatible version)."""


class RunStore:
    def __init__(self, path):
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise StoreError(f"database `{self.path}` has schema version {version}; this cr_accel reads "
                                 f"version {SCHEMA_VERSION}. Use another --db file")
            if version == 1:  # a file of an earlier cr_accel: its runs stay, step records start empty
                for statement in _MIGRATE_FROM_1:
                    self._db.execute(statement)
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot use `{self.path}` as the dashboard database: {exc}") from None

    @contextlib.contextmanager
    def _transaction(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self):
        with self._lock:
            self._db.close()

    def _exists(self, run_id):
        return self._db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is not None

    def _put_epochs(self, run_id, rows, now):
        self._db.executemany(
            """INSERT INTO epochs (run_id, epoch, step, metrics, received_at) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(run_id, epoch) DO UPDATE SET
                 step=excluded.step, metrics=excluded.metrics, received_at=excluded.received_at""",
            [(run_id, epoch, step, _dumps(metrics), now) for epoch, step, metrics in rows],
        )

    def _put_samples(self, run_id, epoch, png):
        # Only the latest picture is kept (a late retry of an older epoch must not replace it).
        self._db.execute(
            """UPDATE runs SET samples_png=?, samples_epoch=?
               WHERE run_id=? AND (samples_epoch IS NULL OR samples_epoch<=?)""",
            (png, epoch, run_id, epoch),
        )

    # ------------------------------------------------------------ writes

    def start_run(self, run_id, name, config=None, info=None, world_size=None, device=None, epochs_done=None,
                  steps_done=None):
        """Create the run, or (a re-sent start, or a resumed run) update it and mark it running again.

        `epochs_done`, `steps_done`: the epochs and optimizer steps the run has finished as it (re)starts;
        epochs and step records after them are deleted, as the resumed run trains them again. A run deleted
        earlier comes back: a live run reporting is news. Returns True when the run is new.
        """
        now = time.time()
        with self._transaction():
            existed = self._db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is not None
            self._db.execute(
                """INSERT INTO runs (run_id, name, status, config, info, world_size, device, created_at, updated_at)
                   VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(run_id) DO UPDATE SET
                     name=excluded.name, status='running',
                     config=COALESCE(excluded.config, runs.config), info=COALESCE(excluded.info, runs.info),
                     world_size=COALESCE(excluded.world_size, runs.world_size),
                     device=COALESCE(excluded.device, runs.device),
                     updated_at=excluded.updated_at, ended_at=NULL, end_message=NULL""",
                (run_id, name, _dumps(config), _dumps(info), world_size, device, now, now),
            )
            if epochs_done is not None:
                self._db.execute("DELETE FROM epochs WHERE run_id=? AND epoch>?", (run_id, epochs_done))
            if steps_done is not None:
                step_store.delete_after(self._db, run_id, steps_done)
            self._db.execute("DELETE FROM deleted_runs WHERE run_id=?", (run_id,))
        return not existed

    def add_epoch(self, run_id, epoch, metrics, step=None, samples_png=None):
        """Store one epoch (replacing a row already there for it). False if the run is unknown."""
        now = time.time()
        with self._transaction():
            if not self._exists(run_id):
                return False
            self._put_epochs(run_id, [(epoch, step, metrics)], now)
            self._db.execute("UPDATE runs SET updated_at=? WHERE run_id=?", (now, run_id))
            if samples_png is not None:
                self._put_samples(run_id, epoch, samples_png)
        return True

    def add_steps(self, run_id, records):
        """Store step records [(step, epoch, metrics)] (replacing rows already there for their steps).
        False if the run is unknown."""
        now = time.time()
        with self._transaction():
            if not self._exists(run_id):
                return False
            step_store.add(self._db, run_id, records, now)
            self._db.execute("UPDATE runs SET updated_at=? WHERE run_id=?", (now, run_id))
        return True

    def end_run(self, run_id, status, message=None):
        """Record how the run ended. False if the run is unknown."""
        now = time.time()
        with self._transaction():
            cur = self._db.execute(
                "UPDATE runs SET status=?, end_message=?, ended_at=?, updated_at=? WHERE run_id=?",
                (status, message, now, now, run_id),
            )
        return cur.rowcount > 0

    def delete_run(self, run_id):
        """Remove the run with its epochs and steps, and remember that it was deleted (a run folder does not
        bring it back; a start message does). False if the run is unknown."""
        with self._transaction():
            cur = self._db.execute("DELETE FROM runs WHERE run_id=?", (run_id,))
            if cur.rowcount:
                self._db.execute("INSERT OR REPLACE INTO deleted_runs (run_id, deleted_at) VALUES (?, ?)",
                                 (run_id, time.time()))
        return cur.rowcount > 0

    # ------------------------------------------------------------ writes of the folder importer

    def import_run(self, run_id, name, folder, created_at):
        """Make sure the run exists, for a run folder: "deleted" (left alone), "new" or "known"."""
        with self._transaction():
            if self._db.execute("SELECT 1 FROM deleted_runs WHERE run_id=?", (run_id,)).fetchone():
                return "deleted"
            if self._exists(run_id):
                self._db.execute("UPDATE runs SET folder=COALESCE(folder, ?) WHERE run_id=?", (folder, run_id))
                return "known"
            self._db.execute("""INSERT INTO runs (run_id, name, status, created_at, updated_at, folder)
                                VALUES (?, ?, 'running', ?, ?, ?)""", (run_id, name, created_at, created_at, folder))
            return "new"

    def update_run(self, run_id, updated_at=None, **fields):
        """Set some of config, info, world_size, device (None: unchanged); `updated_at` only moves forward."""
        allowed = {"config", "info", "world_size", "device"}
        assert set(fields) <= allowed, fields
        with self._transaction():
            for key, value in fields.items():
                if value is not None:
                    value = _dumps(value) if key in ("config", "info") else value
                    self._db.execute(f"UPDATE runs SET {key}=? WHERE run_id=?", (value, run_id))
            if updated_at is not None:
                self._db.execute("UPDATE runs SET updated_at=MAX(updated_at, ?) WHERE run_id=?", (updated_at, run_id))

    def put_epochs(self, run_id, rows, after=None):
        """Store epochs [(epoch, step, metrics)]; `after` (an epoch number): first delete the epochs after it."""
        with self._transaction():
            if after is not None:
                self._db.execute("DELETE FROM epochs WHERE run_id=? AND epoch>?", (run_id, after))
            self._put_epochs(run_id, rows, time.time())

    def put_steps(self, run_id, records, after=None):
        """Store step records [(step, epoch, metrics)]; `after` (a step): first delete the records after it."""
        with self._transaction():
            if after is not None:
                step_store.delete_after(self._db, run_id, after)
            if records:
                step_store.add(self._db, run_id, records, time.time())

    def put_samples(self, run_id, epoch, png):
        """The samples picture of `epoch`, kept if no later epoch's picture is there."""
        with self._transaction():
            self._put_samples(run_id, epoch, png)

    def set_status(self, run_id, status, at):
        """A run folder's status: running, or how it ended (`at`: when)."""
        with self._transaction():
            if status == "running":
                self._db.execute("UPDATE runs SET status='running', ended_at=NULL WHERE run_id=?", (run_id,))
            else:
                self._db.execute("UPDATE runs SET status=?, ended_at=? WHERE run_id=?", (status, at, run_id))

    # ------------------------------------------------------------ reads

    def list_runs(self):
        """Every run, newest first, with its epoch count, last epoch's metrics and last step."""
        cols = ", ".join(f"r.{c}" for c in _RUN_COLUMNS)
        with self._lock:
            rows = self._db.execute(
                f"""SELECT {cols},
                      (SELECT COUNT(*) FROM epochs e WHERE e.run_id=r.run_id) AS epochs,
                      (SELECT e.metrics FROM epochs e WHERE e.run_id=r.run_id ORDER BY e.epoch DESC LIMIT 1)
                        AS last_metrics,
                      (SELECT MAX(e.epoch) FROM epochs e WHERE e.run_id=r.run_id) AS last_epoch,
                      (SELECT MAX(s.step) FROM steps s WHERE s.run_id=r.run_id) AS last_step
                    FROM runs r ORDER BY r.created_at DESC, r.run_id"""
            ).fetchall()
        out = []
        for row in rows:
            run = {c: row[c] for c in _RUN_COLUMNS}
            run.update(epochs=row["epochs"], last_epoch=row["last_epoch"], last_metrics=_loads(row["last_metrics"]),
                       last_step=row["last_step"])
            out.append(run)
        return out

    def get_run(self, run_id):
        """One run with its config and info, or None."""
        cols = ", ".join(_RUN_COLUMNS)
        with self._lock:
            row = self._db.execute(
                f"""SELECT {cols}, config, info,
                      (SELECT COUNT(*) FROM epochs e WHERE e.run_id=runs.run_id) AS epochs
                    FROM runs WHERE run_id=?""", (run_id,)
            ).fetchone()
        if row is None:
            return None
        run = {c: row[c] for c in _RUN_COLUMNS}
        run.update(config=_loads(row["config"]), info=_loads(row["info"]), epochs=row["epochs"])
        return run

    def get_epochs(self, run_id, after=0):
        """The run's epochs after `after`, in order; None if the run is unknown."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is None:
                return None
            rows = self._db.execute(
                "SELECT epoch, step, metrics, received_at FROM epochs WHERE run_id=? AND epoch>? ORDER BY epoch",
                (run_id, after),
            ).fetchall()
        return [{"epoch": r["epoch"], "step": r["step"], "metrics": _loads(r["metrics"]),
                 "received_at": r["received_at"]} for r in rows]

    def get_steps(self, run_id, max_points, after=0):
        """The run's step records after step `after`, downsampled to at most `max_points` points per series
        (step_store.read); None if the run is unknown."""
        with self._lock:
            if not self._exists(run_id):
                return None
            return step_store.read(self._db, run_id, max_points, after)

    def step_rows(self, run_id):
        """Every step record of the run [(step, epoch, metrics)], or None if the run is unknown."""
        with self._lock:
            if not self._exists(run_id):
                return None
            return step_store.rows(self._db, run_id)

    def get_samples(self, run_id):
        """(epoch, png bytes) of the latest sample picture, or None."""
        with self._lock:
            row = self._db.execute("SELECT samples_epoch, samples_png FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None or row["samples_png"] is None:
            return None
        return row["samples_epoch"], bytes(row["samples_png"])


def _dumps(value):
    return None if value is None else json.dumps(value, allow_nan=False, separators=(",", ":"))


def _loads(text):
    return None if text is None else json.loads(text)
