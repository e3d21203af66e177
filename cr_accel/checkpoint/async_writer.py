"""Saving a checkpoint without stopping training for the write.

At the optimizer-step boundary `take_snapshot` copies the model, optimizer, GradScaler and RNG states into
CPU memory (pinned on CUDA) -- the only part that blocks training. `BackgroundSave` then writes the same
files `accelerator.save_state` would (accelerate's own `save_accelerator_state`, handed the snapshot),
fsyncs, hashes and publishes them in a thread. At most one save is in flight: the next save, a preemption
and the end of training wait for it, and an error in the thread is raised there.

The host copies are kept from one save to the next (`HostBuffers`, one set per Accelerator): a fresh
1.2 GB allocation maps ~295k pages at first touch, and for a 100M-parameter model with AdamW that made the
snapshot 0.56-0.73 s instead of the copy's 0.08 s (bench/checkpoint.py). The price is that the snapshot's
memory stays allocated between saves (the size of the model and optimizer state once more).

Snapshots exist for the layouts whose state is a plain state dict on every process (no distribution,
DDP on CPU or GPU) and for FSDP2, whose sharded state is a dict of DTensors (fsdp_snapshot.py). DeepSpeed and
FSDP v1 write through their own engines, so those runs save synchronously (`why_synchronous` says why).
"""

import functools
import random
import threading
import weakref

import numpy as np
import torch
from accelerate.utils import DistributedType

from ..environment import UNSHARDED_TYPES


def why_synchronous(accelerator):
    """Why this run's checkpoints cannot be saved in the background, or None when they can."""
    kind = accelerator.distributed_type
    if kind in UNSHARDED_TYPES or (kind == DistributedType.FSDP and accelerator.is_fsdp2):
        return None
    if kind == DistributedType.FSDP:
        return ("FSDP v1 saves its flat parameters through its own state-dict context, so there is no state to "
                "copy first (fsdp_version: 2 in the accelerate config saves in the background)")
    if kind == DistributedType.DEEPSPEED:
        return "DeepSpeed's engine writes its checkpoint files itself, so there is no state to copy first"
    return f"under {kind} there is no state to copy first"


def snapshot_supported(accelerator):
    return why_synchronous(accelerator) is None


class Frozen:
    """A stand-in with `state_dict()` for accelerate's writer: the optimizer or scaler as it was."""

    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


class Snapshot:
    """Everything accelerate's save_state writes for this process, copied at one step boundary. Written
    once: `write` hands its host buffers back for the next snapshot to fill."""

    def __init__(self, accelerator, buffers):
        self.process_index = accelerator.process_index
        self.step = accelerator.step
        self._buffers, self._taken = buffers, []
        copied = {}  # one host copy per tensor, however many names it has (tied weights)
        on_host = []  # (buffer, CPU source) pairs, copied together at the end
        copy = lambda value: _copy_to_host(value, buffers, self._taken, copied, on_host)  # noqa: E731
        self._take_models_and_optimizers(accelerator, copy)
        scaler = accelerator.scaler
        self.scaler_state = copy(scaler.state_dict()) if scaler is not None else None
        self.rng_state = _rng_state(self.step)
        _copy_on_cores(on_host)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies from the device are non-blocking
        self._nbytes = sum(_nbytes(s) for s in (*self.model_states, *self.optimizer_states))
        self._written = False

    def _take_models_and_optimizers(self, accelerator, copy):
        # The same objects and calls save_state uses, so the files are the same as a synchronous save's.
        self.model_states = [copy(accelerator.get_state_dict(m, unwrap=False)) for m in accelerator._models]
        self.optimizer_states = [copy(opt.state_dict()) for opt in accelerator._optimizers]

    def _write_models_and_optimizers(self, folder):
        """Write what accelerate's save_accelerator_state does not; returns the (model, optimizer) states it
        should write itself."""
        return self.model_states, self.optimizer_states

    def nbytes(self):
        return self._nbytes

    def write(self, folder):
        """The files of `accelerator.save_state(folder)` for this process."""
        from accelerate.checkpointing import save_accelerator_state

        if self._written:
            raise RuntimeError("this snapshot was written already; its buffers now belong to the next one")
        self._written = True
        try:
            models, optimizers = self._write_models_and_optimizers(folder)
            save_accelerator_state(
                folder, models, [Frozen(s) for s in optimizers], schedulers=[],
                dataloaders=[], process_index=self.process_index, step=self.step,
                scaler=Frozen(self.scaler_state) if self.scaler_state is not None else None,
            )
            # accelerate's writer records the RNG of the moment it runs; the snapshot's is the step boundary's.
            torch.save(self.rng_state, folder / f"random_states_{self.process_index}.pkl")
        finally:
            self.release()

    def release(self):
        """Give the host buffers back (after the write, or for a snapshot that will not be written)."""
        self.model_states = self.optimizer_states = self.scaler_state = None
        taken, self._taken = self._taken, []
        self._buffers.give_back(taken)


