"""What each accelerate distributed type writes into a checkpoint folder, and how to read its model back.

    layout = detect(folder)            # which layout a folder holds (CheckpointError if none fits)
    layout.allows("optimizer.bin")     # the per-layout allow-list of relative paths
    model_shapes(folder)               # {parameter name: shape}, without materialising the model
    load_model_state(folder)           # the full, plain state dict (shards merged)

Parameter names are always plain: no `_orig_mod.` (torch.compile) and no `module.` (DDP) prefix, so a run
may resume with compile on or off and a model loads whatever wrapped it during training.
"""

import re
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
        return (relative_path in OWN_FILES or bool(_COMMON.match(relative_path))
                or bool(self.model_pattern.match(relative_path)))


PLAIN = Layout("plain", re.compile(r"^(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin)$"))
LAYOUTS = (PLAIN,)


def detect(folder):
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return PLAIN
    raise CheckpointError(f"checkpoint `{folder}` holds no model in a layout cr_accel knows "
                          f"({', '.join(layout.name for layout in LAYOUTS)}); use another checkpoint")


def model_shapes(folder):
    from safetensors import safe_open

    detect(folder)
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {plain_name(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_model_state(folder, device="cpu"):
    from safetensors.torch import load_file

    detect(folder)
    return {plain_name(k): v for k, v in load_file(Path(folder) / "model.safetensors", device=str(device)).items()}
