"""The columns of a Hugging Face dataset as tensors: one row read per `__getitem__`, every row checked at build.

Imported by `hf_dataset` when it runs, never with `cr_accel`: pyarrow comes with `datasets`, in the `hf` extra.

A row is fetched through the `datasets` "arrow" format (a one-row pyarrow Table) and converted here rather than
by the library's "numpy" or "torch" formats, which change dtypes (uint8 and float16 columns arrive as int64 and
float32): a sample keeps its stored dtype, as tensor_files' samples do. Image columns hold encoded files, decoded
by `image_files` exactly as image_folder decodes files on disk.

The checks at build read what they need in chunks of rows: list lengths and validity bitmaps for number columns
(never the values), image headers for image columns. They name the row that fails as the user would index it:
`data/x["train"][17]["inputs"]`.
"""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from cr_accel.errors import UserError

from .files import STATS_BYTES, STATS_CHUNK
from .image_files import EncodedImage, ImageHeader, ImageSource, decode_image, read_header
from .tensor_store import dtype_name

FIX_SHAPE = "every value of a column needs one shape: pad or crop them, or remove those rows (Dataset.filter)"


class Place:
    """Where a split's rows come from, to name a row in messages."""

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split

    def at(self, row: int, column: str) -> str:
        return f'{self.root}["{self.split}"][{row}]["{column}"]'


