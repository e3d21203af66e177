"""tensor_files: the user's own tensors in .safetensors, .npy, .npz or .pt files.

`.safetensors` files and folders of `.npy` pairs stay on disk: their headers are read at build and one sample is
read per `__getitem__` (see `tensor_store`). `.npz` (often compressed, so not readable by row) and `.pt` files
are loaded whole, as before.
"""

import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cr_accel.errors import UserError

from . import DATASETS, DatasetSplits
from .splits import check_ratios, split_counts, split_indices
from .tensor_store import (InMemoryColumn, TensorStore, check_keys, columns_metadata, dtype_name, open_npy,
                           open_safetensors)

SUPPORTED_SUFFIXES = (".npz", ".safetensors", ".pt")
_SUPPORTED_TEXT = ".npz, .safetensors or .pt"
DATA_KEYS = ("data.input_key", "data.target_key")  # the settings that name the tensors, for messages
# The metadata passes read STATS_CHUNK samples at a time, fewer where that would be more than STATS_BYTES (the
# float64 copy and the temporaries of the std pass take ~8x the chunk). The chunking fixes the order of the float
# sums: data of samples up to 16 KB gets the values it got when it was loaded whole; larger samples may differ
# from those in the last bits of the mean and std.
STATS_CHUNK = 1024
STATS_BYTES = 16 * 2**20


@DATASETS.register("tensor_files")
def tensor_files(seed, path, val_path=None, val_ratio=0.1, input_key="inputs", target_key="targets",
                 test_path=None, test_ratio=None):
    """Your own data: inputs and targets tensors stored in .safetensors, .npy, .npz or .pt files.

    Each file holds two tensors with the same first dimension (the samples): the inputs under
    `input_key` and the targets under `target_key`. `.npy` files hold one array each, so a folder holding
    `<input_key>.npy` and `<target_key>.npy` (numpy.save, uncompressed) is one such file. A folder is read as
    all its .safetensors, .npz and .pt files and its sub-folders of .npy pairs (other files are ignored),
    concatenated along the first dimension in sorted name order. `.pt` files are read with
    `torch.load(weights_only=True)` and must hold a plain dict of tensors, e.g.
    `torch.save({"inputs": x, "targets": y}, "train.pt")`; `.npz` files are read without pickle, e.g.
    `numpy.savez("train.npz", inputs=x, targets=y)`. Tensors keep their stored dtype.

    `.safetensors` and `.npy` data stays on disk: the files' headers are read when the dataset is built and
    each sample is read from its file when it is needed (in the DataLoader's workers), so the data may be
    larger than memory. `.npz` (compressed archives cannot be read by row) and `.pt` files are loaded
    whole. The metadata is computed in passes over chunks of samples, in bounded memory.

    The metadata records the task ("classification" for 1-D integer targets, "reconstruction" for
    floating targets shaped like the inputs, "regression" otherwise), the files read, and the
    per-channel mean and std of the training inputs (recorded, not applied).

    Args:
        path: a file, or a folder of files, holding the training data (or all the data, if `val_path`
            is not given). Relative paths are relative to the working directory.
        val_path: a file or folder with the validation data, in the same format. If not given, the data
            at `path` is split at random (default: none).
        val_ratio: without `val_path`, the fraction of samples held out for validation, in (0, 1); the
            split is shuffled with the run's seed, so it is the same on every resume (default 0.1).
        input_key: name of the inputs tensor inside each file (default "inputs").
        target_key: name of the targets tensor inside each file (default "targets").
        test_path: a file or folder with test data, in the same format, scored once after training
            (default: none).
        test_ratio: instead of `test_path`, the fraction of the samples at `path` held out as the test
            set, in (0, 1): taken from the same seeded shuffle as the validation split, after it, so the
            three sets are disjoint and adding a test split leaves the validation set as it was
            (default: none, no test set).
    """
    ratios = check_ratios(val_ratio, val_path, test_ratio, test_path)
    keys = (input_key, target_key)
    train_files = _list_files(path, "data.path", keys)
    everything = _open_files(train_files, keys, reference=None)
    reference = (train_files[0], *everything.parts[0])
    train, held_out = _split(everything, ratios, seed, path)
    if len(train) == 0:
        raise UserError(f"the training data at `{path}` has no samples; add data to those files")
    # {split: (samples, files read, how it was made)}
    sets = {name: (store, train_files, {f"{name}_ratio": float(ratios[name]), "seed": seed})
            for name, store in held_out.items()}
    for name, where, what in (("val", val_path, "validation"), ("test", test_path, "test")):
        if name not in sets and where is not None:
            files = _list_files(where, f"data.{name}_path", keys)
            store = _open_files(files, keys, reference=reference)
            if len(store) == 0:
                raise UserError(f"the {what} data at `{where}` has no samples; add data to those files")
            sets[name] = (store, files, f"{name}_path")
    val, val_files, val_split = sets["val"]
    test, test_files, test_split = sets.get("test", (None, None, None))
    _, inputs, targets = reference
    metadata = {
        "dataset": "tensor_files",
        **_describe_task(train, [val] + ([test] if test else [])),
        **columns_metadata(inputs, targets),
        **split_counts(train, val, test),
        "normalization": _channel_stats(train),
        "source": {
            "train": [str(f) for f in train_files],
            "val": [str(f) for f in val_files],
            "split": val_split,
            **({"test": [str(f) for f in test_files], "test_split": test_split} if test else {}),
            "input_key": input_key,
            "target_key": target_key,
        },
    }
    return DatasetSplits(_dataset(train), _dataset(val), metadata, test=_dataset(test) if test else None)


