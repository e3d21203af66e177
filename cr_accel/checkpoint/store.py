"""The checkpoint folders of a run: saving, publishing, rotation, recovery, verification.

Layout of `output.dir/checkpoints/`:

    step_00000080/      periodic pool (every checkpoint.save_every epochs / save_every_steps), keep_last_n kept
    last/               the newest state: every save_every epochs, at the end, and on preemption
    best/               the state with the best checkpoint.monitor so far
    .tmp-*/             being written; never read, removed at the next start

Each folder holds accelerate's files in the layout of the run's distributed type (see layouts.py),
`trainer_state.json` (and `trainer_state.safetensors` when a part holds tensors), `config.yaml` and,
written last, `manifest.json` (every file's size and sha256, recursively through folders, the cr_accel
version and world size). A folder is complete exactly when its manifest is there.

Writing: every process writes into `.tmp-<name>` (in the background with asynchronous saves); every
file is fsynced; then the main process hashes the files, writes the manifest and renames the folder into
place. `best/` and `last/` are replaced in two renames (`last` -> `.old-last`, `.tmp-...` -> `last`) and
a start-up recovery puts `.old-last` back if a crash fell between them, so at every moment an earlier
complete checkpoint exists. The same files go into several folders as hard links, not copies.
"""

import itertools
import re
import shutil
import threading
import time
from pathlib import Path

import torch

from .. import state as state_registry
from . import layouts
from .files import CheckpointError, fsync_file, fsync_tree, link_copy, list_files, read_json, sha256_all, write_json

MANIFEST = "manifest.json"
STATE = layouts.TRAINER_STATE
TENSORS = layouts.TRAINER_TENSORS
CONFIG = layouts.CONFIG
FORMAT = 1  # of the manifest
NAMED = ("last", "best")
_trash_counter = itertools.count()
_discarding: list[threading.Thread] = []  # deletion threads still running
_POOL = re.compile(r"^step_(\d{8})$")
_WRITTEN = ".written-"


