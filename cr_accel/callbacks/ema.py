"""An exponential moving average (EMA) of the weights, for validation, `best/` and `cr_accel.load_model`.

    training: {ema_decay: 0.999, ema_start_step: 0, ema_every: 1}

After optimizer step s (counting it): before `ema_start_step` the average is a copy of the weights; from then
on, at every step that is a multiple of `ema_every`, `ema = decay * ema + (1 - decay) * weights`. It starts
from the weights the training starts with. The update is a few foreach ops on the device (`_foreach_lerp_`),
with no read on the host.

- Parameters only, kept in float32 whatever the model's dtype. Buffers (BatchNorm's running statistics) are
  not averaged -- they are running averages already -- so the EMA model uses the model's own buffers.
- Validation sees the EMA weights: they are copied into the model at `on_validation_start` and the raw ones
  copied back at `on_epoch_end`, before any other epoch-end hook (EMA is the first built-in callback, and the
  built-in ones are added before the user's). So the validation metrics, the `best/` decision, early stopping,
  the validation pictures and every `on_validation_end` hook see the EMA model; `on_epoch_end` hooks, the
  histograms and the checkpoints' `model.safetensors` see the raw weights. The validations of
  `training.eval_every_steps` happen mid-epoch: there the raw weights come back at EMA's own
  `on_validation_end`, so the training goes on from them (hooks after it see the raw weights).
- Checkpointed under the callback's key (`ema`): the step it belongs to and the averaged parameters, which the
  state registry writes to `trainer_state.safetensors`; a resume continues it bit for bit. A resume from a
  checkpoint without one (EMA switched on later) starts the average from the weights it resumes with.
- Several processes: with data parallelism every process holds the same weights, so each keeps the same
  average of its own (no communication). Sharded engines (FSDP, DeepSpeed) hold only a shard of each
  parameter on a process; EMA is refused there before anything runs.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..errors import CheckpointError, UserError
from . import Callback, TrainingState

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..trainer import Trainer

STATE_KEY = "ema"


def check_engine(accelerator: Accelerator) -> None:
    """EMA needs every process to hold whole parameters: no distribution, or data parallelism (DDP)."""
    from ..environment import UNSHARDED_TYPES

    if accelerator.distributed_type not in UNSHARDED_TYPES:
        kind = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
        raise UserError(f"`training.ema_decay` is set, but this run is launched with {kind}, which shards the "
                        "parameters over the processes; EMA works on one process or with data parallelism (DDP). "
                        "Set training.ema_decay=null, or launch without FSDP/DeepSpeed")


class EMA(Callback):
    state_key = STATE_KEY

    def __init__(self, decay: float, start_step: int = 0, every: int = 1) -> None:
        self.decay, self.start_step, self.every = decay, start_step, every
        self.step = 0  # the optimizer step the average belongs to
        self.names: list[str] = []
        self.averages: list[torch.Tensor] = []  # float32, on the model's device, in the order of `names`
        self._weights: list[torch.Tensor] = []  # the model's parameters (detached views: same storage)
        self._raw: list[torch.Tensor] | None = None  # the raw weights while the model holds the average
        self._loaded: dict[str, Any] | None = None  # from a checkpoint, until the model is there

    # ---------------------------------------------------------------- events

    def on_train_start(self, trainer: Trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        self.names = [n for n, _ in named]
        self._weights = [p.detach() for _, p in named]
        if self._loaded is None:
            self.averages = [w.to(torch.float32, copy=True) for w in self._weights]
            self.step = trainer.global_step
        else:
            self.averages = self._averages_from(self._loaded, trainer.global_step)
            self._loaded = None

    def on_step_end(self, trainer: Trainer, state: TrainingState) -> None:
        step = state.step
        if step == self.step:  # a skipped step (non-finite gradient, fp16 overflow): the weights did not change
            return
        self.step = step
        if step < self.start_step:
            torch._foreach_copy_(self.averages, self._weights)
        elif step % self.every == 0:
            torch._foreach_lerp_(self.averages, self._float32_weights(), 1.0 - self.decay)

    def on_validation_start(self, trainer: Trainer) -> None:
        self._raw = [w.clone() for w in self._weights]
        torch._foreach_copy_(self._weights, self.averages)

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        # A validation of training.eval_every_steps: the training goes on right after it, with the raw weights
        # (and a checkpoint written at this step holds them, as at epoch ends).
        if not trainer.validation_at_epoch_end:
            self._restore()

    def on_epoch_end(self, trainer: Trainer, state: TrainingState) -> None:
        self._restore()

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        self._restore()  # a validation that failed half-way leaves no average in the model

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside, as in a validation, and its own weights again after (the test
        split's score at the end of training, where no best/ checkpoint holds it)."""
        raw = [w.clone() for w in self._weights]
        torch._foreach_copy_(self._weights, self.averages)
        try:
            yield
        finally:
            torch._foreach_copy_(self._weights, raw)

    def _restore(self) -> None:
        if self._raw is not None:
            torch._foreach_copy_(self._weights, self._raw)
            self._raw = None

    def _float32_weights(self) -> list[torch.Tensor]:
        """The weights as float32 tensors: themselves where they are float32 already (no copy)."""
        return [w if w.dtype == torch.float32 else w.float() for w in self._weights]

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None:  # loaded, not yet placed: saved as it came
            return self._loaded
        return {"step": self.step, "params": dict(zip(self.names, self.averages))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Kept until `on_train_start`, where the model's parameters are known (a resume loads before it)."""
        params = state.get("params")
        unknown = sorted(set(state) - {"step", "params"})
        if (unknown or not isinstance(state.get("step"), int) or not isinstance(params, dict)
                or not all(isinstance(v, torch.Tensor) for v in params.values())):
            raise CheckpointError("the EMA state in the checkpoint is not valid: it must hold `step` (an int) and "
                                  f"`params` (tensors){f', not {unknown}' if unknown else ''}")
        self._loaded = state

    def _averages_from(self, state: dict[str, Any], global_step: int) -> list[torch.Tensor]:
        params = state["params"]
        if state["step"] != global_step:
            raise CheckpointError(f"the checkpoint's EMA belongs to step {state['step']}, its trainer state to step "
                                  f"{global_step}: the checkpoint is inconsistent")
        problems = [f"`{n}` is missing" for n in self.names if n not in params]
        problems += [f"`{n}` is not a parameter of the model" for n in params if n not in self.names]
        problems += [f"`{n}` has shape {list(params[n].shape)}, the parameter {list(w.shape)}"
                     for n, w in zip(self.names, self._weights) if n in params and params[n].shape != w.shape]
        if problems:
            raise CheckpointError(f"the checkpoint's EMA does not fit the model: {'; '.join(problems)}")
        self.step = state["step"]
        return [params[n].to(w.device, torch.float32, copy=True) for n, w in zip(self.names, self._weights)]


def saved_averages(parts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """{parameter name: EMA} from a checkpoint's trainer state and tensors; None where it holds no EMA."""
    from ..state import resolve_tensors

    callbacks = parts.get("callbacks")
    state = callbacks.get(STATE_KEY) if isinstance(callbacks, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        return None
    params = resolve_tensors(state["params"], tensors)
    if not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise CheckpointError("the EMA in the checkpoint's trainer state is not a set of tensors")
    return params
