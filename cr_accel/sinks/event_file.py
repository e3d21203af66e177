"""TensorBoard's event file, written by the thread that makes the events, through one open buffered file.

TensorBoard's own writer (as torch's SummaryWriter uses it without TensorFlow) hands every serialized event to a
thread of its own, which opens the event file, appends the record and closes the file again, every record: in a
run with step records and histograms, ~9 us of that thread's CPU per step of the benchmark MLP, woken for every
record (bench/thread_cpu.py). The trackers sink already writes from a thread of its own; `take_over` has it write
the records itself, to the same file, kept open: the same TFRecord bytes (length, its checksum, the event, its
checksum), so TensorBoard's reader sees no difference.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable

BUFFER_BYTES = 1 << 16  # records wait in memory until this much is pending, a flush, or the end


class EventFile:
    """What torch's FileWriter asks of its event writer (add_event, flush, close, get_logdir), appending TFRecords
    of `Event`s to `path` with the checksum function `crc`."""

    def __init__(self, path: Path, crc: Callable[[bytes], int]) -> None:
        self.path = Path(path)
        self._crc = crc
        self._file: BinaryIO | None = open(self.path, "ab", buffering=BUFFER_BYTES)  # noqa: SIM115 (kept open)

    def get_logdir(self) -> str:
        return str(self.path.parent)

    def add_event(self, event: Any) -> None:
        """`event` with its wall time set (torch's FileWriter sets it)."""
        self.write_record(event.SerializeToString())

    def write_record(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"the TensorBoard event file {self.path} is closed")
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def take_over(summary_writer: Any, crc: Callable[[bytes], int]) -> EventFile | None:
    """Have torch's `summary_writer` write its event file through an EventFile from now on (the events so far --
    the file's version, a resumed run's purge marker -- are flushed first and kept); None, leaving the writer as
    it is, if its file cannot be found (another TensorBoard version)."""
    file_writer = summary_writer._get_file_writer()  # made with the purge marker, if any, on first use
    old = getattr(file_writer, "event_writer", None)
    name = getattr(old, "_file_name", None)
    if old is None or name is None or not Path(name).is_file():
        return None
    old.close()  # writes what it holds and stops its thread
    new = EventFile(Path(name), crc)
    file_writer.event_writer = new
    return new
