"""What a run writes for people: a plain-text log, and CSV files of its records (main process only)."""

import csv
import datetime
import sys
from pathlib import Path

from tqdm.auto import tqdm


class TextLog:
    """Timestamped lines into `path` and onto the console; silent on every process but the main one."""

    def __init__(self, path, enabled):
        self.enabled = enabled
        self.path = Path(path)
        self._file = None  # opened at the first line: a run refused before it starts leaves no file behind

    def info(self, message, console=True):
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses no finished line
        stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        for line in str(message).splitlines():
            self._file.write(f"{stamp} {line}\n")
        if console:
            tqdm.write(str(message), file=sys.stdout)

    def close(self):
        if self._file:
            self._file.close()
            self._file = None


class RecordsCSV:
    """One row per record (metrics.csv: per epoch; steps.csv: per logged step), one column per value; a value that
    appears later widens the whole file. `key` is the column that orders the rows (`epoch` or `step`)."""

    def __init__(self, path, enabled, key="epoch"):
        self.path = Path(path)
        self.enabled = enabled
        self.key = key
        self._columns = None  # the header on disk, read once (the file may be a resumed run's)

    def append(self, row):
        if not self.enabled:
            return
        if self._columns is None:
            self._columns = self._read()[1]
        new_columns = [k for k in row if k not in self._columns]
        if new_columns and self._columns:  # rewrite once with the wider header; old rows get empty cells
            rows, columns = self._read()
            self._write(rows + [row], columns + new_columns)
            self._columns = columns + new_columns
            return
        if not self._columns:
            self._columns = list(row)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow({k: _cell(v) for k, v in row.items()})

    def keep_through(self, last):
        """Drop the rows whose key is after `last` (they are about to be logged again after a resume); the
        dropped rows are appended to `<file>.superseded`, so nothing written is lost."""
        if not self.enabled or not self.path.exists():
            return
        rows, columns = self._read()
        keep = [r for r in rows if int(r[self.key]) <= last]
        if len(keep) == len(rows):
            return
        self._columns = None
        superseded = self.path.with_name(self.path.name + ".superseded")
        with open(superseded, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            if superseded.stat().st_size == 0:
                writer.writeheader()
            writer.writerows(r for r in rows if int(r[self.key]) > last)
        self._write(keep, columns)

    def _read(self):
        if not self.path.exists() or self.path.stat().st_size == 0:
            return [], []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])

    def _write(self, rows, columns):
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
        tmp.replace(self.path)


def _cell(value):
    if isinstance(value, float):
        return repr(value)  # shortest exact text: resumed and straight runs compare equal
    return value