def _dataset(store):
    """The store itself where a file is read in place; data that is all in memory anyway as a TensorDataset."""
    return store if store.on_disk else TensorDataset(*store.tensors)


def _list_files(path, field, keys):
    """The data files at `path`: the file itself, a folder of .npy pairs, or a folder's supported files and
    .npy-pair sub-folders in sorted name order."""
    if path is None or not isinstance(path, (str, Path)) or str(path) == "":
        raise UserError(f"{field} must be a path to a file or folder, got {path!r}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise UserError(f"{field} `{path}` does not exist (looked for {resolved}); check the path in your config")
    if resolved.is_dir():
        if _is_npy_folder(resolved, keys):
            return [resolved]
        files = sorted(f for f in resolved.iterdir()
                       if (f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES) or _is_npy_folder(f, keys))
        if not files:
            present = sorted(f.name for f in resolved.iterdir())
            listing = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") if present else "nothing"
            raise UserError(
                f"{field} `{path}` is a folder with no {_SUPPORTED_TEXT} files (it holds: {listing}) and no "
                f"{keys[0]}.npy/{keys[1]}.npy pair; save your tensors in one of those formats"
            )
        return files
    if resolved.suffix.lower() == ".npy":
        raise UserError(
            f"{field} `{path}` is one .npy file, which holds one array; save the inputs and targets as "
            f"{keys[0]}.npy and {keys[1]}.npy in one folder and give the folder"
        )
    if resolved.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise UserError(
            f"{field} `{path}` has unsupported extension `{resolved.suffix or '(none)'}`; "
            f"save the data as {_SUPPORTED_TEXT} (a dict with the inputs and targets tensors), or as a folder "
            f"of {keys[0]}.npy and {keys[1]}.npy"
        )
    return [resolved]


def _is_npy_folder(path, keys):
    return path.is_dir() and any((path / f"{key}.npy").is_file() for key in keys)


def _open_files(files, keys, reference):
    """A TensorStore over `files`; all must agree on per-sample shape and dtype with `reference` (file,
    inputs column, targets column), or with the first file when there is none."""
    parts = []
    for file in files:
        x, y = _open_file(file, keys)
        if reference is None:
            reference = (file, x, y)
        for what, key, ours, theirs in (("inputs", keys[0], x, reference[1]), ("targets", keys[1], y, reference[2])):
            if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
                raise UserError(
                    f"`{file}` has {what} (`{key}`) with per-sample shape {ours.shape} and dtype "
                    f"{dtype_name(ours.dtype)}, but `{reference[0]}` has {theirs.shape} and "
                    f"{dtype_name(theirs.dtype)}; all files (training and validation) must hold samples of the same "
                    "shape and dtype"
                )
        parts.append((x, y))
    return TensorStore(parts)


def _open_file(file, keys):
    """(inputs, targets) columns of one file or .npy folder, with a leading sample dimension of equal length."""
    try:
        if file.is_dir():
            check_keys(file, keys, sorted(f.stem for f in file.glob("*.npy")), DATA_KEYS)
            x, y = (open_npy(file / f"{key}.npy", key) for key in keys)
        elif file.suffix.lower() == ".safetensors":
            x, y = open_safetensors(file, keys, DATA_KEYS)
        else:
            tensors = _read_tensors(file, keys)
            for key, tensor in zip(keys, tensors):
                if tensor.ndim == 0:
                    raise UserError(f"`{key}` in `{file}` is a scalar; it needs a first dimension indexing the "
                                    "samples")
            x, y = (InMemoryColumn(file, key, tensor) for key, tensor in zip(keys, tensors))
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign files: every reader has its own exception types
        raise UserError(f"cannot read `{file}`: {type(exc).__name__}: {_first_line(exc)}") from None
    if x.rows != y.rows:
        raise UserError(
            f"`{file}` has {x.rows} samples in `{keys[0]}` but {y.rows} in `{keys[1]}`; "
            f"inputs and targets need the same length along the first dimension"
        )
    return x, y


def read_tensor(file, key, setting):
    """One tensor, `key`, of a .npz, .safetensors or .pt file, read as the datasets read theirs (no pickles);
    `setting` names the option that chose `key` in the message when the file has no such tensor."""
    file = Path(file)
    if file.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise UserError(f"`{file}` has unsupported extension `{file.suffix or '(none)'}`; give a {_SUPPORTED_TEXT} "
                        "file")
    if not file.is_file():
        raise UserError(f"`{file}` does not exist (looked for {file.resolve()})")
    try:
        (tensor,) = _read_tensors(file, (key,), (setting,))
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign files: every reader has its own exception types
        raise UserError(f"cannot read `{file}`: {type(exc).__name__}: {_first_line(exc)}") from None
    if tensor.ndim == 0:
        raise UserError(f"`{key}` in `{file}` is a scalar; it needs a first dimension indexing the samples")
    return tensor


def _read_tensors(file, keys, settings=DATA_KEYS):
    suffix = file.suffix.lower()
    reader = {".npz": _read_npz, ".safetensors": _read_safetensors}.get(suffix, _read_pt)
    return reader(file, keys, settings)


def _read_npz(file, keys, settings):
    if not zipfile.is_zipfile(file):  # np.load would try to unpickle it and suggest allow_pickle
        raise UserError(f"cannot read `{file}`: it is not a .npz archive (corrupt, or not written by numpy.savez)")
    with np.load(file, allow_pickle=False) as archive:
        check_keys(file, keys, archive.files, settings)
        arrays = []
        for key in keys:
            try:
                arrays.append(archive[key])
            except ValueError as exc:  # object arrays need pickle, which is refused
                raise UserError(
                    f"`{key}` in `{file}` cannot be read without pickle ({_first_line(exc)}); "
                    f"save it as a numeric array"
                ) from None
    return tuple(_numpy_to_tensor(file, key, a) for key, a in zip(keys, arrays))


def _read_safetensors(file, keys, settings):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        check_keys(file, keys, list(handle.keys()), settings)
        return tuple(handle.get_tensor(key) for key in keys)


def _read_pt(file, keys, settings):
    example = "torch.save({" + ", ".join(f"'{key}': {name}" for key, name in zip(keys, "xy")) + "}, path)"
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).partition("WeightsUnpickler error:")[2].strip().splitlines()
        detail = detail[0].split(". ")[0] if detail else "not a pickle"
        if detail.startswith("Unsupported global"):
            raise UserError(
                f"`{file}` holds Python objects that torch.load(weights_only=True) refuses to unpickle "
                f"({detail}); save a plain dict of tensors instead: {example}"
            ) from None
        raise UserError(
            f"cannot read `{file}` with torch.load(weights_only=True) ({detail}): it is corrupt, not written "
            f"by torch.save, or holds objects other than tensors; save a plain dict of tensors: {example}"
        ) from None
    if not isinstance(content, dict):
        raise UserError(f"`{file}` holds a {type(content).__name__}, not a dict of tensors; save it as {example}")
    check_keys(file, keys, [str(k) for k in content], settings)
    for key in keys:
        if not isinstance(content[key], torch.Tensor):
            raise UserError(f"`{key}` in `{file}` is a {type(content[key]).__name__}, not a tensor")
    return tuple(content[key] for key in keys)


