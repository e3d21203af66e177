"""`training.auto_batch_size`: the largest micro-batch that fits, found before training, with the global batch kept.

From `data.batch_size` b down, each candidate gets one forward and backward pass of a batch of that size (no
optimizer step; the gradients are thrown away). A candidate that raises `torch.OutOfMemoryError` is followed by
the largest divisor of b at most half of it (32, 16, 8, ...; 24, 12, 6, 3, 1), so the accumulation can grow by
a whole factor: micro-batch x accumulation stays b x `training.gradient_accumulation_steps`, and an epoch has as
many optimizer steps as before (ceil(ceil(n / m) / k) = ceil(n / (m k))), so the LR schedule is unchanged.

The probe changes nothing the run depends on: its batch is read from the dataset by index (the loaders'
generators are not touched), the RNG streams are restored afterwards (dropout draws), and so are the model's
buffers (batch-norm statistics). A run that chose 8 is therefore the run configured with `data.batch_size=8` and
the accumulation raised by hand, bit for bit. Every process searches on its own (the unwrapped model: no
collective in the backward pass), then all take the smallest choice with one reduction.

What it does not see: the optimizer's state (allocated at the first step) and the fragmentation of a long run; a
later out-of-memory still stops with the message of `cr_accel.oom`.

The choice is a checkpointed part (`auto_batch_size`), so a resume rebuilds its loaders at the stored size without
searching again; checkpoints without it (before this option, or written with it off) hold no choice.
"""

from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Any, Iterator

import torch
from accelerate.utils import DistributedType

from .data.normalize import normalized
from .errors import CheckpointError, UserError
from .losses import loss_and_terms
from .memory import capacity_and_peak
from .oom import OutOfMemory
from .preflight import first_batch
from .rng import rng_kept

if TYPE_CHECKING:
    from accelerate import Accelerator


class AutoBatchSize:
    """The registry part: the micro-batch `training.auto_batch_size` chose, or None when none was chosen (the run
    trains at `data.batch_size`)."""

    def __init__(self) -> None:
        self.micro_batch_size: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = state.get("micro_batch_size") if isinstance(state, dict) else None
        if not isinstance(state, dict) or set(state) - {"micro_batch_size"} or not (
                value is None or (type(value) is int and value >= 1)):
            raise CheckpointError(f"the auto_batch_size state is not valid: {state!r} (expected "
                                  "{'micro_batch_size': a positive integer or null})")
        self.micro_batch_size = value


def stored_choice(parts: dict[str, Any]) -> int | None:
    """The micro-batch a checkpoint's parts hold, or None (none chosen, or a checkpoint from before the option)."""
    part = AutoBatchSize()
    if "auto_batch_size" in parts:
        part.load_state_dict(parts["auto_batch_size"])
    return part.micro_batch_size


def candidates(batch_size: int) -> list[int]:
    """b, then repeatedly the largest divisor of b at most half the last one, down to 1."""
    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if batch_size % d == 0))
    return sizes


def search(model: torch.nn.Module, loss_fn: Any, dataset: Any, batch_size: int, accumulation: int,
           accelerator: Accelerator) -> tuple[int, int]:
    """(the largest candidate that fits on every process, the largest that fits on this one). Raises OutOfMemory on
    every process when even a micro-batch of 1 does not fit on one of them."""
    device = accelerator.device
    local = next((size for size in candidates(batch_size) if fits(model, loss_fn, dataset, size, device)), 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the epochs' peak_mem_mb is the training's, not the probe's
    chosen = local
    if accelerator.num_processes > 1:  # 0 (nothing fits) on one process is the minimum: all of them stop
        chosen = int(accelerator.gather(torch.tensor([local], device=device)).min())
    if chosen == 0:
        raise OutOfMemory(f"out of memory in auto_batch_size's search: not even a micro-batch of 1 fits (one forward "
                          f"and backward pass, no optimizer state yet): {capacity_and_peak(device)}. To fit: bf16 "
                          "(`training.mixed_precision=bf16`), activation checkpointing in the model, or a smaller "
                          "model")
    return chosen, local


def fits(model: torch.nn.Module, loss_fn: Any, dataset: Any, size: int, device: Any) -> bool:
    """Whether one forward and backward pass of `size` samples runs without torch.OutOfMemoryError."""
    ran = False
    try:
        _probe(model, loss_fn, dataset, size, device)
        ran = True
    except torch.OutOfMemoryError:
        pass  # leave the except block first: its traceback holds the failed pass's tensors
    if not ran:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ran


def _probe(model: torch.nn.Module, loss_fn: Any, dataset: Any, size: int, device: Any) -> None:
    with rng_kept(), _state_kept(model):
        inputs, targets = first_batch(dataset, "train", device, min(size, len(dataset)))
        try:
            loss, _ = loss_and_terms(loss_fn(model(inputs), targets))
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Train mode for the probe (the memory training needs: dropout masks, batch-norm in training), then every
    submodule's mode and every buffer (running statistics, their counters) as they were."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, training in modes:
            module.training = training


def choose(trainer: Any) -> None:
    """Search for the trainer's micro-batch, switch its loaders and accumulation to it, log the choice and keep it
    (the registry part) for the checkpoints."""
    acc = trainer.accelerator
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(f"`training.auto_batch_size=true` is not supported under {acc.distributed_type.value}: its "
                        "probe would run the sharded engine's collectives on processes that may fail apart. Set "
                        "`training.auto_batch_size=false` and choose `data.batch_size` and "
                        "`training.gradient_accumulation_steps` by hand")
    b, a = trainer.cfg.data.batch_size, trainer.state.gradient_accumulation_steps
    model = normalized(acc.unwrap_model(trainer.model), trainer.normalization)
    chosen, local = search(model, trainer.loss_fn, trainer.data.train, b, a, acc)
    accumulation = a * b // chosen
    if chosen == b:
        trainer.auto_batch.micro_batch_size = b
        trainer.text_log.info(f"auto_batch_size: micro-batch {b} fits; gradient_accumulation_steps {a} as configured")
        return
    trainer.use_micro_batch(chosen, accumulation)
    # A resumed run that had no choice yet continues at the same sample of its epoch (chosen divides b).
    trainer.batch_in_epoch = trainer.batch_in_epoch * b // chosen
    trainer.text_log.info(f"auto_batch_size: {_what_failed(candidates(b), local, chosen)}, using {chosen} with "
                          f"gradient_accumulation_steps {accumulation} (global batch {a * b * acc.num_processes} kept)")


def _what_failed(sizes: list[int], local: int, chosen: int) -> str:
    refused = sizes[:sizes.index(local)]
    said = (f"micro-batch {refused[0]} does not fit" if len(refused) == 1
            else f"micro-batches {', '.join(map(str, refused))} do not fit")
    if chosen == local:
        return said
    return f"{said + ' here, ' if refused else ''}another process fits no more than {chosen}"
