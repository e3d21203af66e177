"""What a resume changes in the config: the resolved config against the checkpoint's own `config.yaml`.

Both sides are resolved the same way (`config_from_dict(...).to_dict()`), so a default written out in one
and left implicit in the other compares equal. Keys are dotted (`optimizer.lr`, `model.dropout`); a
builder's keyword argument present on one side only shows as `(unset)` on the other.
"""

import json

import yaml

from .config import config_from_dict
from .errors import CheckpointError, ConfigError

# Keys a resume may change freely: none of them changes what the run computes -- the parameters, the
# optimizer state, the batches and their order, the LR of any step, which checkpoint is `best/`, or when
# training stops. A `section.*` entry covers the whole section.
HARMLESS = {
    "output.*": "where the run's files go and what they are called; a resume may move to another folder",
    "dashboard.*": "reporting to the live dashboard only",
    "training.log_every": "how often progress lines are printed and losses leave the device; the values are the same",
    "data.num_workers": "how many processes load batches; the sampler (in the main process) picks the same indices",
    "data.persistent_workers": "whether the workers are kept between epochs; they load the same samples",
    "data.prefetch_factor": "how many batches each worker loads ahead; the same batches, sooner or later",
    "data.pin_memory": "where loaded batches are staged in host memory",
    "data.val_batch_size": "validation means are weighted by the samples of each batch, so they are the same "
                           "(up to floating-point summation order)",
    "checkpoint.save_every": "when checkpoints are written; saving draws no random numbers and changes no state",
    "checkpoint.save_every_steps": "when checkpoints are written, counted in optimizer steps (as save_every)",
    "checkpoint.keep_last_n": "how many periodic checkpoints are kept on disk",
    "checkpoint.async_save": "how a checkpoint is written (the same files either way)",
    "training.compile": "torch.compile runs the same model (parameter names stay plain; the README promises a "
                        "resume with compile on or off); the numbers agree up to floating-point rounding",
}
# Not harmless, though they look like bookkeeping: `training.eval_every`, `checkpoint.monitor` and `mode`
# decide which checkpoint is `best/` and when early stopping fires; `training.metrics` may hold the monitor;
# `seed` sets every epoch's shuffle; `training.deterministic` picks other kernels.

UNSET = object()


def is_harmless(key):
    return key in HARMLESS or f"{key.split('.')[0]}.*" in HARMLESS


def flatten(tree, prefix=""):
    """{dotted key: value} for a resolved config dict; lists and other values are leaves."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def changed_keys(old, new):
    """[(key, old value, new value)] for every key whose value differs between two resolved config dicts,
    in the order of the new config (then keys only the old one has). Values absent on one side are UNSET."""
    a, b = flatten(old), flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in keys if a.get(k, UNSET) != b.get(k, UNSET)]


def show(value):
    """A value as the user would write it in YAML or an override."""
    if value is UNSET:
        return "(unset)"
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)  # null, true/false, [1, 2]
    return str(value)


def describe(changes):
    """One line per change: `key: old -> new`."""
    return [f"{key}: {show(old)} -> {show(new)}" for key, old, new in changes]


def read_checkpoint_config(path):
    """The checkpoint's `config.yaml`, resolved (defaults filled in) like the run's own config."""
    from .checkpoint import CONFIG

    try:
        raw = yaml.safe_load((path / CONFIG).read_text())
        return config_from_dict(raw or {}, check_components=False)
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint `{path}`: its {CONFIG} cannot be read ({exc})") from None
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint `{path}`: its {CONFIG} is not a config this cr_accel reads "
                              f"(written by another version?): {exc}") from None


class ConfigChangedError(CheckpointError):
    """A resume whose config differs from the checkpoint's in keys that change the run. Not a reason to try
    an older checkpoint: they were written with the same config."""


def check_config(path, then, cfg, allow):
    """The changes [(key, old, new)] from `then` (the checkpoint's config) to `cfg` that matter; raises
    ConfigChangedError listing them when there are any and `allow` is false. Harmless keys are left out."""
    changes = [c for c in changed_keys(then.to_dict(), cfg.to_dict()) if not is_harmless(c[0])]
    if changes and not allow:
        hint = ""
        if any(key == "training.gradient_accumulation_steps" for key, _, _ in changes):
            hint = ("\nA resume on another number of processes scales the accumulation by itself (from the "
                    "checkpoint): keep the checkpoint's value in the config for that.")
        raise ConfigChangedError(
            f"the config differs from the one checkpoint `{path}` was trained with, in {len(changes)} key(s) "
            "that change the run:\n  " + "\n  ".join(describe(changes)) + hint + "\nResume with the "
            "checkpoint's config (its config.yaml), or pass --allow-config-change to go on with these changes "
            "(they are logged; a run made longer or shorter stretches the rest of the LR schedule)")
    return changes