class NumericColumn:
    """Numbers: a scalar (`Value`, `ClassLabel`) or nested lists of one shape (`Sequence`, `List`, `Array2D`,
    `Array3D`), as a tensor of the stored dtype."""

    def __init__(self, name: str, shape: tuple[int, ...], stored: torch.dtype, first: str,
                 dtype: torch.dtype | None = None) -> None:
        self.name, self.shape, self.stored = name, shape, stored
        self.dtype = dtype or stored  # of the samples: class labels are int64 whatever integer type stores them
        self.first = first  # the row the shape was taken from, for messages

    def as_labels(self) -> "NumericColumn":
        return NumericColumn(self.name, self.shape, self.stored, self.first, torch.int64)

    @property
    def description(self) -> str:
        return dtype_name(self.stored)

    def values(self, array: pa.Array) -> np.ndarray:
        """The rows of `array` as one `(rows, *shape)` array, a view of the Arrow buffers where possible."""
        rows = len(array)
        array = _storage(array)
        while _is_list(array.type):
            array = _storage(array.flatten())
        return array.to_numpy(zero_copy_only=False).reshape(rows, *self.shape)

    def sample(self, array: pa.Array, where: str) -> torch.Tensor:
        # A copy: the tensor owns its memory instead of pinning a page of the memory-mapped file (read-only).
        sample = torch.from_numpy(np.array(self.values(array)[0]))
        return sample if sample.dtype == self.dtype else sample.to(self.dtype)

    def check(self, array: pa.Array, rows: np.ndarray, place: Place) -> None:
        """Every row of `array` (row numbers `rows`) has this column's shape and no missing value: from the list
        lengths and validity bitmaps only. Levels are checked outside in, so at depth d every row so far holds
        exactly `per_row` lists and element e belongs to row e // per_row."""
        array, per_row = _storage(array), 1
        for depth, expected in enumerate(self.shape):
            self._no_missing(array, rows, per_row, place)
            lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != expected)
            if bad.size:
                where = place.at(int(rows[bad[0] // per_row]), self.name)
                raise UserError(f"{where} has {lengths[bad[0]]} entries along dimension {depth}, but {self.first} "
                                f"(shape {list(self.shape)}) has {expected}; {FIX_SHAPE}")
            per_row *= expected
            array = _storage(array.flatten())
        self._no_missing(array, rows, per_row, place)

    def _no_missing(self, array, rows, per_row, place):
        if array.null_count:
            first = int(np.flatnonzero(~array.is_valid().to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{place.at(int(rows[first // per_row]), self.name)} holds a missing value (null); fill "
                            "it or remove the row (Dataset.filter)")


class ImageColumn:
    """Encoded images (the `Image` feature: PNG, JPEG or TIFF bytes, or the path of a local file), decoded to a
    `C x H x W` float32 tensor scaled as image_folder's (8-bit / 255, 16-bit / 65535, floating point as stored).
    Every row must match `header`, the first training row's: channels, bit depth and size."""

    dtype = torch.float32

    def __init__(self, name: str, header: ImageHeader) -> None:
        self.name, self.header = name, header

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.header.channels, self.header.height, self.header.width)

    @property
    def description(self) -> str:
        return f"{self.header.dtype} images"

    def sample(self, array: pa.Array, where: str) -> torch.Tensor:
        return decode_image(image_source(array[0].as_py(), where))

    def check(self, array: pa.Array, rows: np.ndarray, place: Place) -> None:
        """Every image of `array` has the reference's channels, bit depth and size (headers only)."""
        first = self.header
        for j in range(len(array)):
            where = place.at(int(rows[j]), self.name)
            header = read_header(image_source(array[j].as_py(), where))
            if (header.channels, header.dtype, header.height, header.width) != (
                    first.channels, first.dtype, first.height, first.width):
                raise UserError(f"{where} is a {header.kind} image of {header.size_text} but {first.file} is a "
                                f"{first.kind} image of {first.size_text}; every image of a column needs one size, "
                                "channels and bit depth: convert or resize it, or remove the row (Dataset.filter)")


Column = NumericColumn | ImageColumn


def image_source(value: dict | None, where: str) -> ImageSource:
    """The encoded image of an `Image` cell: its bytes, else the local file its path names."""
    if value is None:
        raise UserError(f"{where} holds no image (null); remove the row (Dataset.filter)")
    if value.get("bytes") is not None:
        return EncodedImage(where, value["bytes"])
    path = value.get("path")
    if path and Path(path).is_file():
        return Path(path)
    raise UserError(f"{where} holds no image bytes, only the path `{path}`, which is not a file here; embed the "
                    "images (save_to_disk embeds them; for Parquet, write the dataset with save_to_disk instead)")


def numeric_column(name: str, array: pa.Array, first: str) -> NumericColumn:
    """The column `name` described by its first value (`array`, one row): shape from the list lengths, dtype
    from the Arrow leaf type, which must hold numbers."""
    shape, array = [], _storage(array)
    while _is_list(array.type):
        if array.null_count:
            raise UserError(f"{first} holds a missing value (null); fill it or remove the row (Dataset.filter)")
        shape.append(int(pc.list_value_length(array)[0].as_py()))
        array = _storage(array.flatten())
    leaf = array.type
    if not (pa.types.is_integer(leaf) or pa.types.is_floating(leaf) or pa.types.is_boolean(leaf)):
        raise UserError(f"column `{name}` holds {leaf} values ({first}); hf_dataset reads numbers (scalars, lists, "
                        "Array2D/3D) and images: choose another column, or convert it (Dataset.map)")
    if 0 in shape:
        raise UserError(f"{first} is empty (shape {shape}); every value needs at least one number: remove the row "
                        "(Dataset.filter) or choose another column")
    try:
        dtype = torch.from_numpy(np.empty(0, dtype=leaf.to_pandas_dtype())).dtype
    except (TypeError, NotImplementedError):
        raise UserError(f"column `{name}` holds {leaf} values, which torch cannot hold; convert it") from None
    return NumericColumn(name, tuple(shape), dtype, first)


def _is_list(kind):
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _storage(array):
    """The plain Arrow array under an extension array (Array2D and Array3D are lists of lists underneath)."""
    return array.storage if isinstance(array, pa.ExtensionArray) else array


class HFRows(Dataset):
    """(input, target) samples of the rows `index` of one split of a Hugging Face dataset (all rows when None),
    one row read per `__getitem__`. Picklable for DataLoader workers: a dataset loaded from disk pickles as its
    files' paths and reopens them (memory-mapped) on the other side."""

    def __init__(self, table, place: Place, columns: tuple[Column, Column], index: torch.Tensor | None = None):
        names = list(dict.fromkeys(column.name for column in columns))  # the input may be the target too
        self.rows = table.with_format("arrow", columns=names)
        self.place, self.columns, self.index = place, columns, index

    def subset(self, index: torch.Tensor) -> "HFRows":
        """The rows at `index` (positions in this set) as a set of their own."""
        chosen = index if self.index is None else self.index[index]
        subset = HFRows.__new__(HFRows)
        subset.rows, subset.place, subset.columns, subset.index = self.rows, self.place, self.columns, chosen
        return subset

    def __len__(self) -> int:
        return len(self.rows) if self.index is None else len(self.index)

    def row(self, position: int) -> int:
        """The split's row number of sample `position`."""
        if not -len(self) <= position < len(self):
            raise IndexError(f"sample {position} of a dataset of {len(self)}")
        position %= len(self)
        return position if self.index is None else int(self.index[position])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.row(position)
        record = self.rows[row]
        x, y = (column.sample(record.column(column.name).combine_chunks(), self.place.at(row, column.name))
                for column in self.columns)
        return x, y

    def chunks(self, column: Column, size: int):
        """(row numbers, Arrow array of `column`) over this set's rows, at most `size` rows at a time; a set of
        consecutive rows is sliced without copying."""
        for begin in range(0, len(self), size):
            if self.index is None:
                rows = np.arange(begin, min(begin + size, len(self)))
                table = self.rows[begin : begin + size]
            else:
                rows = self.index[begin : begin + size].numpy()
                table = self.rows[rows.tolist()]
            offset = 0
            for part in table.column(column.name).chunks:
                yield rows[offset : offset + len(part)], part
                offset += len(part)

    def check_rows(self, size: int) -> None:
        """Every row of both columns, as `Column.check` says."""
        for column in dict((c.name, c) for c in self.columns).values():
            for rows, part in self.chunks(column, size):
                column.check(part, rows, self.place)


# ---------------------------------------------------------------- the columns of a dataset, and what they make


def read_columns(datasets, tables, split, names, root):
    """(inputs, targets) columns, described from the first row of the training split; the other splits read must
    have both columns with the same features."""
    reference = tables[split].features
    for name, table in tables.items():
        missing = [(setting, column) for setting, column in zip(("data.input_column", "data.target_column"), names)
                   if column not in table.features]
        if missing:
            given = " and ".join(f"{setting} `{column}`" for setting, column in missing)
            raise UserError(f"{given}: no such column in split `{name}` of `{root}` (its columns: "
                            f"{', '.join(table.features)}); set {missing[0][0]} to one of them")
        for column in names:
            if table.features[column] != reference[column]:
                raise UserError(f"column `{column}` is {table.features[column]} in split `{name}` but "
                                f"{reference[column]} in split `{split}`; every split needs the same columns")
    first = tables[split].with_format("arrow", columns=list(dict.fromkeys(names)))[0]
    place = Place(root, split)
    columns = []
    for column in names:
        array, where = first.column(column).combine_chunks(), place.at(0, column)
        if isinstance(reference[column], datasets.Image):
            image = image_source(array[0].as_py(), where)
            columns.append(ImageColumn(column, read_header(image)))
            decode_image(image)  # a corrupt first image shows now; the others' headers are read by check_rows
        else:
            columns.append(numeric_column(column, array, where))
    return columns[0], columns[1]


def task_of(inputs, targets):
    """tensor_files' rule: classification for integer scalar targets, reconstruction for floating targets shaped
    like the inputs, regression otherwise."""
    kind = targets.dtype
    if isinstance(targets, NumericColumn) and targets.shape == () and not (
            kind.is_floating_point or kind.is_complex or kind == torch.bool):
        return "classification"
    return "reconstruction" if kind.is_floating_point and targets.shape == inputs.shape else "regression"


def chunk_rows(columns):
    """Rows per step of a pass over the data: at most STATS_CHUNK, and STATS_BYTES of samples."""
    row_bytes = sum(math.prod(column.shape) * column.dtype.itemsize for column in columns)
    return max(1, min(STATS_CHUNK, STATS_BYTES // max(1, row_bytes)))


def class_keys(datasets, feature, targets, sets, size):
    """{"num_classes": K} (and "classes": names, from a ClassLabel), K from the ClassLabel, else the largest
    label + 1; every label of the splits read is checked to be a class."""
    known = feature.num_classes if isinstance(feature, datasets.ClassLabel) else None
    largest = -1
    for rows in sets:
        for numbers, part in rows.chunks(targets, size):
            labels = targets.values(part)
            bad = np.flatnonzero((labels < 0) | (labels >= (known if known is not None else np.inf)))
            if bad.size:
                label = labels[bad[0]].item()
                allowed = f"0..{known - 1} (its ClassLabel's {known} classes)" if known is not None else ">= 0"
                raise UserError(f"{rows.place.at(int(numbers[bad[0]]), targets.name)} has label {label}, but class "
                                f"labels must be {allowed}; unlabelled rows (-1, as in many test splits) cannot be "
                                "trained or scored: choose a labelled split, or remove them (Dataset.filter)")
            largest = max(largest, int(labels.max()))
    return {"num_classes": known, "classes": list(feature.names)} if known is not None else {
        "num_classes": largest + 1}


def data_range_of(targets, train, given, size):
    """[low, high] of the targets: given, or [0, 1] for 8- and 16-bit images, or observed in the training targets
    (one pass, in chunks) for floating-point ones; None for other integer targets."""
    if given is not None:
        return [float(given[0]), float(given[1])]
    if isinstance(targets, ImageColumn) and targets.header.integer:
        return [0.0, 1.0]
    if not targets.dtype.is_floating_point:
        return None
    low, high = math.inf, -math.inf
    for rows, part in train.chunks(targets, size):
        if isinstance(targets, ImageColumn):
            values = np.stack([targets.sample(part.slice(j, 1), train.place.at(int(rows[j]), targets.name)).numpy()
                               for j in range(len(part))])
        else:
            values = targets.values(part)
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if not finite.all():
            where = train.place.at(int(rows[np.flatnonzero(~finite)[0]]), targets.name)
            raise UserError(f"{where} holds NaN or infinite values: clean the targets, or remove the row "
                            "(Dataset.filter)")
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return [low, high]
