"""Samples kept in their files: `.safetensors` and `.npy` tensors indexed by row, read one sample at a time.

A file's header gives each tensor's dtype, shape and byte offset, so building a dataset reads headers only.
`__getitem__` reads one row with `os.preadv` into memory of its own (the file is opened lazily in each process
and never pickled, so DataLoader workers open their own); passes over the whole data (`TensorStore.chunks`, for
the metadata) read blocks of rows the same way.

Why not through a memory map: the file pages a map touches stay mapped in the process and count in its resident
memory, and the kernel maps large folios around each fault. Measured on ext4 (Linux 6.18): 200 single rows read
through a map spread over a 205 MB file raised peak RSS by 190 MB, where `preadv` adds nothing but the rows (the
pages still go through the page cache, shared and reclaimable). See docs/benchmarks.md, "tensor_files memory".

Files that cannot be read by row (`.npz`, often compressed, and `.pt`) are parts held in memory
(`InMemoryColumn`), so a folder may mix them with files read in place.
"""

import bisect
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cr_accel.errors import UserError

# safetensors' dtype names (https://github.com/huggingface/safetensors, `Dtype`) -> torch's, where torch has it
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class FileColumn:
    """One tensor of a file, `rows` samples of `shape` and `dtype` starting at byte `offset`, read in place."""

    def __init__(self, file, key, offset, rows, shape, dtype):
        self.file, self.key, self.offset, self.rows = Path(file), key, offset, rows
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        self._handle = None

    def __getstate__(self):  # an open file belongs to one process: workers started by pickling open their own
        return {**self.__dict__, "_handle": None}

    def row(self, index):
        """Sample `index` as a tensor that owns its memory."""
        return self.read(index, index + 1)[0]

    def read(self, start, stop):
        """Samples start..stop-1, read with one `preadv` into memory of their own (see the module docstring)."""
        buffer = bytearray((stop - start) * self.row_bytes)
        if buffer:
            if self._handle is None:  # kept open: a forked worker shares it safely, preadv has no file position
                self._handle = open(self.file, "rb", buffering=0)
            got = os.preadv(self._handle.fileno(), [buffer], self.offset + start * self.row_bytes)
            if got != len(buffer):
                raise UserError(f"`{self.file}` ended while reading `{self.key}`: it was cut off after the dataset "
                                "was built; write it again")
        return self._as_tensor(buffer, stop - start)

    def _as_tensor(self, data, count):
        flat = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        return flat.view(self.dtype).view(count, *self.shape)


class InMemoryColumn:
    """One tensor loaded whole (from a `.npz` or `.pt` file), with the interface of `FileColumn`."""

    def __init__(self, file, key, tensor):
        self.file, self.key, self.tensor = Path(file), key, tensor
        self.rows, self.shape, self.dtype = len(tensor), tuple(tensor.shape[1:]), tensor.dtype

    def row(self, index):
        return self.tensor[index]

    def read(self, start, stop):
        return self.tensor[start:stop]


