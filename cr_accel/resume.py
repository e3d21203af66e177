"""Choosing and loading the checkpoint a run continues from.

`--resume_from_checkpoint latest` starts from scratch only when the run has no checkpoint folder or it is
empty. Otherwise it takes the newest checkpoint that can be used -- verified, readable without unpickling
anything, fitting the model -- and, when none can, stops with every rejected checkpoint and its reason.
An explicit path is used or refused, never replaced.

Elastic resume: a checkpoint written by N processes with accumulation a continues on M processes with
accumulation a*N/M, so every optimizer step still sees the same N*a micro-batches of the epoch's shuffle
(accelerate deals batch k of the epoch to process k mod world size), the epoch has the same number of
steps and the LR schedule is unchanged. It is exact up to the order of floating-point reductions, not
bitwise; each process's RNG is re-derived from (seed, rank, step), since the saved streams belonged to
other ranks.

A checkpoint that holds `training.auto_batch_size`'s choice (`cr_accel.auto_batch`) resumes at that
micro-batch and its accumulation (the loaders are built again before anything is sized), without a search.

The config is compared with the checkpoint's own `config.yaml` (`cr_accel.config_diff`): a change of a key
that changes the run is refused -- for `latest` too, without trying older checkpoints -- unless
`allow_config_change`; then every changed key is logged, changed optimizer settings take effect (the
optimizer's saved ones would otherwise win), and a run made longer or shorter re-times the rest of the LR
schedule (`StepSchedule.retime`). The accumulation an elastic resume derives is not in the config, so it
is no change; a hand-made one is.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import auto_batch, components, schedule
from .checkpoint import CheckpointError, check_model_matches, check_rng_restored, store
from .checkpoint.store import load_refusing_pickles
from .config_diff import ConfigChangedError, check_config, describe, read_checkpoint_config
from .environment import UNSHARDED_TYPES

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .callbacks import CallbackList
    from .checkpoint import Checkpoints
    from .config import Config
    from .data import DatasetSplits
    from .run_log import TextLog
    from .schedule import StepSchedule
    from .state import StateRegistry, TrainState


def elastic_accumulation(saved_world_size: int, saved_accumulation: int, world_size: int) -> int:
    """The accumulation that keeps the global batch of a checkpoint written by `saved_world_size` processes."""
    per_step = saved_world_size * saved_accumulation
    if per_step % world_size:
        workable = [n for n in range(1, per_step + 1) if per_step % n == 0]
        raise CheckpointError(
            f"the checkpoint was written by {saved_world_size} process(es) with gradient_accumulation_steps="
            f"{saved_accumulation} ({per_step} micro-batches per optimizer step), which {world_size} processes "
            f"cannot split evenly, so the global batch would change. Resume with {', '.join(map(str, workable))} "
            f"process(es) (e.g. ./launch.sh --num-processes {workable[-1] if workable[-1] <= 8 else workable[0]})")
    return per_step // world_size


def reseed(seed: int, rank: int, step: int) -> None:
    """A process's RNG streams as a function of (seed, rank, step), for a resume on another world size."""
    digest = hashlib.sha256(f"cr_accel:{seed}:{rank}:{step}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") % (2**63)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def agree(accelerator: Accelerator, problem: Any) -> list[Any]:
    """Every process's problem with a checkpoint (None where it had none): a checkpoint one process cannot
    use is used by none of them."""
    if accelerator.num_processes == 1:
        return [problem] if problem else []
    from accelerate.utils import gather_object

    return [p for p in gather_object([problem]) if p]


