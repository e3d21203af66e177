"""hf_dataset: Hugging Face `datasets` data on disk -- a folder written by `save_to_disk`, or `.parquet` and
`.arrow` files -- read one row per `__getitem__` (see `hf_columns`).

`datasets` is imported on first use only, so the rest of cr_accel works without it (the `hf` extra installs it).
Nothing is ever downloaded: the path must be local, and the libraries' offline switches are on while the data is
opened (`offline`). Arrow data is memory-mapped where it lies; Parquet is converted once into an Arrow file in a
cache folder (`_parquet` says why), then memory-mapped the same way.
"""

import difflib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cr_accel.errors import UserError

from . import DATASETS, DatasetSplits
from .images import is_range
from .splits import ratio_problems, split_counts, split_indices
from .tensor_store import columns_metadata

INSTALL = "pip install -e '.[hf]'"
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
VAL_SPLITS = ("validation", "val")  # validation is the first of these splits, unless val_split or val_ratio is set
DEFAULT_VAL_RATIO = 0.1  # without a split above
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes for a DatasetDict, a Dataset
FILE_SUFFIXES = (".parquet", ".arrow")


@DATASETS.register("hf_dataset")
def hf_dataset(seed, path, input_column="inputs", target_column="targets", split="train", val_split=None,
               val_ratio=None, test_split=None, test_ratio=None, data_range=None, cache_dir=None):
    """Hugging Face `datasets` data on disk: a folder written by `save_to_disk`, or `.parquet` / `.arrow` files.

    A `DatasetDict` (or a folder of files named by split, e.g. `train-00000-of-00002.parquet`,
    `validation.parquet`, as `datasets.load_dataset` names them) gives its splits by name; a single `Dataset`, a
    single file or a folder of files named otherwise is one split, `train`. Each sample is the `input_column` and
    the `target_column` of one row, read when it is needed (in the DataLoader's workers): number columns (scalars,
    `Sequence`/`List`, `Array2D`/`Array3D`) as tensors of their stored dtype, `Image` columns decoded to `C x H x W`
    float32 as image_folder decodes files (8-bit / 255, 16-bit / 65535, floating point as stored). Integer scalar
    targets (`ClassLabel` or plain) are int64 class labels. Every row of a column must have one shape (images:
    one size, channels and bit depth); all rows are checked when the dataset is built, from the list lengths and
    image headers, without reading the numbers.

    Arrow data (save_to_disk folders, `.arrow` files) is memory-mapped in place. Parquet files are converted once
    into an Arrow file in `cache_dir` and read from there. Nothing is downloaded: `path` must be on this machine.

    The metadata records the task ("classification" for integer scalar targets, "reconstruction" for floating
    targets shaped like the inputs, "regression" otherwise), `num_classes` (and `classes`, from a `ClassLabel`),
    and the splits and columns read.

    Args:
        path: a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`, a `.parquet` or `.arrow`
            file, or a folder of such files (all of one format). Relative paths are relative to the working
            directory. Never a Hub name: save a Hub dataset once with `load_dataset(name).save_to_disk(folder)`.
        input_column: the column holding the inputs (default "inputs").
        target_column: the column holding the targets; it may be `input_column` itself (default "targets").
        split: the split trained on (default "train", the name a single dataset is read under).
        val_split: the split validated on. If neither it nor `val_ratio` is given, the split named `validation`
            (else `val`) where the data has one, else a `val_ratio` of 0.1 (default: none).
        val_ratio: instead of `val_split`, the fraction of the training split held out for validation, in (0, 1);
            shuffled with the run's seed, so the same on every resume (default: none, see `val_split`).
        test_split: a split scored once after training. Never taken by default: test splits are often unlabelled
            (label -1), which is refused (default: none).
        test_ratio: instead of `test_split`, the fraction of the training split held out as the test set, in
            (0, 1): from the same seeded shuffle as a `val_ratio` split, after it, so the sets are disjoint and
            adding a test split leaves validation as it was (default: none, no test set).
        data_range: `[low, high]` of the targets, which `psnr` and `ssim` measure against. By default [0, 1] for 8-
            and 16-bit image targets; for other floating-point targets the range observed in the training targets,
            which costs one pass over them at start: giving it here saves that pass (default: none).
        cache_dir: an existing folder where Parquet data is converted to Arrow, once (reused while the files are
            unchanged); nothing is written anywhere else (default: none, the `datasets` cache, `HF_DATASETS_CACHE`).
    """
    root = _local(path, "data.path")
    cache = None if cache_dir is None else _local(cache_dir, "data.cache_dir")
    with offline() as datasets:
        source = _open(datasets, root, cache)
        plan = _plan(source, split, val_split, val_ratio, test_split, test_ratio, data_range)
        tables = {name: source.load(name) for name in dict.fromkeys(plan.named.values())}
    train_table = tables[split]
    for name, table in tables.items():
        if len(table) == 0:
            raise UserError(_empty(name, root))
    from .hf_columns import HFRows, Place, chunk_rows, class_keys, data_range_of, read_columns, task_of

    columns = read_columns(datasets, tables, split, (input_column, target_column), root)
    task = task_of(*columns)
    if task == "classification":
        columns = (columns[0], columns[1].as_labels())
    full = {name: HFRows(table, Place(root, name), columns) for name, table in tables.items()}
    size = chunk_rows(columns)
    for rows in full.values():
        rows.check_rows(size)
    train, held = _split(full[split], plan, seed, root)
    held |= {role: full[name] for role, name in plan.named.items() if role != "train"}
    val, test = held["val"], held.get("test")
    inputs, targets = columns
    classes = {}
    if task == "classification":
        classes = class_keys(datasets, train_table.features[target_column], targets, full.values(), size)
    metadata = {
        "dataset": "hf_dataset",
        "task": task,
        **classes,
        **columns_metadata(inputs, targets),
        **split_counts(train, val, test),
        "data_range": None if task == "classification" else data_range_of(targets, train, data_range, size),
        "normalization": None,  # per-channel statistics would cost a pass over every input at each start
        "source": _describe_source(source, plan, seed, train_table, columns),
    }
    return DatasetSplits(train, val, metadata, test=test)


