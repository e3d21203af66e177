"""Run a training script under FSDP on CPU processes (gloo), for the tests: `accelerate launch ... --use_fsdp
tests/fsdp_on_cpu.py SCRIPT [ARGS...]`.

accelerate turns FSDP on only for GPU-like distributed types: with ACCELERATE_USE_CPU=1 and an FSDP config it
silently runs MULTI_CPU (state.py). FSDP2 itself works on a CPU device mesh over gloo -- `fully_shard`, DTensor
gradients, torch.distributed.checkpoint's sharded saves and loads -- so once accelerate has made its decision,
this marks the state FSDP (with the plugin it was given) and every FSDP2 code path of accelerate and cr_accel
runs for real: prepare, clip, save_state/load_state in the sharded or full layout, cr_accel's snapshots. What
stays untested here is only what needs CUDA itself (NCCL, pinned copies, mixed-precision policies).
"""

import runpy
import sys


def enable():
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: a later AcceleratorState() copies PartialState's type back over its own.
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = plugin

    state.AcceleratorState.__init__ = init


if __name__ == "__main__":
    enable()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
