"""What each accelerate distributed type writes into a checkpoint folder, and how to read its model back.

    layout = detect(folder)            # which layout a folder holds (CheckpointError if none fits)
    layout.allows("optimizer.bin")     # the per-layout allow-list of relative paths
    model_shapes(folder)               # {parameter name: shape}, without materialising the model
    load_model_state(folder)           # the full, plain state dict (shards merged)

Parameter names are always plain: no `_orig_mod.` (torch.compile) and no `module.` (DDP) prefix, so a run
may resume with compile on or off and a model loads whatever wrapped it during training.

What accelerate 1.15 `save_state` writes (accelerator.py, utils/fsdp_utils.py, checkpointing.py); FSDP v1 and
v2 go through the same `save_fsdp_model` / `save_fsdp_optimizer` and write the same names:

    plain               model.safetensors (pytorch_model.bin with safe_serialization=False), optimizer.bin
    fsdp_sharded        pytorch_model_fsdp_0/ and optimizer_0/: torch.distributed.checkpoint folders
    fsdp_sharded_local  pytorch_model_fsdp_rank<R>.bin (LOCAL_STATE_DICT, FSDP v1 only) with optimizer_0/,
                        or pytorch_model_fsdp_0_rank<R>.bin + optimizer_0_rank<R>.bin (use_dcp=False)
    fsdp_full           pytorch_model_fsdp.bin, optimizer.bin (FULL_STATE_DICT, main process only)
    deepspeed           pytorch_model/ (DeepSpeed's save_checkpoint tag folder), latest, zero_to_fp32.py

Nothing here unpickles an object: tensor files go through `torch.load(weights_only=True)`, DCP's `.metadata`
through an unpickler that knows only DCP's metadata classes.
"""

import math
import pickle
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import CheckpointError

# cr_accel's own files, in every layout.
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
CONFIG = "config.yaml"
OWN_FILES = (TRAINER_STATE, TRAINER_TENSORS, CONFIG)
# accelerate writes these in every layout (random_states on every rank, scaler.pt with fp16).
_COMMON = re.compile(r"^(random_states_\d+\.pkl|scaler\.pt)$")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# What torch.distributed.checkpoint's FileSystemWriter puts in a folder: `.metadata` from the coordinator and
# `__<rank>_<n>.distcp` shards (filesystem.py); accelerate saves with collectives, so no `__<rank>.metadata`.
_DCP_SHARD = r"__\d+_\d+\.distcp"
_DCP_FILE = rf"(\.metadata|{_DCP_SHARD})"