def candidates(checkpoints: Checkpoints, where: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """(path, problem) pairs to try in order: the explicit path, or every entry of the run, newest first."""
    if where != "latest":
        return [(Path(where), None)]
    return checkpoints.newest_first()


def saved_part(checkpoints: Checkpoints, where: str | os.PathLike | None, key: str) -> Any:
    """The state part `key` of the checkpoint a resume from `where` would try first, or None: not resuming, no
    checkpoint yet, or none readable (the resume itself then says why)."""
    if where is None:
        return None
    for path, problem in candidates(checkpoints, where):
        if problem is None:
            try:
                return store.read_state(path).get(key)
            except CheckpointError:
                continue
    return None


def load_accelerate_state(accelerator: Accelerator, path: Path) -> None:
    """accelerator.load_state, with every weights-only refusal or damaged file turned into CheckpointError."""
    load_refusing_pickles(accelerator.load_state, str(path))


def verify_and_read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    store.verify(path)
    return store.read_state(path), store.read_tensors(path)


class ResumeMixin:
    """The Trainer's resume: the candidates tried in order, each loaded on every process or on none."""

    # What the Trainer it is mixed into provides.
    accelerator: Accelerator
    cfg: Config
    checkpoints: Checkpoints
    registry: StateRegistry
    callbacks: CallbackList
    state: TrainState
    schedule: StepSchedule
    data: DatasetSplits
    text_log: TextLog
    resumed_from: Path | None
    model: Any
    optimizer: Any
    epoch: int
    batch_in_epoch: int
    global_step: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    _resumed_mid_epoch: bool

    if TYPE_CHECKING:
        def _size_steps(self) -> int: ...

        def use_micro_batch(self, size: int, accumulation: int) -> None: ...

        @property
        def micro_batch_size(self) -> int: ...

    def _resume(self, where: str | os.PathLike, allow_config_change: bool = False) -> None:
        """Load `where` (a folder, or `latest`): see the module's docstring for what is tried and refused."""
        rejected = []
        for path, problem in candidates(self.checkpoints, where):
            try:
                if problem is not None:
                    raise CheckpointError(problem)
                notes = self._load_checkpoint(path, allow_config_change)
            except CheckpointError as exc:
                if where != "latest" or isinstance(exc, ConfigChangedError):
                    raise
                rejected.append((path, exc))
                continue
            for skipped, why in rejected:  # logged only now: a refused resume leaves the log untouched
                self.text_log.info(f"skipping checkpoint {skipped}: {why}")
            for note in notes:
                self.text_log.info(note)
            self.resumed_from = path  # the sinks move aside what was logged after it (train's RunStart)
            self.text_log.info(f"resumed from {path}: epoch {self.epoch + 1}, batch {self.batch_in_epoch}, "
                          f"step {self.global_step}")
            return
        if rejected:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: none of the {len(rejected)} entries in {self.checkpoints.root} "
                "can be used, and starting over would throw their work away:\n  - "
                + "\n  - ".join(f"{p.name}: {why}" for p, why in rejected)
                + "\nRepair or remove them, pass one explicitly, or start a new run in another output.dir")
        self.text_log.info(f"no complete checkpoint in {self.checkpoints.root} (it holds none at all): starting from scratch")

    def _load_checkpoint(self, path: Path, allow_config_change: bool = False) -> list[str]:
        """Load one checkpoint on every process, or raise CheckpointError on every process. Returns the
        lines to log once the checkpoint is in use (the config changes allowed, a re-timed schedule)."""
        acc = self.accelerator
        problem: tuple[bool, str] | None = None
        try:
            loaded = self._read_checkpoint(path, allow_config_change)
        except CheckpointError as exc:
            problem = (isinstance(exc, ConfigChangedError), str(exc))
        problems = agree(acc, problem)
        if problems:  # on every process, this one's own problem included
            config_changed, message = problems[0]
            raise (ConfigChangedError if config_changed else CheckpointError)(message)
        parts, tensors, accumulation, changes, fresh, micro_batch = loaded
        trainer_part = parts["trainer"]
        elastic = trainer_part["world_size"] != acc.num_processes
        if micro_batch is not None:  # auto_batch_size chose it: the loaders at that size, and its accumulation
            self.use_micro_batch(micro_batch, accumulation)
        if elastic:
            parts = self._rescale_for_world_size(parts, accumulation)
        self.registry.load_state_dict(parts, tensors)
        self.callbacks.load_legacy(trainer_part, parts.get("callbacks", {}))
        self.state.world_size = acc.num_processes
        self.state.gradient_accumulation_steps = self.accumulation  # what this run uses (the config's, or scaled)
        if elastic:
            reseed(self.cfg.seed, acc.process_index, self.global_step)
        self._resumed_mid_epoch = self.batch_in_epoch > 0
        notes = [f"config change allowed by --allow-config-change: {line}" for line in describe(changes)]
        self._take_optimizer_changes(changes, *fresh)
        return notes + self._retime_schedule()

    def _read_checkpoint(self, path: Path, allow_config_change: bool = False) -> tuple:
        """Everything that can refuse a checkpoint, before any of this run's state changes."""
        acc = self.accelerator
        parts, tensors = verify_and_read(path)
        then = read_checkpoint_config(path)
        saved = parts["trainer"]
        # Checkpoints from before the registry ran with their config's accumulation.
        accumulation = saved.setdefault("gradient_accumulation_steps", then.training.gradient_accumulation_steps)
        if saved["world_size"] != acc.num_processes:
            accumulation = elastic_accumulation(saved["world_size"], accumulation, acc.num_processes)
        micro_batch = auto_batch.stored_choice(parts)
        # After the process count (no config fixes that), before the model check (the diff names the keys).
        changes = check_config(path, then, self.cfg, allow_config_change)
        # Checkpoints from before the schedule saved its timing ran with their own config's.
        if "schedule" in parts:
            parts["schedule"] = {**self._schedule_timing(then, saved, micro_batch), **parts["schedule"]}
        check_model_matches(path, self._model_to_check())
        # This run's optimizer settings, before load_state puts the checkpoint's into the optimizer.
        fresh = ([{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups],
                 list(self.schedule.base_lrs))
        load_accelerate_state(acc, path)
        if saved["world_size"] == acc.num_processes:
            check_rng_restored(path, acc)
        return parts, tensors, accumulation, changes, fresh, micro_batch

    def _model_to_check(self) -> Any:
        """The model whose names and shapes a checkpoint must fit. The live one, except where it does not show
        them: under FSDP v1 (flat shards) and DeepSpeed (ZeRO-3 keeps empty placeholders) the config's model
        is built again without memory."""
        acc = self.accelerator
        if acc.distributed_type in UNSHARDED_TYPES or acc.is_fsdp2:
            return acc.unwrap_model(self.model)
        return components.build_model_skeleton(self.cfg)

    def _steps_per_epoch(self, batch_size: int, world_size: int, accumulation: int) -> int:
        """Optimizer steps per epoch for a run of `world_size` processes (accelerate evens out the batches)."""
        batches = math.ceil(len(self.data.train) / batch_size)
        return math.ceil(math.ceil(batches / world_size) / accumulation)

    def _schedule_timing(self, then: Config, saved: dict[str, Any], micro_batch: int | None) -> dict[str, int]:
        """The LR schedule's length and warm-up for the run that wrote a checkpoint, from its config."""
        t = then.training
        total = t.epochs * self._steps_per_epoch(micro_batch or then.data.batch_size, saved["world_size"],
                                                 saved["gradient_accumulation_steps"])
        if t.max_steps is not None:
            total = min(total, t.max_steps)
        return {"num_training_steps": total, "num_warmup_steps": schedule.warmup_steps_for(then.scheduler, total)}

    def _take_optimizer_changes(self, changes: list, groups: list[dict], base_lrs: list[float]) -> None:
        """Allowed changes of the optimizer section take effect: load_state restored the saved settings."""
        keys = {key for key, _, _ in changes}
        if "optimizer.lr" in keys:  # the peak LR the schedule's factor multiplies
            self.schedule.load_state_dict({**self.schedule.state_dict(), "base_lrs": base_lrs})
        if any(k.startswith("optimizer.") and k != "optimizer.lr" for k in keys):
            for group, settings in zip(self.optimizer.param_groups, groups):
                group.update(settings)

    def _retime_schedule(self) -> list[str]:
        """A run now longer or shorter than the schedule is timed for continues the curve over the new length."""
        s, step = self.schedule, self.global_step
        end, factor_here, ended = s.end, s.factor_at(step), s.base_step(step) >= s.num_training_steps - 1
        if not s.retime(step, self.total_steps):
            return []
        notes = [f"LR schedule: the run has {self.total_steps} optimizer steps now, {end} when the checkpoint was "
                 f"written; from step {step} (LR factor {factor_here:.6g}) the rest of the curve is stretched over "
                 f"the steps left, down to min_lr_ratio {self.cfg.scheduler.min_lr_ratio} at step {self.total_steps}"]
        if ended and self.total_steps > step:
            notes.append(f"LR schedule: it had already reached its end, so the added steps keep its last LR (factor "
                         f"{factor_here:.6g}); another decay needs a new run with its own schedule")
        return notes

    def _rescale_for_world_size(self, parts: dict[str, Any], accumulation: int) -> dict[str, Any]:
        """The trainer part of a checkpoint from N processes, for this run's M: the same global position."""
        saved = dict(parts["trainer"])
        n, m, before = saved["world_size"], self.accelerator.num_processes, saved["gradient_accumulation_steps"]
        saved["batch_in_epoch"] = saved["batch_in_epoch"] * n // m
        saved["gradient_accumulation_steps"] = self.state.gradient_accumulation_steps = accumulation
        self._size_steps()  # steps per epoch and in total for the new accumulation; the schedule follows them
        self.text_log.info(f"elastic resume: the checkpoint was written by {n} process(es), this run has {m}: "
                      f"gradient_accumulation_steps {before} -> {accumulation} keeps the global batch "
                      f"({n * before} micro-batches per optimizer step); exact up to floating-point reduction order")
        steps_then = self._steps_per_epoch(self.micro_batch_size, n, before)
        if steps_then != self.steps_per_epoch:
            self.text_log.info(f"elastic resume: an epoch has {self.steps_per_epoch} optimizer steps now, {steps_then} "
                          f"with {n} process(es) (its last batches split differently)")
        return {**parts, "trainer": saved}
