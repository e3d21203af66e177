"""Checkpoints that never lose work: atomic, verified, and read back without unpickling anything.

    files.py         listing, hashing, JSON, fsync, hard-link copies; CheckpointError
    layouts.py       what each accelerate distributed type writes, and reading its model back
    store.py         the checkpoint folders of a run: saving, publishing, rotation, recovery, verify
    model_io.py      a checkpoint's model in any layout: does it fit this config, load it for inference
"""

from .files import CheckpointError
from .model_io import check_model_matches, load_model
from .store import (CONFIG, FORMAT, MANIFEST, STATE, Checkpoints, check_rng_restored, is_complete, read_state, verify,
                    wait_for_discards)

__all__ = ["CONFIG", "FORMAT", "MANIFEST", "STATE", "CheckpointError", "Checkpoints", "check_model_matches",
           "check_rng_restored", "is_complete", "load_model", "read_state", "verify", "wait_for_discards"]
