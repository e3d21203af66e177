"""One registry of everything a checkpoint holds besides accelerate's files.

Each part has a stable key and saves and loads itself:

    registry = StateRegistry()
    registry.register("trainer", train_state)       # a TrainState: counters, data position, best value
    registry.register("schedule", schedule)         # anything with state_dict() / load_state_dict()
    json_part, tensors = registry.state_dict()      # JSON-ready values, and tensors for safetensors
    registry.load_state_dict(json_part, tensors)    # strict: unknown parts are refused

Tensors (EMA weights, say) go to `trainer_state.safetensors`; everything else to `trainer_state.json`.
A part missing from an older checkpoint keeps the value it was built with; `LEGACY_DEFAULTS` says what a
format-1 checkpoint (before the registry) lacks.
"""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import CheckpointError

FORMAT = 2
_TENSOR_REF = "__tensor__"


@dataclass
class TrainState:
    """The loop's counters: where the run is, and what it has seen."""

    epoch: int = 0  # the epoch running, or the next one to run (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already trained on, per process
    global_step: int = 0  # optimizer steps done
    world_size: int = 1  # processes that wrote the checkpoint
    gradient_accumulation_steps: int = 1  # as used by those processes (elastic resume keeps their product)

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        problems = []
        hints = typing.get_type_hints(TrainState)
        # Kept here before the checkpoint policy and early stopping were callbacks (they read them from the
        # checkpoint's trainer part themselves: CallbackList.load_legacy); checked, then left out.
        hints.update(LEGACY_TRAINER_FIELDS)
        for key, value in state.items():
            if key not in hints:
                problems.append(f"unknown key `{key}`")
            elif not _fits(value, hints[key]):
                problems.append(f"`{key}` is {value!r}, not {_type_name(hints[key])}")
        if problems:
            raise CheckpointError(f"the trainer state is not valid: {'; '.join(problems)}")
        for key, value in state.items():
            if key not in LEGACY_TRAINER_FIELDS:
                setattr(self, key, value)


LEGACY_TRAINER_FIELDS: dict[str, typing.Any] = {"best_value": Optional[float], "bad_validations": int}


def _fits(value, annotation):
    if typing.get_origin(annotation) is typing.Union:
        return any(_fits(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))


def _type_name(annotation):
    args = typing.get_args(annotation)
    return " or ".join(a.__name__ for a in args) if args else annotation.__name__


class StateRegistry:
    """Named stateful parts; `state_dict()` runs on every process (a part may gather across processes)."""

    def __init__(self):
        self._parts = {}

    def register(self, key, part):
        if key in self._parts:
            raise ValueError(f"a stateful part named `{key}` is already registered")
        if not (callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None))):
            raise TypeError(f"stateful part `{key}` needs state_dict() and load_state_dict()")
        self._parts[key] = part
        return part

    def keys(self):
        return list(self._parts)

    def state_dict(self):
        """({key: JSON-ready state}, {flat name: tensor}); tensors are copied to the CPU."""
        tensors = {}
        states = {key: _split_tensors(part.state_dict(), key, tensors) for key, part in self._parts.items()}
        return states, tensors

    def load_state_dict(self, states, tensors=None):
        unknown = sorted(set(states) - set(self._parts))
        if unknown:
            raise CheckpointError(f"the checkpoint holds state for {', '.join(f'`{k}`' for k in unknown)}, which "
                                  "this run does not have (written by a newer cr_accel, or with other callbacks?)")
        for key, part in self._parts.items():
            if key in states:
                part.load_state_dict(_join_tensors(states[key], tensors or {}))


def _split_tensors(value, path, tensors):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR_REF: path}
    if isinstance(value, dict):
        return {k: _split_tensors(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value, tensors):
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            if value[_TENSOR_REF] not in tensors:
                raise CheckpointError(f"the trainer state refers to a tensor `{value[_TENSOR_REF]}` that "
                                      "trainer_state.safetensors does not hold")
            return tensors[value[_TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def resolve_tensors(value, tensors):
    """A part's saved state with its tensor references replaced by the tensors, for readers of a checkpoint
    outside a registry (load_model's EMA)."""
    return _join_tensors(value, tensors)


# Format 1 (before the registry) kept the parts as flat keys; what a format-1 file lacks takes these values.
LEGACY_DEFAULTS: dict[str, typing.Any] = {"batch_in_epoch": 0, "best_value": None, "bad_validations": 0, "callbacks": {},
                   "epoch_stats": None, "dataset": {}}
_LEGACY_REQUIRED = ("format", "epoch", "global_step", "world_size", "schedule")
_LEGACY_TRAINER_KEYS = ("epoch", "batch_in_epoch", "global_step", "world_size", "best_value", "bad_validations")


def parts_from_file(raw, where):
    """The parts of a trainer_state.json of any format, as {key: state}."""
    if not isinstance(raw, dict) or not isinstance(raw.get("format"), int):
        raise CheckpointError(f"checkpoint `{where}`: the trainer state has no format number")
    if raw["format"] > FORMAT:
        raise CheckpointError(f"checkpoint `{where}` has format {raw['format']}; this cr_accel reads up to {FORMAT}")
    if raw["format"] == FORMAT:
        if set(raw) - {"format", "cr_accel_version", "parts"} or not isinstance(raw.get("parts"), dict):
            raise CheckpointError(f"checkpoint `{where}`: the trainer state must hold `format`, `cr_accel_version` "
                                  "and `parts` only")
        return raw["parts"]
    return _legacy_parts(raw, where)


def _legacy_parts(raw, where):
    missing = [k for k in _LEGACY_REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"checkpoint `{where}`: trainer state lacks {', '.join(missing)}")
    known = set(_LEGACY_REQUIRED) | set(LEGACY_DEFAULTS) | {"cr_accel_version"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"checkpoint `{where}`: trainer state has unknown keys {', '.join(unknown)} "
                              "(written by a newer cr_accel?)")
    full = {**LEGACY_DEFAULTS, **raw}
    parts = {"trainer": {k: full[k] for k in _LEGACY_TRAINER_KEYS}, "schedule": full["schedule"],
             "callbacks": full["callbacks"], "dataset": full["dataset"]}
    if full["epoch_stats"] is not None:
        parts["epoch_stats"] = {"per_process": full["epoch_stats"]}
    return parts