class Checkpoints:
    def __init__(self, accelerator, root, keep_last_n):
        self.accelerator = accelerator
        self.root = Path(root)
        self.keep_last_n = keep_last_n

    # ------------------------------------------------------------ start-up

    def recover(self):
        """Finish or undo what a crash interrupted (main process), then let every process go on."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for old in self.root.glob(".old-*"):
                target = self.root / old.name[len(".old-"):]
                if is_complete(target):
                    shutil.rmtree(old)
                else:
                    if target.exists():
                        shutil.rmtree(target)
                    old.rename(target)
            for leftover in [*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")]:
                shutil.rmtree(leftover)
        self.accelerator.wait_for_everyone()

    def entries(self):
        """Everything visible in the checkpoint folder: a run whose folder holds anything has checkpoints,
        usable or not, and must never silently start over."""
        if not self.root.is_dir():
            return []
        return [p for p in sorted(self.root.iterdir()) if not p.name.startswith(".")]

    def newest_first(self):
        """(path, problem) for every visible entry: complete checkpoints by global step, highest first (`last`
        first among equals), then whatever cannot be a checkpoint, with the reason."""
        ranked, unusable = [], []
        for path in self.entries():
            if not (path.name in NAMED or _POOL.match(path.name)) or not path.is_dir():
                unusable.append((path, "not a checkpoint folder (expected step_XXXXXXXX, last or best)"))
            elif not is_complete(path):
                unusable.append((path, f"incomplete: it has no {MANIFEST}"))
            else:
                try:
                    step = read_state(path)["trainer"]["global_step"]
                    ranked.append((step, path.name == "last", path))
                except CheckpointError as exc:
                    unusable.append((path, str(exc)))
        return [(c[2], None) for c in sorted(ranked, key=lambda c: c[:2], reverse=True)] + unusable

    def complete(self):
        return [p for p in self.entries() if (p.name in NAMED or _POOL.match(p.name)) and is_complete(p)]

    def newest_size(self):
        """The bytes of the newest complete checkpoint, from its manifest (None when there is none)."""
        newest = next((path for path, problem in self.newest_first() if problem is None), None)
        if newest is None:
            return None
        files = read_json(newest / MANIFEST, newest, what="manifest").get("files", {})
        return sum(entry.get("size", 0) for entry in files.values() if isinstance(entry, dict))

    # ------------------------------------------------------------ saving

    def prepare_folder(self, step):
        """A fresh hidden folder for the checkpoint of `step`; called on every process."""
        tmp = self.root / f".tmp-step_{step:08d}"
        if self.accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        return tmp

    def write_own_files(self, tmp, state, config_yaml):
        """trainer_state.json (+ .safetensors), config.yaml; main process. `state` is (parts, tensors)."""
        from .. import __version__

        if not self.accelerator.is_main_process:
            return
        parts, tensors = state
        write_json(tmp / STATE, {"format": state_registry.FORMAT, "cr_accel_version": __version__, "parts": parts})
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / TENSORS))
        (tmp / CONFIG).write_text(config_yaml)

    def publish(self, tmp, targets, summary):
        """Main process: hash, write the manifest, and make the folder visible under every target (`periodic`,
        `last`, `best`). Every file of every process must be on disk and fsynced already."""
        names = self.target_names(summary["global_step"], targets)
        _write_manifest(tmp, summary)
        for i, name in enumerate(names):
            source = tmp if i == len(names) - 1 else link_copy(tmp, self.root / f".tmp-link-{name}")
            _publish(source, self.root / name)
        if "periodic" in targets:
            self._rotate()
        return [self.root / name for name in names]

    def mark_written(self, tmp, process_index):
        """An asynchronous save's sign that this process's files are on disk (the main process waits for all
        of them before publishing; no collective call is safe from a background thread)."""
        (tmp / f"{_WRITTEN}{process_index}").touch()

    def wait_for_marks(self, tmp, world_size, poll_s=0.02, timeout_s=1800):
        """Until every process has marked its files written. A mark that never appears means another machine
        writes somewhere else: every process must see the same output.dir (a shared file system)."""
        marks = [tmp / f"{_WRITTEN}{rank}" for rank in range(world_size)]
        deadline = time.monotonic() + timeout_s
        while not all(m.exists() for m in marks):
            if time.monotonic() > deadline:
                missing = [rank for rank, m in enumerate(marks) if not m.exists()]
                raise RuntimeError(f"process(es) {missing} did not finish writing into {tmp} within {timeout_s} s; "
                                   "checkpoints need an output.dir that every machine shares")
            time.sleep(poll_s)
        for mark in marks:
            mark.unlink()

    def target_names(self, step, targets):
        return [f"step_{step:08d}" if t == "periodic" else t for t in targets]

    def _rotate(self):
        if self.keep_last_n is None:
            return
        pool = sorted(p for p in self.root.iterdir() if _POOL.match(p.name))
        for old in pool[: max(0, len(pool) - self.keep_last_n)]:
            _discard(old)


# ---------------------------------------------------------------- reading


def is_complete(path):
    return (Path(path) / MANIFEST).is_file()


def verify(path):
    """Raise CheckpointError unless every file, through every folder, is listed in the manifest, allowed in
    the checkpoint's layout, a regular file, and unchanged."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint `{path}` does not exist (or is not a folder)")
    manifest = read_json(path / MANIFEST, path, what="manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint `{path}` has a manifest of an unknown format; it was not written by "
                              f"this version of cr_accel")
    listed = manifest["files"]
    present = set(list_files(path)) - {MANIFEST}  # refuses links and special files
    for name in sorted(present - set(listed)):
        raise CheckpointError(f"checkpoint `{path}` holds an unexpected file `{name}`; refusing to load it. "
                              "Remove the file if you put it there, or use another checkpoint")
    for name in sorted(set(listed) - present):
        raise CheckpointError(f"checkpoint `{path}` is missing `{name}`; use another checkpoint")
    layout = layouts.detect(path)
    for name in sorted(listed):
        if not layout.allows(name):
            raise CheckpointError(f"checkpoint `{path}` lists a file `{name}` that a cr_accel checkpoint "
                                  f"({layout.name} layout) never holds; refusing to load it")
    digests = sha256_all([path / name for name in sorted(listed)])
    for name, entry in sorted(listed.items()):
        file = path / name
        if not isinstance(entry, dict) or file.stat().st_size != entry.get("size"):
            size = entry.get("size") if isinstance(entry, dict) else None
            raise CheckpointError(f"checkpoint `{path}`: `{name}` has {file.stat().st_size} bytes, the manifest "
                                  f"says {size} (truncated or changed); use another checkpoint")
        if digests[file] != entry.get("sha256"):
            raise CheckpointError(f"checkpoint `{path}`: `{name}` does not match its checksum (changed or "
                                  "corrupted); use another checkpoint")
    return manifest


