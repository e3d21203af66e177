"""When the run cannot write: a folder that is read-only or not ours, a disk that fills up. Each becomes one
message that names the path, what the file system said, and (for a full disk) the free space and what the
write needed, instead of the traceback of whichever library was writing (torch's zip writer says only
"file write failed")."""

import errno
import os
import shutil
from pathlib import Path

from .errors import UserError

# How libraries that do not raise OSError word the same failures (safetensors: "os error 28").
_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_READ_ONLY = ("Read-only file system", "os error 30")
_DENIED = ("Permission denied", "os error 13")


class WriteError(UserError):
    """A file the run must write could not be written; the message says where, why and what to do."""


def existing_ancestor(path):
    """`path` itself or the nearest folder above it that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder, what="output.dir"):
    """Raise WriteError unless `folder` can be created and written in (checked on the nearest existing folder,
    so nothing is created here). access() reports a read-only file system even to root."""
    base = existing_ancestor(folder)
    if not base.is_dir():
        raise WriteError(f"{what} `{folder}` cannot be created: `{base}` is a file; choose another {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(base) else "permission denied"
        raise WriteError(f"{what} `{folder}` cannot be written: `{base}` is not writable ({why}); choose a "
                         f"folder you can write to, e.g. {what}=runs/new")


def _read_only(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def free_bytes(path):
    return shutil.disk_usage(existing_ancestor(path)).free


def failure_kind(exc):
    """"full", "read_only", "denied", "io" for an exception from writing a file (anywhere in its chain), or None
    when it is not a failure of the file system."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read_only",
                    errno.EACCES: "denied", errno.EPERM: "denied"}.get(exc.errno, "io")
        text = str(exc)
        for kind, words in (("full", _FULL), ("read_only", _READ_ONLY), ("denied", _DENIED)):
            if any(w in text for w in words):
                return kind
        exc = exc.__cause__ or exc.__context__
    return None


def write_failure(exc, what, path, needed_bytes=None):
    """The WriteError that explains `exc` (raised while writing `what` into `path`), or None when `exc` is not a
    file-system failure. A writer that gives no reason ("file write failed") counts as a full disk when less is
    free than the write needed."""
    kind = failure_kind(exc)
    free = free_bytes(path)
    if kind in (None, "io") and needed_bytes is not None and free < needed_bytes and _mentions_writing(exc):
        kind = "full"
    if kind is None:
        return None
    if kind == "full":
        need = f"; it needs about {_mb(needed_bytes)}" if needed_bytes else ""
        return WriteError(f"{what} could not be written: the disk holding `{path}` is full ({_mb(free)} free{need}). "
                          "Free some space there, or point output.dir at a larger disk")
    reason = {"read_only": "the file system is read-only", "denied": "permission denied"}.get(kind, str(exc))
    return WriteError(f"{what} could not be written into `{path}`: {reason}; choose a folder you can write to "
                      "(output.dir)")


def _mentions_writing(exc):
    return any(word in str(exc).lower() for word in ("write", "writing", "serializ"))


def _mb(nbytes):
    return f"{nbytes / 2**20:.1f} MB"
