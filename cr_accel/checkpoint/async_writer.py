"""Saving a checkpoint without stopping training for the write.

At the optimizer-step boundary `take_snapshot` copies the model, optimizer, GradScaler and RNG states into
CPU memory (pinned on CUDA) -- the only part that blocks training. `BackgroundSave` then writes the same
files `accelerator.save_state` would (accelerate's own `save_accelerator_state`, handed the snapshot),
fsyncs, hashes and publishes them in a thread. At most one save is in flight: the next save, a preemption
and the end of training wait for it, and an error in the thread is raised there.

Snapshots exist for the layouts whose state is a plain state dict on every process (no distribution,
DDP on CPU or GPU). DeepSpeed and FSDP write through their own engines, so those runs save synchronously.
"""

import random
import threading

import numpy as np
import torch
from accelerate.utils import DistributedType

_SNAPSHOT_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def snapshot_supported(accelerator):
    return accelerator.distributed_type in _SNAPSHOT_TYPES


class Frozen:
    """A stand-in with `state_dict()` for accelerate's writer: the optimizer or scaler as it was."""

    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


class Snapshot:
    """Everything accelerate's save_state writes for this process, copied at one step boundary."""

    def __init__(self, accelerator):
        self.process_index = accelerator.process_index
        self.step = accelerator.step
        # The same objects and calls save_state uses, so the files are the same as a synchronous save's.
        self.model_states = [_copy_to_host(accelerator.get_state_dict(m, unwrap=False)) for m in accelerator._models]
        self.optimizer_states = [_copy_to_host(opt.state_dict()) for opt in accelerator._optimizers]
        scaler = accelerator.scaler
        self.scaler_state = _copy_to_host(scaler.state_dict()) if scaler is not None else None
        self.rng_state = _rng_state()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies above are non-blocking

    def nbytes(self):
        return sum(_nbytes(s) for s in (*self.model_states, *self.optimizer_states))

    def write(self, folder):
        """The files of `accelerator.save_state(folder)` for this process."""
        from accelerate.checkpointing import save_accelerator_state

        save_accelerator_state(
            folder, self.model_states, [Frozen(s) for s in self.optimizer_states], schedulers=[], dataloaders=[],
            process_index=self.process_index, step=self.step,
            scaler=Frozen(self.scaler_state) if self.scaler_state is not None else None,
        )
        # accelerate's writer records the RNG of the moment it runs; the snapshot's is the step boundary's.
        torch.save(self.rng_state, folder / f"random_states_{self.process_index}.pkl")


def take_snapshot(accelerator):
    return Snapshot(accelerator)


def _rng_state():
    """The keys accelerate's save_accelerator_state writes (CPU and CUDA devices)."""
    state = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
             "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return state


def _copy_to_host(value):
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value.detach().clone()
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return host.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return type(value)((k, _copy_to_host(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_host(v) for v in value)
    return value


def _nbytes(value):
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class BackgroundSave:
    """At most one job in flight; `wait()` joins it and re-raises what it raised."""

    def __init__(self):
        self._thread = None
        self._error = None

    @property
    def in_flight(self):
        return self._thread is not None and self._thread.is_alive()

    def start(self, job):
        self.wait()

        def run():
            try:
                job()
            except BaseException as exc:  # raised in the training thread at the next wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name="cr_accel-checkpoint", daemon=True)
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