# ---------------------------------------------------------------- the library, offline


@contextmanager
def offline() -> Iterator[Any]:
    """The `datasets` module, with the offline switches of `datasets` and `huggingface_hub` on until the block
    ends, then put back as they were. Both libraries read the variables once, when first imported: the
    environment covers an import made here, and the module flags, set directly, one made before (by the user's
    code, say)."""
    saved = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    flags: list[tuple[Any, str, Any]] = []
    try:
        datasets = _import_datasets()
        import huggingface_hub.constants as hub

        for module, name in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                             (hub, "HF_HUB_OFFLINE")):
            if hasattr(module, name):
                flags.append((module, name, getattr(module, name)))
                setattr(module, name, True)
        yield datasets
    finally:
        for module, name, value in reversed(flags):
            setattr(module, name, value)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.name=hf_dataset reads data with the `datasets` library, which is not installed: "
                        f"{INSTALL}") from None
    return datasets


# ---------------------------------------------------------------- what the path holds


@dataclass
class Source:
    """What `root` holds, and how to load each of its splits (Parquet splits are converted only when loaded)."""

    root: Path
    kind: str  # "save_to_disk", "parquet" or "arrow"
    single: bool  # one dataset without split names, read as split "train"
    loaders: dict[str, Callable[[], Any]]
    cache: Path | None = None  # where Parquet is converted

    @property
    def names(self) -> list[str]:
        return sorted(self.loaders)

    def load(self, name: str) -> Any:
        return self.loaders[name]()


def _local(path, field):
    """`path` as an existing local path; a URL or a Hub name is refused (no downloads here)."""
    if path is None or not isinstance(path, (str, Path)) or str(path) == "":
        raise UserError(f"{field} must be a path to a folder or file, got {path!r}")
    if "://" in str(path):
        raise UserError(f"{field} `{path}` is a URL; hf_dataset reads local data only and never downloads: fetch it "
                        "once where there is network, e.g. datasets.load_dataset(...).save_to_disk('data/name'), "
                        "and give that folder")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        hint = ("; hf_dataset reads local data only, never a Hub name: save a Hub dataset once with "
                "datasets.load_dataset(name).save_to_disk(folder) and give that folder" if field == "data.path" else
                ": create the folder")
        raise UserError(f"{field} `{path}` does not exist (looked for {resolved}){hint}")
    return resolved


