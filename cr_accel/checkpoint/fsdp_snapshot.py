"""Asynchronous saves under FSDP2, in the files accelerate's save_state writes (utils/fsdp_utils.py).

SHARDED_STATE_DICT: each process copies its own shards at the step boundary (DTensors whose local pieces now
live in host memory) and the background thread runs torch.distributed.checkpoint's save of them into
`pytorch_model_fsdp_<i>/` and `optimizer_<i>/`. DCP's planning and its final metadata are collectives: they run
on a gloo group of their own, because training's group (NCCL on GPUs) must not be driven from a second thread
and DCP's saving from a thread needs a CPU backend.

FULL_STATE_DICT: gathering the full state is itself collective, so it happens at the step boundary as in a
synchronous save (into CPU memory on process 0 when there are several); only process 0's `torch.save` of
`pytorch_model_fsdp.bin` and `optimizer.bin` runs in the background.

Every process calls `take_snapshot` at the same step boundary and writes its snapshot in the same order (at
most one save in flight), so the background threads' collectives pair up.
"""

import weakref
from pathlib import Path

import torch

from .async_writer import Snapshot

_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Accelerator -> the gloo group of its checkpoint writes


def _checkpoint_group(accelerator):
    """Made by every process at its first sharded snapshot: the same step boundary on all of them."""
    group = _GROUPS.get(accelerator)
    if group is None:
        import torch.distributed as dist

        group = _GROUPS[accelerator] = dist.new_group(backend="gloo")
    return group


def _state_dict_options(accelerator, plugin):
    """The options save_fsdp_model and save_fsdp_optimizer read the state with, including the offload it sets
    for FULL_STATE_DICT first (on CPU and on process 0 only, when there are several processes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.fsdp import StateDictType

    full = plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    if full:
        several = accelerator.num_processes > 1
        plugin.state_dict_config.offload_to_cpu = several
        plugin.state_dict_config.rank0_only = several
    return StateDictOptions(full_state_dict=full,
                            cpu_offload=getattr(plugin.state_dict_config, "offload_to_cpu", False),
                            broadcast_from_rank0=getattr(plugin.state_dict_config, "rank0_only", False))


class FsdpSnapshot(Snapshot):
    def _take_models_and_optimizers(self, accelerator, copy):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = _state_dict_options(accelerator, accelerator.state.fsdp_plugin)
        self.full = options.full_state_dict
        self._group = None if self.full else _checkpoint_group(accelerator)
        models = accelerator._models
        self.model_states = [copy(get_model_state_dict(m, options=options)) for m in models]
        # save_state pairs optimizer i with model i; the optimizer inside accelerate's wrapper holds the state
        self.optimizer_states = [copy(get_optimizer_state_dict(models[i], opt.optimizer, options=options))
                                 for i, opt in enumerate(accelerator._optimizers)]

    def _write_models_and_optimizers(self, folder):
        import torch.distributed.checkpoint as dcp
        from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        folder = Path(folder)
        for kind, name, states in (("model", FSDP_MODEL_NAME, self.model_states),
                                   ("optimizer", OPTIMIZER_NAME, self.optimizer_states)):
            for i, state in enumerate(states):
                if not self.full:
                    dcp.save({kind: state}, storage_writer=dcp.FileSystemWriter(str(folder / f"{name}_{i}")),
                             planner=DefaultSavePlanner(), process_group=self._group)
                elif self.process_index == 0:
                    torch.save(state, folder / (f"{name}.bin" if i == 0 else f"{name}_{i}.bin"))
        return [], []  # nothing left for accelerate's writer but the RNG and scaler files