class HostBuffers:
    """Host tensors kept for the next snapshot, by (shape, dtype, pinned). A buffer is either in a snapshot
    not yet written or here, never both."""

    def __init__(self):
        self._free = {}
        self._lock = threading.Lock()  # a write in the background gives back while the next one may take

    def take(self, value, pinned, taken):
        """A buffer shaped like `value`, recorded in `taken` as (key, buffer)."""
        key = (tuple(value.shape), value.dtype, pinned)
        with self._lock:
            free = self._free.get(key)
            host = free.pop() if free else None
        if host is None:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
        taken.append((key, host))
        return host

    def give_back(self, taken):
        with self._lock:
            for key, host in taken:
                self._free.setdefault(key, []).append(host)

    def nbytes(self):
        with self._lock:
            return sum(_nbytes(free) for free in self._free.values())


_HOST_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Accelerator -> HostBuffers; freed with the Accelerator


def take_snapshot(accelerator):
    """This process's snapshot; called on every process at the same step boundary."""
    buffers = _HOST_BUFFERS.get(accelerator)
    if buffers is None:
        buffers = _HOST_BUFFERS[accelerator] = HostBuffers()
    if accelerator.distributed_type == DistributedType.FSDP:
        from .fsdp_snapshot import FsdpSnapshot

        return FsdpSnapshot(accelerator, buffers)
    return Snapshot(accelerator, buffers)


def _rng_state(step):
    """The keys accelerate's save_accelerator_state writes (CPU and CUDA devices; `step` is the Accelerator's)."""
    state = {"step": step, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
             "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return state


def _copy_to_host(value, buffers, taken, copied, on_host):
    """`value` with every tensor copied into a host buffer (recorded in `taken`). A CPU tensor that is not
    plain and contiguous is cloned instead, which keeps its strides as a synchronous save would see them.

    A tensor that appears under several names (tied weights: one parameter, two state-dict entries) gets one
    copy that both names share, as they share the live tensor: accelerate's safetensors writer then keeps one
    name, exactly as it does in a synchronous save. `copied` maps each tensor seen to (it, its copy)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        dtensor = _dtensor_class()
        if dtensor is not None and isinstance(value, dtensor):  # FSDP2's shards: copy this process's piece
            local = _copy_to_host(value.to_local(), buffers, taken, copied, on_host)
            return dtensor(local, value._spec, requires_grad=False)  # as DCP's own staging does
        key = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.data_ptr() and key in copied:
            return copied[key][1]
        # The source stays referenced until the snapshot is taken: a state dict made for the save (FSDP's
        # gathered one) would otherwise be freed after its copy, and a later tensor at the same address would
        # pass for a second name of it.
        copied[key] = (value, _copy_tensor(value, buffers, taken, on_host))
        return copied[key][1]
    if isinstance(value, dict):
        return type(value)((k, _copy_to_host(v, buffers, taken, copied, on_host)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_host(v, buffers, taken, copied, on_host) for v in value)
    return value


def _copy_tensor(value, buffers, taken, on_host):
    """A device tensor is copied now (non-blocking, into pinned memory); a CPU one is left to `_copy_on_cores`."""
    on_cpu = value.device.type == "cpu"
    if value.layout != torch.strided or value.is_quantized or (on_cpu and not value.is_contiguous()):
        return value.clone() if on_cpu else value.to("cpu")
    host = buffers.take(value, not on_cpu, taken)
    if on_cpu:
        on_host.append((host, value))
        return host
    return host.copy_(value, non_blocking=True)


_CHUNK_BYTES = 32 * 2**20


def _copy_on_cores(pairs):
    """Copy (buffer, source) CPU pairs in chunks on this process's share of the cores. A copy is bound by memory
    bandwidth that one thread does not fill: 1.2 GB took 0.19 s on one thread and 0.10 s on two on the 2-core
    benchmark machine (bench/checkpoint.py), and torch copies on one thread per process where OMP_NUM_THREADS=1
    (torchrun's default). The share is the cores over the processes on this machine, so ranks do not compete."""
    chunks = []
    for host, source in pairs:
        flat_host, flat_source, step = host.view(-1), source.view(-1), max(1, _CHUNK_BYTES // source.element_size())
        chunks += [(flat_host[i:i + step], flat_source[i:i + step]) for i in range(0, source.numel(), step)]
    pool, threads = _copy_pool()
    if threads == 1 or len(chunks) < 2:
        _copy_chunks(chunks)
        return
    list(pool.map(_copy_chunks, [chunks[i::threads] for i in range(threads)]))


def _copy_chunks(chunks):
    for host, source in chunks:
        host.copy_(source)


@functools.cache
def _copy_pool():
    """(pool, threads) for `_copy_on_cores`, no pool where one thread is this process's share; torch's copy
    releases the GIL."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = min(8, max(1, (os.cpu_count() or 1) // local_processes))
    return (ThreadPoolExecutor(threads, thread_name_prefix="cr_accel-snapshot") if threads > 1 else None), threads


@functools.cache
def _dtensor_class():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _nbytes(value):
    """Bytes held on this process (a DTensor's local piece, not the whole tensor)."""
    if isinstance(value, torch.Tensor):
        if _dtensor_class() is not None and isinstance(value, _dtensor_class()):
            value = value.to_local()
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