class TensorStore(Dataset):
    """(input, target) samples of several files (`parts`: one (inputs, targets) column pair per file) seen as
    one sequence in the files' order, optionally restricted to the global rows `index` (a split)."""

    def __init__(self, parts, index=None):
        self.parts = list(parts)
        self.starts = [0]
        for inputs, _ in self.parts:
            self.starts.append(self.starts[-1] + inputs.rows)
        self.index = index

    def subset(self, index):
        """The samples at `index` (positions in this store) as a store of their own."""
        index = torch.as_tensor(index, dtype=torch.long)
        return TensorStore(self.parts, index if self.index is None else self.index[index])

    @property
    def on_disk(self):
        return any(isinstance(inputs, FileColumn) for inputs, _ in self.parts)

    def __len__(self):
        return self.starts[-1] if self.index is None else len(self.index)

    def __getitem__(self, position):
        if not -len(self) <= position < len(self):
            raise IndexError(f"sample {position} of a dataset of {len(self)}")
        position %= len(self)
        row = position if self.index is None else int(self.index[position])
        part = bisect.bisect_right(self.starts, row) - 1
        inputs, targets = self.parts[part]
        local = row - self.starts[part]
        return inputs.row(local), targets.row(local)

    @property
    def tensors(self):
        """(inputs, targets) of every sample, read into memory: for small data (and like `TensorDataset`'s)."""
        pairs = list(self.chunks(max(len(self), 1)))
        return tuple(torch.cat([p[k] for p in pairs]) if pairs else self._empty(k) for k in (0, 1))

    def _empty(self, column):
        first = self.parts[0][column]
        return torch.empty(0, *first.shape, dtype=first.dtype)

    def chunks(self, size, columns=(0, 1)):
        """(inputs, targets) of `size` consecutive samples at a time (the last chunk may be shorter); only the
        `columns` asked for are read (the others are None). Memory is bounded by one chunk."""
        for begin in range(0, len(self), size):
            stop = min(begin + size, len(self))
            rows = torch.arange(begin, stop) if self.index is None else self.index[begin:stop]
            yield tuple(self._gather(rows, c) if c in columns else None for c in (0, 1))

    def _gather(self, rows, column):
        """Column `column` of the global `rows`, each run of consecutive rows in one file read at once."""
        rows = rows.numpy()
        parts = np.searchsorted(self.starts, rows, side="right") - 1
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(parts) != 0)) + 1
        bounds = [0, *breaks.tolist(), len(rows)]
        pieces = []
        for first, end in zip(bounds[:-1], bounds[1:]):
            part = int(parts[first])
            local = int(rows[first]) - self.starts[part]
            pieces.append(self.parts[part][column].read(local, local + end - first))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def open_safetensors(file, keys, settings):
    """FileColumns for `keys` of a .safetensors file, from its header (8 bytes of length, then JSON)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise UserError(f"cannot read `{file}`: it is not a .safetensors file (no valid header; corrupt, cut "
                            "off, or written by something else)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise UserError(f"cannot read `{file}`: its .safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise UserError(f"cannot read `{file}`: its .safetensors header is not a table of tensors")
    header.pop("__metadata__", None)
    check_keys(file, keys, list(header), settings)
    columns = []
    for key in keys:
        entry = header[key]
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"cannot read `{file}`: the header entry of `{key}` is malformed ({entry!r})") from None
        torch_dtype = getattr(torch, _SAFETENSORS_DTYPES.get(dtype, ""), None)
        if torch_dtype is None:
            raise UserError(f"`{key}` in `{file}` has dtype {dtype}, which cannot be read here; save it as a "
                            "float or integer tensor")
        columns.append(_column(file, key, 8 + length + begin, shape, torch_dtype, 8 + length + end, size))
    return tuple(columns)


def open_npy(file, key):
    """The FileColumn of one uncompressed .npy file (numpy.save), from its header."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = read_header.get(version, np.lib.format.read_array_header_2_0)(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read `{file}`: it is not a .npy file written by numpy.save ({exc})") from None
    if dtype.hasobject:
        raise UserError(f"`{key}` in `{file}` holds Python objects, which cannot be read without pickle; save it "
                        "as a numeric array")
    if fortran and len(shape) > 1:
        raise UserError(f"`{file}` is stored in Fortran order, so a sample is not one block of the file; save it "
                        "with numpy.save(path, numpy.ascontiguousarray(array))")
    if not dtype.isnative:
        raise UserError(f"`{file}` holds {dtype.str} data, not in this machine's byte order; save it with "
                        "numpy.save(path, array.astype(array.dtype.newbyteorder('=')))")
    try:
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        raise UserError(f"`{key}` in `{file}` has dtype {dtype}, which torch cannot hold; save numbers") from None
    rows_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return _column(file, key, offset, list(shape), torch_dtype, offset + rows_bytes, size)


def _column(file, key, begin, shape, dtype, end, size):
    if not shape:
        raise UserError(f"`{key}` in `{file}` is a scalar; it needs a first dimension indexing the samples")
    column = FileColumn(file, key, begin, shape[0], shape[1:], dtype)
    if end - begin != column.rows * column.row_bytes or end > size:
        raise UserError(f"`{file}` is cut off or corrupt: its header puts `{key}` ({dtype_name(dtype)}, shape "
                        f"{tuple(shape)}) at bytes {begin}..{end}, but the file has {size} bytes; write it again")
    return column


def check_keys(file, keys, present, settings):
    for setting, key in zip(settings, keys):
        if key not in present:
            raise UserError(
                f"`{file}` has no `{key}` tensor (keys present: {', '.join(sorted(present)) or 'none'}); "
                f"set {setting} to the right one"
            )


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def columns_metadata(inputs, targets):
    """The metadata keys of the per-sample shapes and dtypes of an inputs and a targets column (anything with
    `.shape` and `.dtype` of one sample)."""
    return {"input_shape": list(inputs.shape), "target_shape": list(targets.shape),
            "input_dtype": dtype_name(inputs.dtype), "target_dtype": dtype_name(targets.dtype)}