def read_state(path):
    """{part key: state} from trainer_state.json (any format; tensors joined in), strictly checked where
    the shape is known here; each part checks its own values when it loads."""
    path = Path(path)
    parts = state_registry.parts_from_file(read_json(path / STATE, path, what="trainer state"), path)
    trainer = parts.get("trainer")
    if not isinstance(trainer, dict):
        raise CheckpointError(f"checkpoint `{path}`: the trainer state has no `trainer` part")
    try:
        state_registry.TrainState().load_state_dict(trainer)  # types checked before anyone relies on them
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint `{path}`: {exc}") from None
    return parts


def read_tensors(path):
    file = Path(path) / TENSORS
    if not file.is_file():
        return {}
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"checkpoint `{path}`: {TENSORS} cannot be read ({exc})") from None


def check_rng_restored(path, accelerator):
    """accelerate swallows RNG load failures; a resume that is not exact must not pass silently."""
    from accelerate.utils.other import load  # torch.load(weights_only=True) that also admits NumPy arrays

    file = Path(path) / f"random_states_{accelerator.process_index}.pkl"
    saved = load_refusing_pickles(load, file)
    if not isinstance(saved, dict) or not torch.equal(saved.get("torch_manual_seed", torch.empty(0)),
                                                      torch.get_rng_state()):
        raise CheckpointError(f"checkpoint `{path}`: the random state of process {accelerator.process_index} "
                              "could not be restored, so the resume would not be exact")


def load_refusing_pickles(loader, *args, **kwargs):
    """Run a weights-only loader; a pickle it refuses (or a damaged file) is an unusable checkpoint."""
    import pickle

    try:
        return loader(*args, **kwargs)
    except pickle.UnpicklingError:
        why = "it holds objects that a weights-only load refuses to create (changed, or possibly malicious)"
    except (EOFError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise CheckpointError(f"checkpoint `{args[0]}` cannot be loaded: {why}. Use another checkpoint")


# ---------------------------------------------------------------- helpers


def _publish(source, final):
    """Make `source` visible as `final`, replacing an older `final` without ever having neither."""
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        source.rename(final)
        _discard(old)
    else:
        source.rename(final)
    fsync_file(final.parent)


def _discard(folder):
    """Remove a checkpoint folder without making training wait: deleting a GB-sized file blocks for most of
    a second on some file systems. The rename is instant; a crash leaves a `.trash-*` that start-up removes."""
    trash = folder.parent / f".trash-{folder.name}-{threading.get_native_id()}-{next(_trash_counter)}"
    folder.rename(trash)
    thread = threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True)
    thread.start()
    _discarding.append(thread)


def wait_for_discards():
    """Let background deletions finish (at the end of training, so no `.trash-*` is left behind)."""
    while _discarding:
        _discarding.pop().join()


def _write_manifest(folder, summary):
    from .. import __version__

    fsync_tree(folder)  # the data files are durable before the manifest says the checkpoint is complete
    names = list_files(folder)
    digests = sha256_all([folder / name for name in names])
    files = {name: {"size": (folder / name).stat().st_size, "sha256": digests[folder / name]} for name in names}
    manifest = {"format": FORMAT, "cr_accel_version": __version__, **summary, "files": files}
    write_json(folder / MANIFEST, manifest, fsync=True)