def _open(datasets, root, cache):
    if root.is_dir() and any((root / marker).is_file() for marker in SAVED_MARKERS):
        return _saved(datasets, root)
    suffix, files = _data_files(datasets, root)
    if suffix == ".arrow":
        loaders = {name: (lambda f=f: _arrow(datasets, f)) for name, f in files.items()}
        return Source(root, "arrow", root.is_file(), loaders)
    cache = cache or Path(datasets.config.HF_DATASETS_CACHE)
    loaders = {name: (lambda n=name, f=f: _parquet(datasets, f, n, cache, root)) for name, f in files.items()}
    return Source(root, "parquet", root.is_file(), loaders, cache)


def _saved(datasets, root):
    try:
        loaded = datasets.load_from_disk(str(root), keep_in_memory=False)
    except Exception as exc:
        empty = _empty_saved_split(root)  # `datasets` saves an empty split but fails to load it
        raise UserError(_empty(empty, root) if empty else _unreadable(root, exc)) from None
    if isinstance(loaded, datasets.DatasetDict):
        return Source(root, "save_to_disk", False, {name: (lambda d=d: d) for name, d in loaded.items()})
    return Source(root, "save_to_disk", True, {"train": lambda: loaded})


def _empty_saved_split(root):
    """The name of a split that save_to_disk wrote without data files (its state.json lists none), or None."""
    for state in [root / "state.json", *sorted(root.glob("*/state.json"))]:
        try:
            files = json.loads(state.read_text()).get("_data_files")
        except (OSError, ValueError, AttributeError):
            continue
        if files == []:
            return "train" if state.parent == root else state.parent.name
    return None


def _empty(split, root):
    return (f"split `{split}` of `{root}` has no rows; a split needs data: add rows, or choose another split "
            "(data.split, data.val_split, data.test_split)")


def _data_files(datasets, root):
    """(suffix, {split: files}): one .parquet/.arrow file, or a folder's files grouped into splits by their names
    as `datasets.load_dataset` groups them (files that name no split are all `train`)."""
    if root.is_file():
        if root.suffix.lower() not in FILE_SUFFIXES:
            raise UserError(f"data.path `{root}` is a `{root.suffix or '(no extension)'}` file; hf_dataset reads a "
                            "folder written by save_to_disk, or .parquet or .arrow files")
        return root.suffix.lower(), {"train": [str(root)]}
    found = [suffix for suffix in FILE_SUFFIXES if any(root.rglob(f"*{suffix}"))]
    if not found:
        listing = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise UserError(f"data.path `{root}` is not a saved dataset (no {' or '.join(SAVED_MARKERS)}) and holds no "
                        f".parquet or .arrow files (it holds: {listing}); write the dataset with "
                        "save_to_disk(folder) or to_parquet(file), and give that")
    if len(found) > 1:
        raise UserError(f"data.path `{root}` holds both .parquet and .arrow files; a dataset is read from one "
                        "format: give a folder with one of them")
    from datasets.data_files import DataFilesDict, get_data_patterns

    patterns = get_data_patterns(str(root))
    grouped = DataFilesDict.from_patterns(patterns, base_path=str(root), allowed_extensions=found)
    return found[0], {str(name): list(files) for name, files in grouped.items() if files}


def _arrow(datasets, files):
    """The Arrow files of one split, memory-mapped where they lie."""
    parts = [_reading(f, lambda f=f: datasets.Dataset.from_file(f, in_memory=False)) for f in files]
    return parts[0] if len(parts) == 1 else _reading(files[0], lambda: datasets.concatenate_datasets(parts))


def _parquet(datasets, files, split, cache, root):
    """The Parquet files of one split, converted to Arrow in `cache` and memory-mapped from there.

    Parquet is compressed a row group at a time, so one row cannot be read alone: reading rows from the files in
    a shuffled order would decode a whole group for each row (and reading the files whole would need memory for
    all of them). The library's converter instead streams the files a batch at a time into one Arrow file in
    `cache` and nowhere else (with a lock, so processes starting together convert once), named by a hash of the
    files' paths and modification times: later runs reuse it while the files are unchanged."""
    import pyarrow.parquet as pq

    if sum(_reading(f, lambda f=f: pq.ParquetFile(f).metadata.num_rows) for f in files) == 0:
        raise UserError(_empty(split, root))  # which `datasets` reports as "corresponds to no data"
    return _reading(files[0], lambda: datasets.Dataset.from_parquet(files, split=split, cache_dir=str(cache),
                                                                    keep_in_memory=False))


