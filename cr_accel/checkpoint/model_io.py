"""The model of a checkpoint, whatever layout accelerate wrote it in: checking it fits, loading it for inference."""

import os
from pathlib import Path

import torch

import yaml

from .files import CheckpointError
from .layouts import load_model_state, model_shapes, plain_name
from .store import CONFIG, STATE, is_complete, read_state, read_tensors, verify


def check_model_matches(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Name every parameter whose name or shape differs between the checkpoint and `model` (plain names on both
    sides, so a compiled or DDP-wrapped model matches the checkpoint of an unwrapped one)."""
    saved = model_shapes(path)
    ours = {plain_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"`{k}` is in the checkpoint but not in the model" for k in sorted(set(saved) - set(ours))]
    problems += [f"`{k}` is in the model but not in the checkpoint" for k in sorted(set(ours) - set(saved))]
    problems += [f"`{k}` has shape {list(saved[k])} in the checkpoint, {list(ours[k])} in the model"
                 for k in sorted(set(saved) & set(ours)) if saved[k] != ours[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint `{path}` does not fit the model of this config: {shown}. "
                              "Use the model section the checkpoint was trained with (its config.yaml)")


def load_model(run_dir_or_checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
               ema: bool = True) -> torch.nn.Module:
    """The trained model, ready for inference, from a run folder (its best checkpoint, else its last) or a
    checkpoint folder: no trainer, optimizer or data needed.

        model = cr_accel.load_model("runs/default")

    `ema`: a run with `training.ema_decay` gives its EMA weights (what its validation and `best/` measured);
    `ema=False` the raw ones. A checkpoint without an EMA gives its raw weights either way.

    A run trained with `data.normalize` gives a `cr_accel.data.normalize.Normalized` module: it takes raw inputs,
    normalises them with the run's statistics and maps outputs shaped like the inputs back to their units, as
    the run's validation did; `.model` is the network itself, `.normalization` the statistics.
    """
    from ..components import build_model
    from ..config import config_from_dict

    path = Path(run_dir_or_checkpoint)
    if (path / "checkpoints").is_dir():
        found = [path / "checkpoints" / n for n in ("best", "last") if is_complete(path / "checkpoints" / n)]
        if not found:
            raise CheckpointError(f"run `{path}` has no complete best/ or last/ checkpoint yet")
        path = found[0]
    verify(path)
    cfg = config_from_dict(yaml.safe_load((path / CONFIG).read_text()), check_components=False)
    model = build_model(cfg)
    check_model_matches(path, model)
    model.load_state_dict(load_model_state(path, device))
    if ema:
        _load_ema(path, model)
    return _with_normalization(path, model).to(device).eval()


def _with_normalization(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """`model` taking raw inputs where the checkpoint's run normalised them (data.normalize)."""
    from ..data.normalize import Normalization, normalized, state_problem

    saved = read_state(path).get("normalization") if (path / STATE).is_file() else None
    if saved is None:
        return model
    problem = state_problem(saved)
    if problem or (saved["kind"] is not None and saved["shift"] is None):
        raise CheckpointError(f"checkpoint `{path}`: its normalization is not usable: {problem or 'no statistics'}")
    return normalized(model, Normalization(**saved))


def _load_ema(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's EMA weights into `model`'s parameters, if it has them (buffers stay the model's)."""
    from ..callbacks.ema import saved_averages

    if not (path / STATE).is_file():  # the EMA is listed in the trainer state: a model-only folder has none
        return
    averages = saved_averages(read_state(path), read_tensors(path))
    if averages is None:
        return
    params = dict(model.named_parameters())
    wrong = [n for n, t in averages.items() if n not in params or params[n].shape != t.shape]
    if wrong:
        raise CheckpointError(f"checkpoint `{path}`: its EMA does not fit the model (`{'`, `'.join(wrong[:8])}`)")
    with torch.no_grad():
        for name, average in averages.items():
            params[name].copy_(average)
