"""Checkpoints that never lose work: atomic, verified, and read back without unpickling anything.

Layout of `output.dir/checkpoints/`:

    step_00000080/      periodic pool (every checkpoint.save_every epochs / save_every_steps), keep_last_n kept
    last/               the newest state: every save_every epochs, at the end, and on preemption
    best/               the state with the best checkpoint.monitor so far
    .tmp-*/             being written; never read, removed at the next start

Each folder holds accelerate's `save_state` files (model.safetensors, optimizer.bin, random_states_<rank>.pkl,
scaler.pt with fp16), `trainer_state.json` (counters, data position, callbacks' state, dataset metadata),
`config.yaml` (the resolved config) and, written last, `manifest.json` (every file's size and sha256, the
cr_accel version and world size). A folder is complete exactly when its manifest is there.

Writing: every process writes into `.tmp-<name>`; after a barrier the main process hashes the files, writes
the manifest and renames the folder into place. `best/` and `last/` are replaced in two renames
(`last` -> `.old-last`, `.tmp-...` -> `last`) and a start-up recovery puts `.old-last` back if a crash fell
between them, so at every moment an earlier complete checkpoint exists. The same files go into several
folders as hard links, not copies.
"""

import itertools
import json
import os
import re
import shutil
import threading
from pathlib import Path

import torch

from .files import CheckpointError, fsync_file, link_copy, read_json, sha256_all, write_json

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
CONFIG = "config.yaml"
FORMAT = 1
NAMED = ("last", "best")
_trash_counter = itertools.count()
_discarding = []  # deletion threads still running
_POOL = re.compile(r"^step_(\d{8})$")
# Files a checkpoint may hold; anything else (an extra pickle, say) makes it untrusted.
_ALLOWED = re.compile(
    r"^(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|"
    + re.escape(STATE) + "|" + re.escape(CONFIG) + ")$"
)

# trainer_state.json keys that later versions added, with the value that reproduces older behaviour.
STATE_DEFAULTS = {
    "batch_in_epoch": 0,  # format 1 always has it; a checkpoint without it was taken at an epoch end
    "best_value": None,
    "bad_validations": 0,
    "callbacks": {},
    "epoch_stats": None,
    "dataset": {},
}
STATE_REQUIRED = ("format", "epoch", "global_step", "world_size", "schedule")


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

    def newest_first(self):
        """Complete checkpoints, the highest global step first (`last` first among equals)."""
        candidates = []
        for path in self.complete():
            try:
                candidates.append((read_state(path)["global_step"], path.name == "last", path))
            except CheckpointError:
                continue
        return [c[2] for c in sorted(candidates, key=lambda c: c[:2], reverse=True)]

    def complete(self):
        if not self.root.is_dir():
            return []
        return [p for p in sorted(self.root.iterdir()) if (p.name in NAMED or _POOL.match(p.name)) and is_complete(p)]

    # ------------------------------------------------------------ saving

    def save(self, state, config_yaml, targets):
        """Write the full training state once and publish it under each of `targets` (`periodic`, `last`,
        `best`). Called on every process. Returns the published folders."""
        acc = self.accelerator
        step = state["global_step"]
        tmp = self.root / f".tmp-step_{step:08d}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            write_json(tmp / STATE, state)
            (tmp / CONFIG).write_text(config_yaml)
        acc.wait_for_everyone()  # every process has finished writing its files
        names = [f"step_{step:08d}" if t == "periodic" else t for t in targets]
        if acc.is_main_process:
            _write_manifest(tmp, state)
            for i, name in enumerate(names):
                source = tmp if i == len(names) - 1 else link_copy(tmp, self.root / f".tmp-link-{name}")
                _publish(source, self.root / name)
            if "periodic" in targets:
                self._rotate()
        acc.wait_for_everyone()
        return [self.root / name for name in names]

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
    """Raise CheckpointError unless every file is listed in the manifest, allowed, and unchanged."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint `{path}` does not exist (or is not a folder)")
    manifest = read_json(path / MANIFEST, path, what="manifest")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint `{path}` has a manifest of an unknown format; it was not written by "
                              f"this version of cr_accel")
    listed = manifest["files"]
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    digests = sha256_all([path / name for name in listed if (path / name).is_file()])
    for name in sorted(present - set(listed)):
        raise CheckpointError(f"checkpoint `{path}` holds an unexpected file `{name}`; refusing to load it. "
                              "Remove the file if you put it there, or use another checkpoint")
    for name, entry in sorted(listed.items()):
        if not _ALLOWED.match(name):
            raise CheckpointError(f"checkpoint `{path}` lists a file `{name}` that a cr_accel checkpoint never "
                                  "holds; refusing to load it")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint `{path}` is missing `{name}`; use another checkpoint")
        if file.stat().st_size != entry.get("size"):
            raise CheckpointError(f"checkpoint `{path}`: `{name}` has {file.stat().st_size} bytes, the manifest "
                                  f"says {entry.get('size')} (truncated or changed); use another checkpoint")
        if digests[file] != entry.get("sha256"):
            raise CheckpointError(f"checkpoint `{path}`: `{name}` does not match its checksum (changed or "
                                  "corrupted); use another checkpoint")
    return manifest


def read_state(path):
    """trainer_state.json with documented defaults for keys that older checkpoints lack; unknown keys refused."""
    state = read_json(Path(path) / STATE, path, what="trainer state")
    missing = [k for k in STATE_REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint `{path}`: trainer state lacks {', '.join(missing)}")
    known = set(STATE_REQUIRED) | set(STATE_DEFAULTS) | {"cr_accel_version"}
    unknown = sorted(set(state) - known)
    if unknown:
        raise CheckpointError(f"checkpoint `{path}`: trainer state has unknown keys {', '.join(unknown)} "
                              "(written by a newer cr_accel?)")
    if state["format"] > FORMAT:
        raise CheckpointError(f"checkpoint `{path}` has format {state['format']}; this cr_accel reads up to {FORMAT}")
    return {**STATE_DEFAULTS, **state}


def check_rng_restored(path, accelerator):
    """accelerate swallows RNG load failures; a resume that is not exact must not pass silently."""
    from accelerate.utils.other import load  # torch.load(weights_only=True) that also admits NumPy arrays

    file = Path(path) / f"random_states_{accelerator.process_index}.pkl"
    saved = load(file)
    if not torch.equal(saved["torch_manual_seed"], torch.get_rng_state()):
        raise CheckpointError(f"checkpoint `{path}`: the random state of process {accelerator.process_index} "
                              "could not be restored, so the resume would not be exact")


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
    trash = folder.parent / f".trash-{folder.name}-{os.getpid()}-{next(_trash_counter)}"
    folder.rename(trash)
    thread = threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True)
    thread.start()
    _discarding.append(thread)


def wait_for_discards():
    """Let background deletions finish (at the end of training, so no `.trash-*` is left behind)."""
    while _discarding:
        _discarding.pop().join()


def _write_manifest(folder, state):
    from .. import __version__

    paths = [p for p in sorted(folder.iterdir()) if p.is_file()]
    digests = sha256_all(paths)
    files = {p.name: {"size": p.stat().st_size, "sha256": digests[p]} for p in paths}
    manifest = {"format": FORMAT, "cr_accel_version": __version__, "world_size": state["world_size"],
                "global_step": state["global_step"], "epoch": state["epoch"], "files": files}
    write_json(folder / MANIFEST, manifest, fsync=True)