def _reading(where, load):
    try:
        return load()
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign files: `datasets` and pyarrow raise many exception types
        raise UserError(_unreadable(where, exc)) from None


def _unreadable(where, exc):
    text = str(exc).strip().splitlines()
    return (f"cannot read `{where}` as a Hugging Face dataset ({type(exc).__name__}: "
            f"{text[0] if text else 'no details'}); write it again with save_to_disk or to_parquet")


# ---------------------------------------------------------------- which splits


@dataclass
class Plan:
    named: dict[str, str]  # {"train": split, "val": split, "test": split}: sets that are splits of the data
    ratios: dict[str, float]  # {"val": r, "test": r}: sets held out of the training split


def _plan(source, split, val_split, val_ratio, test_split, test_ratio, data_range):
    """The splits to load and the ratios to hold out, with every problem of these options in one message."""
    problems = [_unknown_split(key, value, source)
                for key, value in (("split", split), ("val_split", val_split), ("test_split", test_split))
                if value is not None and (not isinstance(value, str) or value not in source.loaders)]
    if val_split is not None and val_ratio is not None:
        problems.append(f"data.val_split and data.val_ratio are both set ({val_split!r}, {val_ratio!r}); the "
                        "validation set comes from one of them: remove the other")
    if val_split is None and val_ratio is None:
        val_split = next((name for name in VAL_SPLITS if name in source.loaders and name != split), None)
        val_ratio = DEFAULT_VAL_RATIO if val_split is None else None
    named = {role: name for role, name in (("train", split), ("val", val_split), ("test", test_split)) if name}
    for role, other in (("val", "train"), ("test", "train"), ("test", "val")):
        if role in named and named[role] == named.get(other):
            problems.append(f"data.{role}_split is `{named[role]}`, the split of data.{_key(other)} too; a set "
                            f"cannot be {_what(role)} and {_what(other)} data: choose another split, or "
                            f"data.{role}_ratio")
    ratios, more = ratio_problems(val_ratio, val_split, test_ratio, test_split, held="split")
    problems += more
    if data_range is not None and not is_range(data_range):
        problems.append(f"data.data_range must be [low, high] with low < high, got {data_range!r}")
    if problems:
        raise UserError("; ".join(problems))
    return Plan(named, ratios)


def _key(role):
    return "split" if role == "train" else f"{role}_split"


def _what(role):
    return {"train": "training", "val": "validation", "test": "test"}[role]


def _unknown_split(key, value, source):
    if source.single:
        fix = "remove data.split" if key == "split" else f"hold out a fraction with data.{key[:-6]}_ratio instead"
        return (f"data.{key} is `{value}`, but `{source.root}` holds one dataset without splits (read as split "
                f"`train`): {fix}")
    close = difflib.get_close_matches(str(value), source.names, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return (f"data.{key} `{value}` is not a split of `{source.root}`{hint} (its splits: "
            f"{', '.join(source.names)})")


def _split(rows, plan, seed, root):
    """The training set and {role: set} held out of the training split by `plan.ratios`."""
    if not plan.ratios:
        return rows, {}
    train_index, held = split_indices(len(rows), plan.ratios, seed, "hf_dataset/split", root, held="split")
    return rows.subset(train_index), {role: rows.subset(index) for role, index in held.items()}


def _describe_source(source, plan, seed, table, columns):
    held = {role: {f"{role}_split": name} for role, name in plan.named.items() if role != "train"}
    held |= {role: {f"{role}_ratio": float(ratio), "seed": seed} for role, ratio in plan.ratios.items()}
    inputs, targets = columns
    return {
        "path": str(source.root),
        "format": source.kind,
        **({"cache_dir": str(source.cache)} if source.cache else {}),
        "train_split": plan.named["train"],
        "split": held["val"],
        **({"test_split": held["test"]} if "test" in held else {}),
        "input_column": inputs.name,
        "target_column": targets.name,
        "features": {column.name: str(table.features[column.name]) for column in columns},
        "stored": {"inputs": inputs.description, "targets": targets.description},
    }