def _numpy_to_tensor(file, key, array):
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:
        raise UserError(f"`{key}` in `{file}` has dtype {array.dtype}, which torch cannot hold; save numbers") from None


def _split(store, ratios, seed, path):
    """Train and the held-out sets {name: store} of `ratios` (see `splits.split_indices`)."""
    if not ratios:
        return store, {}
    train_index, held = split_indices(len(store), ratios, seed, "tensor_files/split", path)
    return store.subset(train_index), {n: store.subset(i) for n, i in held.items()}


def _describe_task(train, held_out):
    """The task from the training targets; the number of classes counts the labels of every set. One pass
    over the targets, in chunks."""
    inputs, targets = train.parts[0]
    integer = not (targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool)
    size = _chunk(targets)
    if integer and targets.shape == ():
        maxima = [int(t.max()) for store in (train, *held_out) for _, t in store.chunks(size, (1,))]
        return {"task": "classification", "num_classes": max(maxima, default=0) + 1, "data_range": None}
    floating = targets.dtype.is_floating_point
    task = "reconstruction" if targets.shape == inputs.shape and floating else "regression"
    if not floating:
        return {"task": task, "data_range": None}
    bounds = [torch.stack([t.min(), t.max()]) for _, t in train.chunks(size, (1,))]
    low, high = torch.stack(bounds).unbind(1)
    return {"task": task, "data_range": [float(low.min()), float(high.max())]}


def _channel_stats(train):
    """Population mean and std per channel (dim 1 of the data, 0 of a sample) over the training inputs,
    in float64, in two passes over chunks (see STATS_BYTES; the values do not depend on how the data is stored
    or split into files)."""
    inputs = train.parts[0][0]
    if inputs.dtype.is_complex:
        return None

    def views():
        for x, _ in train.chunks(_chunk(inputs), (0,)):
            yield (x.reshape(len(x), 1, 1) if x.ndim == 1 else x.reshape(len(x), x.shape[1], -1)).double()

    count = len(train) * math.prod(inputs.shape[1:])  # values per channel
    mean = sum(view.sum(dim=(0, 2)) for view in views()) / count
    squares = sum(((view - mean.view(1, -1, 1)) ** 2).sum(dim=(0, 2)) for view in views())
    std = torch.sqrt(squares / count)
    return {"mean": mean.tolist(), "std": std.tolist(), "channel_dim": 0 if inputs.shape else None}


def _chunk(column):
    """Samples per step of a metadata pass over `column`."""
    return max(1, min(STATS_CHUNK, STATS_BYTES // max(1, column.dtype.itemsize * math.prod(column.shape))))


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
