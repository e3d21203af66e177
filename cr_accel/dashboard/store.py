"""Where the dashboard keeps runs: one SQLite file (WAL mode), so history survives a server restart.

Tables:
    runs    one row per run id: name, status, config (JSON), world size, device, times, latest sample PNG
    epochs  one row per (run_id, epoch): step and the epoch's metrics (JSON); a re-sent epoch replaces
            its row, so a retried POST never duplicates and a resumed run's re-run epochs win

All writes are idempotent: a client may re-send any message after a lost response.
One connection is shared by the server's request threads behind a lock: SQLite serializes writers
anyway, and the dashboard's load (a few requests a second) is far below what that costs.
"""

import contextlib
import json
import sqlite3
import threading
import time

SCHEMA_VERSION = 1

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
    samples_png   BLOB
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id      TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    epoch       INTEGER NOT NULL,
    step        INTEGER,
    metrics     TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
"""

# Run columns a listing returns (never the PNG blob).
_RUN_COLUMNS = ("run_id", "name", "status", "world_size", "device", "created_at", "updated_at", "ended_at",
                "end_message", "samples_epoch")


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
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(f"database `{self.path}` has schema version {version}; this cr_accel reads "
                                 f"version {SCHEMA_VERSION}. Use another --db file")
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

    # ------------------------------------------------------------ writes

    def start_run(self, run_id, name, config=None, info=None, world_size=None, device=None, epochs_done=None):
        """Create the run, or (a re-sent start, or a resumed run) update it and mark it running again.

        `epochs_done`: epochs the run has finished as it (re)starts; rows after it are deleted, as the
        resumed run trains those epochs again. Returns True when the run is new.
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
        return not existed

    def add_epoch(self, run_id, epoch, metrics, step=None, samples_png=None):
        """Store one epoch (replacing a row already there for it). False if the run is unknown."""
        now = time.time()
        with self._transaction():
            if self._db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is None:
                return False
            self._db.execute(
                """INSERT INTO epochs (run_id, epoch, step, metrics, received_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(run_id, epoch) DO UPDATE SET
                     step=excluded.step, metrics=excluded.metrics, received_at=excluded.received_at""",
                (run_id, epoch, step, _dumps(metrics), now),
            )
            self._db.execute("UPDATE runs SET updated_at=? WHERE run_id=?", (now, run_id))
            if samples_png is not None:
                # Only the latest picture is kept (a late retry of an older epoch must not replace it).
                self._db.execute(
                    """UPDATE runs SET samples_png=?, samples_epoch=?
                       WHERE run_id=? AND (samples_epoch IS NULL OR samples_epoch<=?)""",
                    (samples_png, epoch, run_id, epoch),
                )
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

    # ------------------------------------------------------------ reads

    def list_runs(self):
        """Every run, newest first, with its epoch count and last epoch's metrics."""
        cols = ", ".join(f"r.{c}" for c in _RUN_COLUMNS)
        with self._lock:
            rows = self._db.execute(
                f"""SELECT {cols},
                      (SELECT COUNT(*) FROM epochs e WHERE e.run_id=r.run_id) AS epochs,
                      (SELECT e.metrics FROM epochs e WHERE e.run_id=r.run_id ORDER BY e.epoch DESC LIMIT 1)
                        AS last_metrics,
                      (SELECT MAX(e.epoch) FROM epochs e WHERE e.run_id=r.run_id) AS last_epoch
                    FROM runs r ORDER BY r.created_at DESC, r.run_id"""
            ).fetchall()
        out = []
        for row in rows:
            run = {c: row[c] for c in _RUN_COLUMNS}
            run.update(epochs=row["epochs"], last_epoch=row["last_epoch"], last_metrics=_loads(row["last_metrics"]))
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