def plain_name(key):
    """`_orig_mod.encoder.weight` (compiled) or `module.encoder.weight` (DDP) -> `encoder.weight`."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        key = key.replace("._orig_mod.", ".")
    return key


@dataclass(frozen=True)
class Layout:
    name: str
    model_pattern: re.Pattern  # accelerate's model/optimizer files and folders of this layout (relative paths)

    def allows(self, relative_path):
        # fullmatch: with match, `$` would also accept a name that ends in a newline
        return (relative_path in OWN_FILES or bool(_COMMON.fullmatch(relative_path))
                or bool(self.model_pattern.fullmatch(relative_path)))


PLAIN = Layout("plain", re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model(_\d+)?\.bin|optimizer(_\d+)?\.bin)$"))
FSDP_SHARDED = Layout("fsdp_sharded", re.compile(rf"^(pytorch_model_fsdp_\d+|optimizer_\d+)/{_DCP_FILE}$"))
FSDP_SHARDED_LOCAL = Layout("fsdp_sharded_local", re.compile(
    rf"^(pytorch_model_fsdp(_\d+)?_rank\d+\.bin|optimizer_\d+_rank\d+\.bin|optimizer_\d+/{_DCP_FILE})$"))
FSDP_FULL = Layout("fsdp_full", re.compile(r"^(pytorch_model_fsdp(_\d+)?\.bin|optimizer(_\d+)?\.bin)$"))
# DeepSpeed's engine.py names: `_get_ckpt_name` (mp_rank_00_model_states.pt; ZeRO-3 one per rank),
# `_get_rank_zero_ckpt_name` ((bf16_)zero_pp_rank_<R>_mp_rank_00_optim_states.pt), and beside the tag folder
# `latest` (the tag) and `zero_to_fp32.py` (`_copy_recovery_script`). Only model-parallel rank 00: accelerate
# does not combine DeepSpeed with tensor parallelism, and zero_to_fp32 reads no other.
DEEPSPEED = Layout("deepspeed", re.compile(
    r"^(latest|zero_to_fp32\.py|pytorch_model(_\d+)?/(mp_rank_00_model_states\.pt"
    r"|(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt|zero_pp_rank_\d+_mp_rank_00_model_states\.pt))$"))
LAYOUTS = (PLAIN, FSDP_SHARDED, FSDP_SHARDED_LOCAL, FSDP_FULL, DEEPSPEED)

_LOCAL_RANK0 = re.compile(r"^pytorch_model_fsdp(_0)?_rank0\.bin$")
_DEEPSPEED_TAG = "pytorch_model"  # accelerate's save_checkpoint tag for its first model (MODEL_NAME)


def detect(folder):
    """The layout of `folder`, from the file or folder only that layout's first model has."""
    folder = Path(folder)
    markers = (
        (DEEPSPEED, (folder / _DEEPSPEED_TAG).is_dir()),
        (FSDP_SHARDED, (folder / "pytorch_model_fsdp_0").is_dir()),
        (FSDP_SHARDED_LOCAL, folder.is_dir() and any(_LOCAL_RANK0.match(p.name) for p in folder.iterdir())),
        (FSDP_FULL, (folder / "pytorch_model_fsdp.bin").is_file()),
        (PLAIN, (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()),
    )
    for layout, present in markers:
        if present:
            return layout
    raise CheckpointError(f"checkpoint `{folder}` holds no model in a layout cr_accel knows "
                          f"({', '.join(layout.name for layout in LAYOUTS)}); use another checkpoint")


def model_shapes(folder):
    """{plain name: shape} from headers and metadata only; no weight is read into memory."""
    folder = Path(folder)
    return _READERS[detect(folder).name][0](folder)


def load_model_state(folder, device="cpu"):
    folder = Path(folder)
    state = _READERS[detect(folder).name][1](folder)
    return {name: tensor.to(device) for name, tensor in state.items()}


# ---------------------------------------------------------------- files written by torch.save


def _torch_load(file, checkpoint):
    """torch.load that refuses objects (weights_only) and maps the file instead of reading it (mmap), so shapes
    cost no memory. Every way a file can fail to be a tensor pickle becomes one CheckpointError."""
    relative = Path(file).relative_to(checkpoint).as_posix()
    if not Path(file).is_file():
        raise CheckpointError(f"checkpoint `{checkpoint}` is missing `{relative}`; use another checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, OSError) as exc:
        raise CheckpointError(f"checkpoint `{checkpoint}`: `{relative}` is not a tensor file cr_accel can read "
                              f"without running code ({_reason(exc)}); refusing to load it") from None


def _reason(exc):
    """What is wrong, in one line. A weights_only refusal is a paragraph that suggests weights_only=False (exactly
    what must not be done with an untrusted checkpoint); the class it refused is the useful part."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if refused:
        return f"it refers to `{refused.group(1)}`, which weights_only loading does not admit"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _state_dict(obj, checkpoint, what):
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"checkpoint `{checkpoint}`: {what} is not a state dict (names to tensors)")
    return {plain_name(k): v for k, v in obj.items()}


def _bin_state(checkpoint, name):
    return _state_dict(_torch_load(checkpoint / name, checkpoint), checkpoint, f"`{name}`")


def _shapes_of(state):
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


# ---------------------------------------------------------------- plain and fsdp_full


def _plain_shapes(folder):
    from safetensors import safe_open

    if not (folder / "model.safetensors").is_file():
        return _shapes_of(_bin_state(folder, "pytorch_model.bin"))
    with _safetensors_errors(folder), safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {plain_name(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _plain_state(folder):
    from safetensors.torch import load_file

    if not (folder / "model.safetensors").is_file():
        return _clone(_bin_state(folder, "pytorch_model.bin"))
    with _safetensors_errors(folder):
        return {plain_name(k): v for k, v in load_file(folder / "model.safetensors").items()}


@contextmanager
def _safetensors_errors(checkpoint):
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint `{checkpoint}`: `model.safetensors` is not a safetensors file "
                              f"({_reason(exc)}); use another checkpoint") from None


def _clone(state):
    """Own memory instead of the mmap'ed file, so the checkpoint may be deleted or rotated afterwards."""
    return {name: tensor.clone() for name, tensor in state.items()}


def _fsdp_full_shapes(folder):
    return _shapes_of(_bin_state(folder, "pytorch_model_fsdp.bin"))


def _fsdp_full_state(folder):
    return _clone(_bin_state(folder, "pytorch_model_fsdp.bin"))


def _fsdp_local(folder):
    raise CheckpointError(
        f"checkpoint `{folder}` holds per-rank FSDP shards (pytorch_model_fsdp*_rank<R>.bin: LOCAL_STATE_DICT or "
        "use_dcp=False): pieces of flattened parameters that cr_accel does not reassemble, so it cannot check or "
        "load this model. Train with fsdp_state_dict_type SHARDED_STATE_DICT (the default) or FULL_STATE_DICT")


# ---------------------------------------------------------------- fsdp_sharded: torch.distributed.checkpoint

# Everything a DCP `.metadata` pickle names (metadata.py, filesystem.py; pathlib for StorageMeta.checkpoint_id):
# data classes, torch.Size, torch dtypes and torch.serialization._get_layout, which maps a layout's name back.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath"},  # Python >= 3.13 pickles paths under this name
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP reads `.metadata` with plain pickle.load, which would run any code a tampered file names."""

    def find_class(self, module, name):
        if name in _DCP_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                       torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"`{module}.{name}` is not part of torch.distributed.checkpoint metadata")


def _dcp_metadata(dcp_dir, checkpoint):
    """The checked metadata of one DCP folder: every shard it lists is a `__R_N.distcp` file here, long enough."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    relative = dcp_dir.relative_to(checkpoint).as_posix()
    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointError(f"checkpoint `{checkpoint}` is missing `{relative}/.metadata`; use another checkpoint")
    try:
        with open(dcp_dir / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as exc:  # a corrupt pickle can fail in any of a dozen exception types
        raise CheckpointError(f"checkpoint `{checkpoint}`: `{relative}/.metadata` is not DCP metadata cr_accel "
                              f"can read without running code ({exc}); refusing to load it") from None
    entries = getattr(metadata, "storage_data", None)
    if (not isinstance(metadata, Metadata) or not isinstance(entries, dict)
            or not all(isinstance(i, _StorageInfo) and isinstance(i.offset, int) and isinstance(i.length, int)
                       for i in entries.values())):
        raise CheckpointError(f"checkpoint `{checkpoint}`: `{relative}/.metadata` is not DCP metadata")
    _check_shards(dcp_dir, entries.values(), checkpoint)
    return metadata


def _check_shards(dcp_dir, entries, checkpoint):
    """Before DCP opens anything: a shard name that is not DCP's could point outside the folder (`../x`)."""
    relative = dcp_dir.relative_to(checkpoint).as_posix()
    ends = {}
    for info in entries:
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for shard, end in sorted(ends.items(), key=lambda item: str(item[0])):
        if not isinstance(shard, str) or not re.fullmatch(_DCP_SHARD, shard) or not (dcp_dir / shard).is_file():
            raise CheckpointError(f"checkpoint `{checkpoint}`: the shard `{relative}/{shard}` that its metadata "
                                  "lists is missing; the checkpoint is incomplete, use another one")
        if (dcp_dir / shard).stat().st_size < end:
            raise CheckpointError(f"checkpoint `{checkpoint}`: the shard `{relative}/{shard}` is shorter than its "
                                  "metadata says (truncated); use another checkpoint")


def _dcp_tensors(metadata, checkpoint):
    """{stored key: TensorStorageMetadata} of accelerate's `{"model": state_dict}`; non-tensor entries would be
    torch.load'ed with weights_only=False by DCP, so they are refused."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not key.startswith("model.") or not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint `{checkpoint}`: the sharded model holds `{key}`, which is not a "
                                  "tensor of accelerate's saved model; refusing to load it")
        tensors[key] = entry
    return tensors


def _fsdp_sharded_shapes(folder):
    tensors = _dcp_tensors(_dcp_metadata(folder / "pytorch_model_fsdp_0", folder), folder)
    return {plain_name(key[len("model."):]): tuple(entry.size) for key, entry in tensors.items()}


def _fsdp_sharded_state(folder):
    """The merge `accelerate merge-weights` does (DCP load into full-size tensors, no process group), but fed
    the metadata read above instead of letting DCP unpickle it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    dcp_dir = folder / "pytorch_model_fsdp_0"
    metadata = _dcp_metadata(dcp_dir, folder)
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in _dcp_tensors(metadata, folder).items()}

    class CheckedMetadataReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            return metadata

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is the intent
            dcp.load(state, storage_reader=CheckedMetadataReader(dcp_dir), no_dist=True)
    except (CheckpointException, RuntimeError, OSError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint `{folder}`: the sharded model in `pytorch_model_fsdp_0/` cannot be "
                              f"read ({_reason(exc)}); use another checkpoint") from None
    return {plain_name(key[len("model."):]): tensor for key, tensor in state.items()}


# ---------------------------------------------------------------- deepspeed


class _DeepSpeedObject:
    """Stands in for the few DeepSpeed objects its pickles hold (loss scaler, ZeRO stage enum) so the files load
    under weights_only without deepspeed installed: it keeps the pickled fields and runs no code."""

    def __init__(self, *args):
        self.args = args


_DEEPSPEED_GLOBALS = [(_DeepSpeedObject, name) for name in (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum")]


def _deepspeed_load(file, checkpoint):
    with torch.serialization.safe_globals(_DEEPSPEED_GLOBALS):
        loaded = _torch_load(file, checkpoint)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint `{checkpoint}`: `{Path(file).relative_to(checkpoint).as_posix()}` "
                              "is not a DeepSpeed checkpoint file")
    return loaded


def _ranked_files(tag_dir, pattern, checkpoint, what):
    """The files of ranks 0..N-1 in rank order; a gap means a rank's file is missing."""
    found = {int(m.group(1)): p for p in tag_dir.iterdir() if (m := re.fullmatch(pattern, p.name))}
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"checkpoint `{checkpoint}`: the DeepSpeed {what} files of {_DEEPSPEED_TAG}/ are not "
                              f"one per rank from 0 (found ranks {sorted(found)}); the checkpoint is incomplete")
    return [found[rank] for rank in sorted(found)]


def _zero3_model_states(folder):
    return _ranked_files(folder / _DEEPSPEED_TAG, r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt", folder,
                         "model-state")


def _is_zero3(folder):
    tag_dir = folder / _DEEPSPEED_TAG
    return (not (tag_dir / "mp_rank_00_model_states.pt").is_file()
            and (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file())


def _zero3_parts(states, checkpoint, key):
    """The entry `key` of DeepSpeed's model-state file as one {name: value} (param_shapes is a list of groups)."""
    value = states.get(key) or {}
    groups = value if isinstance(value, list) else [value]
    if not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"checkpoint `{checkpoint}`: DeepSpeed's `{key}` is not a name-to-shape mapping")
    return {name: shape for group in groups for name, shape in group.items()}


def _deepspeed_shapes(folder):
    if not _is_zero3(folder):
        return _shapes_of(_deepspeed_module(folder))
    states = _deepspeed_load(_zero3_model_states(folder)[0], folder)
    shapes = _shapes_of(_zero3_buffers(states, folder))
    for key in ("frozen_param_shapes", "param_shapes"):
        shapes.update({plain_name(n): tuple(s) for n, s in _zero3_parts(states, folder, key).items()})
    for alias, source in (states.get("shared_params") or {}).items():
        shapes[plain_name(alias)] = shapes[plain_name(source)]
    return shapes


def _deepspeed_state(folder):
    if not _is_zero3(folder):
        return _clone(_deepspeed_module(folder))
    return _zero3_state(folder)


def _deepspeed_module(folder):
    """ZeRO-0/1/2 keep the whole module (in the training precision) in mp_rank_00_model_states.pt."""
    states = _deepspeed_load(folder / _DEEPSPEED_TAG / "mp_rank_00_model_states.pt", folder)
    return _state_dict(states.get("module"), folder, f"the `module` of {_DEEPSPEED_TAG}/mp_rank_00_model_states.pt")


def _zero3_buffers(states, checkpoint):
    """Under ZeRO-3 `module` holds real buffers but empty placeholders for parameters; `buffer_names` says which."""
    module = _state_dict(states.get("module"), checkpoint, "the `module` of a ZeRO-3 model-state file")
    names = {plain_name(name) for name in states.get("buffer_names") or ()}
    return {name: tensor for name, tensor in module.items() if name in names}


def _zero3_state(folder):
    """Full fp32 parameters from the per-rank flat partitions, the way DeepSpeed's zero_to_fp32 does: each
    parameter of n elements has ceil(n / ranks) of them on every rank (the last padded), in param_shapes order."""
    model_files = _zero3_model_states(folder)
    optim_files = _ranked_files(folder / _DEEPSPEED_TAG, r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt",
                                folder, "optimizer-state")
    if len(optim_files) != len(model_files):
        raise CheckpointError(f"checkpoint `{folder}`: {len(model_files)} ZeRO-3 model-state files but "
                              f"{len(optim_files)} optimizer-state files; the checkpoint is incomplete")
    ranks = [_deepspeed_load(f, folder) for f in model_files]
    state = _zero3_buffers(ranks[0], folder)
    state.update(_zero3_frozen(ranks, folder))
    flats = [_zero3_flat(f, folder, len(optim_files)) for f in optim_files]
    offset = 0
    for name, shape in _zero3_parts(ranks[0], folder, "param_shapes").items():
        numel, part = math.prod(shape), math.ceil(math.prod(shape) / len(flats))
        state[plain_name(name)] = torch.cat([flat[offset:offset + part] for flat in flats])[:numel].view(shape)
        offset += part
    if any(offset != flat.numel() for flat in flats):
        raise CheckpointError(f"checkpoint `{folder}`: the ZeRO-3 partitions hold {flats[0].numel()} values per rank, "
                              f"the parameter shapes need {offset}; the checkpoint is inconsistent")
    for alias, source in (ranks[0].get("shared_params") or {}).items():
        state[plain_name(alias)] = state[plain_name(source)]
    return _clone(state)


def _zero3_frozen(ranks, checkpoint):
    """Frozen parameters are not in the optimizer: each rank's model-state file holds its fragment."""
    frozen = {}
    for name, shape in _zero3_parts(ranks[0], checkpoint, "frozen_param_shapes").items():
        pieces = [(r.get("frozen_param_fragments") or {}).get(name) for r in ranks]
        if not all(isinstance(p, torch.Tensor) for p in pieces):
            raise CheckpointError(f"checkpoint `{checkpoint}`: a rank lacks its fragment of frozen `{name}`")
        frozen[plain_name(name)] = torch.cat([p.flatten() for p in pieces])[:math.prod(shape)].view(shape)
    return frozen


def _zero3_flat(file, checkpoint, world_size):
    """One rank's fp32 partition of every parameter group, as one flat tensor."""
    optimizer = _deepspeed_load(file, checkpoint).get("optimizer_state_dict")
    groups = optimizer.get("fp32_flat_groups") if isinstance(optimizer, dict) else None
    relative = Path(file).relative_to(checkpoint).as_posix()
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, torch.Tensor) for g in groups):
        raise CheckpointError(f"checkpoint `{checkpoint}`: `{relative}` holds no ZeRO-3 fp32 partitions")
    if optimizer.get("partition_count") != world_size:
        raise CheckpointError(f"checkpoint `{checkpoint}`: `{relative}` was partitioned over "
                              f"{optimizer.get('partition_count')} ranks but {world_size} rank files are here")
    return torch.cat([g.flatten() for g in groups]).float()


# (shapes, state) per layout name
_READERS = {
    PLAIN.name: (_plain_shapes, _plain_state),
    FSDP_SHARDED.name: (_fsdp_sharded_shapes, _fsdp_sharded_state),
    FSDP_SHARDED_LOCAL.name: (_fsdp_local, _fsdp_local),
    FSDP_FULL.name: (_fsdp_full_shapes, _fsdp_full_state),
    DEEPSPEED.name: (_deepspeed_shapes, _deepspeed_state),
}
