"""tensor_files: the user's own tensors in .npz, .safetensors or .pt files."""

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cr_accel.errors import UserError

from . import DATASETS, DatasetSplits
from .splits import check_ratios, split_indices

SUPPORTED_SUFFIXES = (".npz", ".safetensors", ".pt")
_SUPPORTED_TEXT = ".npz, .safetensors or .pt"
DATA_KEYS = ("data.input_key", "data.target_key")  # the settings that name the tensors, for messages



@DATASETS.register("tensor_files")
def tensor_files(seed, path, val_path=None, val_ratio=0.1, input_key="inputs", target_key="targets",
                 test_path=None, test_ratio=None):
    """Your own data: inputs and targets tensors stored in .npz, .safetensors or .pt files.

    Each file holds two tensors with the same first dimension (the samples): the inputs under
    `input_key` and the targets under `target_key`. A folder is read as all its .npz, .safetensors and
    .pt files (other files are ignored), concatenated along the first dimension in sorted file-name
    order. `.pt` files are read with `torch.load(weights_only=True)` and must hold a plain dict of
    tensors, e.g. `torch.save({"inputs": x, "targets": y}, "train.pt")`; `.npz` files are read without
    pickle, e.g. `numpy.savez("train.npz", inputs=x, targets=y)`. Tensors keep their stored dtype.

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
    train_files = _list_files(path, "data.path")
    inputs, targets = _load_files(train_files, keys, reference=None)
    reference = (train_files[0], inputs, targets)
    (inputs, targets), held_out = _split(inputs, targets, ratios, seed, path)
    if len(inputs) == 0:
        raise UserError(f"the training data at `{path}` has no samples; add data to those files")
    # {split: ((inputs, targets), files read, how it was made)}
    sets = {name: (pair, train_files, {f"{name}_ratio": float(ratios[name]), "seed": seed})
            for name, pair in held_out.items()}
    for name, where, what in (("val", val_path, "validation"), ("test", test_path, "test")):
        if name not in sets and where is not None:
            files = _list_files(where, f"data.{name}_path")
            pair = _load_files(files, keys, reference=reference)
            if len(pair[0]) == 0:
                raise UserError(f"the {what} data at `{where}` has no samples; add data to those files")
            sets[name] = (pair, files, f"{name}_path")
    (val_inputs, val_targets), val_files, val_split = sets["val"]
    test, test_files, test_split = sets.get("test", (None, None, None))
    metadata = {
        "dataset": "tensor_files",
        **_describe_task(inputs, targets, [val_targets] + ([test[1]] if test else [])),
        "input_shape": list(inputs.shape[1:]),
        "target_shape": list(targets.shape[1:]),
        "input_dtype": _dtype_name(inputs.dtype),
        "target_dtype": _dtype_name(targets.dtype),
        "num_train": len(inputs),
        "num_val": len(val_inputs),
        "num_test": len(test[0]) if test else 0,
        "normalization": _channel_stats(inputs),
        "source": {
            "train": [str(f) for f in train_files],
            "val": [str(f) for f in val_files],
            "split": val_split,
            **({"test": [str(f) for f in test_files], "test_split": test_split} if test else {}),
            "input_key": input_key,
            "target_key": target_key,
        },
    }
    return DatasetSplits(TensorDataset(inputs, targets), TensorDataset(val_inputs, val_targets), metadata,
                         test=TensorDataset(*test) if test else None)


def _list_files(path, field):
    """The data files at `path`: the file itself, or a folder's supported files in sorted name order."""
    if path is None or not isinstance(path, (str, Path)) or str(path) == "":
        raise UserError(f"{field} must be a path to a file or folder, got {path!r}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise UserError(f"{field} `{path}` does not exist (looked for {resolved}); check the path in your config")
    if resolved.is_dir():
        files = sorted(f for f in resolved.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            present = sorted(f.name for f in resolved.iterdir())
            listing = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") if present else "nothing"
            raise UserError(
                f"{field} `{path}` is a folder with no {_SUPPORTED_TEXT} files (it holds: {listing}); "
                f"save your tensors in one of those formats"
            )
        return files
    if resolved.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise UserError(
            f"{field} `{path}` has unsupported extension `{resolved.suffix or '(none)'}`; "
            f"save the data as {_SUPPORTED_TEXT} (a dict with the inputs and targets tensors)"
        )
    return [resolved]


def _load_files(files, keys, reference):
    """Inputs and targets of every file, concatenated; all files must agree on per-sample shape and dtype
    with `reference` (file, inputs, targets), or with the first file when there is none."""
    inputs, targets = [], []
    for file in files:
        x, y = _load_file(file, keys)
        if reference is None:
            reference = (file, x, y)
        for what, key, ours, theirs in (("inputs", keys[0], x, reference[1]), ("targets", keys[1], y, reference[2])):
            if ours.shape[1:] != theirs.shape[1:] or ours.dtype != theirs.dtype:
                raise UserError(
                    f"`{file}` has {what} (`{key}`) with per-sample shape {tuple(ours.shape[1:])} and dtype "
                    f"{_dtype_name(ours.dtype)}, but `{reference[0]}` has {tuple(theirs.shape[1:])} and "
                    f"{_dtype_name(theirs.dtype)}; all files (training and validation) must hold samples of "
                    f"the same shape and dtype"
                )
        inputs.append(x)
        targets.append(y)
    return torch.cat(inputs), torch.cat(targets)


def _load_file(file, keys):
    """(inputs, targets) from one file, as CPU tensors with a leading sample dimension of equal length."""
    try:
        tensors = _read_tensors(file, keys)
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign files: every reader has its own exception types
        raise UserError(f"cannot read `{file}`: {type(exc).__name__}: {_first_line(exc)}") from None
    x, y = tensors
    for key, tensor in zip(keys, tensors):
        if tensor.ndim == 0:
            raise UserError(f"`{key}` in `{file}` is a scalar; it needs a first dimension indexing the samples")
    if len(x) != len(y):
        raise UserError(
            f"`{file}` has {len(x)} samples in `{keys[0]}` but {len(y)} in `{keys[1]}`; "
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
        _check_keys(file, keys, archive.files, settings)
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
        _check_keys(file, keys, list(handle.keys()), settings)
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
    _check_keys(file, keys, [str(k) for k in content], settings)
    for key in keys:
        if not isinstance(content[key], torch.Tensor):
            raise UserError(f"`{key}` in `{file}` is a {type(content[key]).__name__}, not a tensor")
    return tuple(content[key] for key in keys)


def _check_keys(file, keys, present, settings):
    for setting, key in zip(settings, keys):
        if key not in present:
            raise UserError(
                f"`{file}` has no `{key}` tensor (keys present: {', '.join(sorted(present)) or 'none'}); "
                f"set {setting} to the right one"
            )


def _numpy_to_tensor(file, key, array):
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:
        raise UserError(f"`{key}` in `{file}` has dtype {array.dtype}, which torch cannot hold; save numbers") from None


def _split(inputs, targets, ratios, seed, path):
    """Train and the held-out sets {name: (inputs, targets)} of `ratios` (see `splits.split_indices`)."""
    train_index, held = split_indices(len(inputs), ratios, seed, "tensor_files/split", path)
    return (inputs[train_index], targets[train_index]), {n: (inputs[i], targets[i]) for n, i in held.items()}


def _describe_task(inputs, targets, held_out_targets):
    """The task from the training targets; the number of classes counts the labels of every set."""
    integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    if integer and targets.ndim == 1:
        labels_max = max(int(t.max()) if len(t) else 0 for t in (targets, *held_out_targets))
        return {"task": "classification", "num_classes": labels_max + 1, "data_range": None}
    task = "reconstruction" if targets.shape[1:] == inputs.shape[1:] and targets.is_floating_point() else "regression"
    observed = [float(targets.min()), float(targets.max())] if targets.is_floating_point() else None
    return {"task": task, "data_range": observed}


def _channel_stats(inputs, chunk=1024):
    """Population mean and std per channel (dim 1 of the data, 0 of a sample) over the training inputs,
    in float64 and in chunks so integer or large data need no full float copy."""
    if inputs.is_complex():
        return None
    n = len(inputs)
    view = inputs.reshape(n, 1, 1) if inputs.ndim == 1 else inputs.reshape(n, inputs.shape[1], -1)
    count = n * view.shape[2]
    starts = range(0, n, chunk)
    mean = sum(view[i : i + chunk].double().sum(dim=(0, 2)) for i in starts) / count
    squares = sum(((view[i : i + chunk].double() - mean.view(1, -1, 1)) ** 2).sum(dim=(0, 2)) for i in starts)
    std = torch.sqrt(squares / count)
    return {"mean": mean.tolist(), "std": std.tolist(), "channel_dim": 0 if inputs.ndim > 1 else None}


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
