"""The Trainer: one Accelerator-managed loop, built from a validated Config.

    trainer = Trainer(cfg)
    trainer.add_callback(my_callback)
    trainer.train()
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from . import auto_batch, checkpoint, components, memory, oom, preflight, stages
from .callbacks import Callback, CallbackList, Event, TrainingState, builtin_callbacks
from .callbacks.checkpointing import CheckpointPolicy
from .checkpoint.async_writer import BackgroundSave, why_synchronous
from .config import Config
from .data import handover
from .data.normalize import Normalization
from .environment import UNSHARDED_TYPES, describe_environment, make_accelerator
from .models import count_parameters
from .preemption import Preemption
from .progress import Progress
from .resume import ResumeMixin, saved_part
from .rng import rng_kept
from .losses import loss_and_terms
from .run_log import TextLog
from .saving import SavingMixin
from .validation import ValidationMixin, eval_loader, loader_options, renamed_for_set
from .sinks import RunStart, Sinks, build_sinks
from .state import StateRegistry, TrainState
from .step_stats import EpochStatsState, StepStats

# Where accelerate's wrappers only add Python overhead (about 250 us per step: see the benchmark notes),
# the step calls torch directly. Anything with a GradScaler, sharding or an engine goes through accelerate.


class _Counter:
    """A TrainState field read and written as a Trainer attribute (`trainer.global_step`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, trainer: Trainer | None, owner: type | None = None) -> Any:
        return self if trainer is None else getattr(trainer.state, self.name)

    def __set__(self, trainer: Trainer, value: Any) -> None:
        setattr(trainer.state, self.name, value)


class Trainer(SavingMixin, ResumeMixin, ValidationMixin):
    epoch = _Counter()  # the epoch running, or the next one to run (0-based)
    batch_in_epoch = _Counter()  # micro-batches of `epoch` already trained on, per process
    global_step = _Counter()  # optimizer steps done

    def __init__(self, cfg: Config, callbacks: Iterable[Callback | Callable[..., Any]] = ()) -> None:
        self.cfg = cfg
        t = cfg.training
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        set_seed(cfg.seed, deterministic=t.deterministic)  # before anything draws random numbers
        self.accelerator = acc = make_accelerator(cfg)
        self.callbacks = CallbackList()
        for builtin in builtin_callbacks(cfg, acc):
            self.callbacks.add(builtin, builtin=True)
        for cb in callbacks:
            self.add_callback(cb)

        self.data = components.build_datasets(cfg)
        # data.normalize: its statistics are computed (or read from the checkpoint resumed) by `preflight`
        self.normalization = Normalization.from_config(cfg.data.normalize)
        model = components.build_model(cfg)
        self.loss_fn = components.build_loss(cfg, self.data.metadata).to(acc.device)
        self._loss_cfg = cfg.loss  # the loss section self.loss_fn was built from (stages may change it)
        self.metric_fns = components.build_metrics(cfg, self.data.metadata)
        optimizer = components.build_optimizer(cfg, model.parameters())
        train_loader, val_loader = self._make_loaders()
        self.val_sets = components.build_val_sets(cfg)  # data.val_sets: more validation sets, by name
        self.stages = stages.Stages(stages.parse(cfg.stages), spans=[])  # empty without `stages:`
        self.stage_configs = [components.stage_config(cfg, stage) for stage in self.stages.stages]
        if self.stages:
            stages.check_freeze(self.stages.stages, model)
        self.state = TrainState(world_size=acc.num_processes, gradient_accumulation_steps=t.gradient_accumulation_steps)
        # On CPU the batches are already where they go: skipping the loaders' device placement saves
        # ~20 us per batch (measured by bench/overhead.py --breakdown).
        place_batches = acc.device.type != "cpu"
        self.model, self.optimizer, self.train_loader, self.val_loader = acc.prepare(
            model, optimizer, train_loader, val_loader, device_placement=[True, True, place_batches, place_batches]
        )
        self.val_set_loaders = {name: acc.prepare(self._val_loader(dataset), device_placement=[place_batches])
                                for name, dataset in self.val_sets.items()}
        # One prepared training loader per batch size the stages use, made up front: the same loaders (and the
        # same files in checkpoints) whichever stage a run starts or resumes in.
        self.train_loaders = {cfg.data.batch_size: self.train_loader}
        for size in sorted({c.data.batch_size for c in self.stage_configs} - {cfg.data.batch_size}):
            self.train_loaders[size] = acc.prepare(self._train_loader(size), device_placement=[place_batches])
        self._compile(t.compile)
        # The schedule is stepped by the trainer once per optimizer step, not prepared by accelerate.
        total_steps = self._size_steps()
        self.schedule = (components.build_staged_schedule(cfg, self.stage_configs, self.stages.spans, optimizer,
                                                          self._stage_steps_per_epoch())
                         if self.stages else components.build_schedule(cfg, optimizer, total_steps, self.steps_per_epoch))

        self.plain_step = acc.scaler is None and acc.distributed_type in UNSHARDED_TYPES
        self.step_optimizer = optimizer if self.plain_step else self.optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]  # trainable now (stages may freeze some)
        self.frozen: list[torch.nn.Parameter] = []  # a stage's frozen parameters: their gradients are dropped
        self.max_grad_norm = t.grad_clip if t.grad_clip is not None else math.inf

        self.should_stop = False
        self.stop_reason: str | None = None  # stopped_early, preempted, ...

        main = acc.is_main_process
        self.output_dir = Path(cfg.output.dir)
        self.text_log = TextLog(self.output_dir / cfg.output.log_file, enabled=main)  # train.log
        self.sinks = build_sinks(cfg, acc, self.text_log) if main else Sinks()  # where every record goes
        self._logged: dict[str, Any] = {}  # values from trainer.log(), written with the next record
        self.last_confusion = None  # the last validation's confusion matrix, on classification picture epochs
        self.progress = Progress(enabled=acc.is_local_main_process)
        self.stats = StepStats(acc, allow_nonfinite=t.skip_nonfinite)
        self.checkpoints = checkpoint.Checkpoints(acc, self.output_dir / "checkpoints", cfg.checkpoint.keep_last_n)
        self.async_save = cfg.checkpoint.async_save and why_synchronous(acc) is None
        self.background_save = BackgroundSave()
        self._unannounced = []  # checkpoints written in the background, not yet announced to callbacks
        self.preemption = Preemption(acc)
        self._resumed_mid_epoch = False
        self.resumed_from: Path | None = None  # the checkpoint this run continues, once train() has resumed
        self._preflight_done = False
        self._step_validation: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the last one
        self.validation_at_epoch_end = True  # whether the validation running (or last run) ends an epoch
        self.preemption_agreed = False
        self.auto_batch = auto_batch.AutoBatchSize()  # the micro-batch training.auto_batch_size chose, if any
        self.registry = self._register_state()

    def _register_state(self) -> StateRegistry:
        """Everything a checkpoint holds besides accelerate's files, each part saving and loading itself."""
        registry = StateRegistry()
        registry.register("trainer", self.state)
        if self.stages:
            registry.register("stages", self.stages)
        registry.register("schedule", self.schedule)
        registry.register("callbacks", self.callbacks)
        registry.register("epoch_stats", EpochStatsState(self.stats, self.accelerator))
        registry.register("dataset", _Recorded(self.data.metadata))
        registry.register("normalization", self.normalization)
        registry.register("auto_batch_size", self.auto_batch)
        return registry

    def add_callback(self, cb: Callback | Callable[..., Any]) -> Callback:
        """Add a callback; one that is an instance of a built-in callback's class replaces it."""
        return self.callbacks.add(cb)

    @property
    def best_value(self) -> float | None:
        """The best value of the checkpoint policy's monitored metric so far (None before any)."""
        policies = self.callbacks.of_type(CheckpointPolicy)
        return policies[0].best if policies else None

    # ---------------------------------------------------------------- set-up

    def _size_steps(self) -> int:
        """Optimizer steps per epoch and in total, for this run's accumulation (which an elastic resume may
        change); returns the total."""
        t = self.cfg.training
        self.accumulation = self.state.gradient_accumulation_steps
        self.accelerator.gradient_accumulation_steps = self.accumulation
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.accumulation)
        self.total_steps = t.epochs * self.steps_per_epoch
        if self.stages:
            self.stages.set_spans([self._stage_span(stage, c) for stage, c in zip(self.stages.stages, self.stage_configs)])
            self.total_steps = sum(self.stages.spans)
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        return self.total_steps

    def _stage_steps_per_epoch(self) -> list[int]:
        """Each stage's optimizer steps per epoch, at its own batch size (what its schedule counts epochs in)."""
        return [span // stage.length if stage.unit == "epochs" else self.steps_per_epoch
                for stage, span in zip(self.stages.stages, self.stages.spans)]

    def _stage_span(self, stage: stages.Stage, stage_cfg: Config) -> int:
        """A stage's length in optimizer steps, at its own batch size."""
        if stage.unit == "steps":
            return stage.length
        return stage.length * math.ceil(len(self.train_loaders[stage_cfg.data.batch_size]) / self.accumulation)

    def _enter_stage(self, announce: bool = True) -> None:
        """Apply the current stage's settings: weight decay, loss, frozen parameters, training loader. A pure
        function of the stage, so a resume applies the same ones."""
        i, stage_cfg = self.stages.current, self.stage_configs[self.stages.current]
        for group in self.step_optimizer.param_groups:
            group["weight_decay"] = stage_cfg.optimizer.weight_decay
        if stage_cfg.loss != self._loss_cfg:
            self.loss_fn = components.build_loss(stage_cfg, self.data.metadata).to(self.accelerator.device)
            self._loss_cfg = stage_cfg.loss
        model = self.accelerator.unwrap_model(self.model)
        self.frozen, self.params = stages.frozen_parameters(model, self.stages.stage.freeze)
        if announce:
            frozen = f", frozen: {', '.join(self.stages.stage.freeze)}" if self.frozen else ""
            self.text_log.info(f"stage {i + 1}/{len(self.stages.stages)} `{self.stages.stage.name}` from step "
                               f"{self.global_step}: {self.stages.spans[i]} optimizer steps, lr "
                               f"{stage_cfg.optimizer.lr:g}, weight decay {stage_cfg.optimizer.weight_decay:g}, "
                               f"batch size {stage_cfg.data.batch_size}, loss {stage_cfg.loss.name}{frozen}")

    def _use_stage_loader(self) -> None:
        """The training loader of the epoch about to run: the current stage's at an epoch start; mid-epoch (a
        resume), that of the stage the epoch's steps so far belong to (a batch size changes at epoch ends only)."""
        i = self.stages.index_at(self.global_step - 1) if self.batch_in_epoch > 0 else self.stages.current
        self.train_loader = self.train_loaders[self.stage_configs[i].data.batch_size]
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.accumulation)

    def _compile(self, mode: bool | str) -> None:
        """torch.compile in place (nn.Module.compile): the module keeps its parameter names, so checkpoints
        are the same with compile on or off. accelerate's own `--dynamo_backend` is routed here too (the
        Accelerator is made with dynamo off), since its wrapper renames every parameter `_orig_mod.*`."""
        backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
        if mode is False and backend == "no":
            return
        options = {} if mode in (True, False) else {"mode": mode}
        if backend != "no":
            options["backend"] = backend
        self.accelerator.unwrap_model(self.model).compile(**options)

    def _make_loaders(self, batch_size: int | None = None) -> tuple[DataLoader, DataLoader]:
        batch_size = batch_size or self.cfg.data.batch_size
        return self._train_loader(batch_size), self._val_loader(self.data.val, batch_size)

    def _train_loader(self, batch_size: int) -> DataLoader:
        d = self.cfg.data
        # The loader's own generator keeps iterator creation from drawing on the global RNG (which
        # would shift dropout masks); with the seedable sampler the shuffle depends on (seed, epoch) only.
        # Workers change where __getitem__ runs, not what it returns: the sampler stays in this process and the
        # datasets draw augmentation from (seed, epoch, index), so any num_workers gives the same batches.
        device = self.accelerator.device
        return DataLoader(batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.cfg.seed),
                          **handover.loader_arguments(self.data.train, device, loader_options(d, device)))

    def _val_loader(self, dataset: Any, batch_size: int | None = None) -> DataLoader:
        return eval_loader(self.cfg.data, dataset, batch_size, self.accelerator.device)

    def eval_loader(self, dataset: Any) -> DataLoader:
        """An unprepared loader over `dataset` with the validation's batches (the test split's, say)."""
        return self._val_loader(dataset, self.micro_batch_size)

    @property
    def micro_batch_size(self) -> int:
        """Samples per process per forward pass: auto_batch_size's choice, else data.batch_size."""
        return self.auto_batch.micro_batch_size or self.cfg.data.batch_size

    def use_micro_batch(self, size: int, accumulation: int) -> None:
        """Train from now on with micro-batches of `size` and `accumulation` of them per optimizer step (auto batch
        size's choice, or the one a checkpoint stored): the loaders are built and prepared again."""
        self.auto_batch.micro_batch_size = size
        self.state.gradient_accumulation_steps = accumulation
        place = self.accelerator.device.type != "cpu"
        old = (self.train_loader, self.val_loader, *self.val_set_loaders.values())
        self.train_loader, self.val_loader = self.accelerator.prepare(
            *self._make_loaders(size), device_placement=[place, place])
        self.val_set_loaders = {name: self.accelerator.prepare(self._val_loader(dataset, size),
                                                               device_placement=[place])
                                for name, dataset in self.val_sets.items()}
        self.train_loaders = {size: self.train_loader}  # (auto_batch_size is refused with stages: config.py)
        # The replaced loaders would otherwise stay in the list accelerate saves and loads sampler state for.
        self.accelerator._dataloaders = [d for d in self.accelerator._dataloaders if all(d is not o for o in old)]
        self._size_steps()  # the same number of optimizer steps (see auto_batch): the schedule still fits

    @functools.cached_property
    def config_yaml(self) -> str:
        """The resolved config as YAML: written next to the outputs and into every checkpoint."""
        import yaml

        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)

    def _write_run_files(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(self.config_yaml)
        env = describe_environment(self.accelerator)
        env["dataset"] = self.data.metadata
        (self.output_dir / "environment.json").write_text(json.dumps(env, indent=2, default=str))
        self.text_log.info(f"cr_accel run in {self.output_dir} | {env['world_size']} process(es) on {env['device']} | "
                      f"precision {env['mixed_precision']} | torch {env['torch']} accelerate {env['accelerate']}")
        self.text_log.info(f"model {self.cfg.model.name}: {count_parameters(self.accelerator.unwrap_model(self.model)):,} "
                      f"parameters | {len(self.data.train)} train / {len(self.data.val)} val samples | "
                      f"{self.steps_per_epoch} optimizer steps per epoch, {self.total_steps} in total")
        if self.normalization.active:
            self.text_log.info(f"inputs normalised ({self.normalization.summary()})")
        self.text_log.info("hyperparameters:\n" + self.config_yaml.rstrip(), console=False)
        if self.cfg.checkpoint.async_save and not self.async_save:
            self.text_log.info(f"checkpoints are saved synchronously: {why_synchronous(self.accelerator)}")

    # ---------------------------------------------------------------- the loop

    def train(self, resume_from_checkpoint: str | os.PathLike | None = None, allow_config_change: bool = False) -> str:
        """Run to the end (or a stop); returns the status: finished, stopped_early or preempted.

        `resume_from_checkpoint`: a checkpoint folder, or "latest" for the newest complete one in
        output.dir (a fresh start when there is none yet, so a requeued job can always pass it).
        `allow_config_change`: resume although the config differs from the checkpoint's in keys that change
        the run (the changes are logged); otherwise that is refused with a CheckpointError.
        """
        self.preflight(resume_from_checkpoint)
        self.checkpoints.recover()
        if resume_from_checkpoint is not None:
            self._resume(resume_from_checkpoint, allow_config_change)
        if self.cfg.training.auto_batch_size and self.auto_batch.micro_batch_size is None:
            auto_batch.choose(self)  # not when the checkpoint resumed holds a choice already
        self._write_run_files()
        if self.stages:
            self._enter_stage()
        acc = self.accelerator
        self.sinks.start(RunStart(config=self.cfg.to_dict(), world_size=acc.num_processes, device=str(acc.device),
                                  epochs_done=self.epoch, steps_done=self.global_step, resumed=self.resumed_from is not None))
        self.callbacks.fire(Event.ON_TRAIN_START, self)
        self.preemption.install()
        status = "failed"
        try:
            while self.epoch < self.cfg.training.epochs and not self.should_stop:
                self._run_epoch()
            status = self.stop_reason or "finished"
        finally:
            self.preemption.uninstall()
            self._finish(status)
        return status

    def preflight(self, resume_from_checkpoint: str | os.PathLike | None = None) -> None:
        """One batch of each split through model, loss and metrics, before anything is written (once: `train`
        runs it unless it ran already). Raises a UserError naming what does not fit. First, `data.normalize`'s
        statistics: those of the checkpoint `resume_from_checkpoint` (as `train` takes it) where it has them,
        else a pass over the training split."""
        if not self._preflight_done:
            self._ready_normalization(resume_from_checkpoint)
            phase = oom.Phase("the preflight (one batch, no gradients)", preflight.BATCH_SIZE)
            with oom.explained(phase, self.accelerator.device):
                preflight.run(self)
            self._preflight_done = True

    def _ready_normalization(self, resume_from_checkpoint: str | os.PathLike | None) -> None:
        norm = self.normalization
        if not norm.active:
            return
        if norm.needs_fit:
            saved = saved_part(self.checkpoints, resume_from_checkpoint, "normalization")
            if saved is None or not norm.adopt(saved):
                d = self.cfg.data
                options = loader_options(d, None)  # the run's workers, on the CPU: the pass only sums
                with rng_kept():  # a loader with workers draws their seed from the global RNG
                    norm.fit(self.data.train, self.accelerator, d.val_batch_size or d.batch_size, options)
        norm.match_sample(*(torch.as_tensor(part) for part in self.data.train[0]))
        self.data.metadata["normalize"] = norm.describe()

    def _run_epoch(self) -> dict[str, Any] | None:
        epoch, t = self.epoch, self.cfg.training
        started = time.perf_counter()
        with oom.explained(self._phase("training"), self.accelerator.device):
            train_metrics = self.train_one_epoch(epoch)
        if train_metrics is None:  # the processes agreed to stop for a signal
            self._stop_for_preemption()
            return None
        metrics = {"epoch": epoch + 1, **train_metrics}
        last_epoch = epoch + 1 == t.epochs or self.global_step >= self.total_steps
        if (epoch + 1) % t.eval_every == 0 or last_epoch:
            if self._step_validation is not None and self._step_validation[0] == self.global_step:
                metrics.update(self._step_validation[1])  # the epoch's last step was validated already
            else:
                metrics.update(self._run_validation(epoch + 1))
                self.callbacks.fire(Event.ON_VALIDATION_END, self, metrics)
        metrics["step"] = self.global_step
        metrics["best_val"] = self.best_value if self.best_value is not None else math.nan
        metrics["lr"] = self.schedule.lr_of_last_step()[0]
        if self.stages:
            metrics.update(self.stages.record(self.global_step))
        epoch_time = time.perf_counter() - started
        metrics["samples_per_s"] = metrics.pop("samples") / epoch_time
        metrics["epoch_time"] = epoch_time
        if self.batch_in_epoch >= len(self.train_loader):
            self.epoch, self.batch_in_epoch = epoch + 1, 0
        # else the loop stopped inside the epoch (max_steps, should_stop): the position stays there, so a
        # checkpoint of it resumes with the epoch's remaining batches (and replaces this partial row).
        if self.global_step >= self.total_steps:
            self.should_stop, self.stop_reason = True, self.stop_reason or "finished"
        metrics.update(self._take_logged())
        self.sinks.log_epoch(metrics)
        if self.callbacks.has(Event.ON_EPOCH_END):
            self.callbacks.fire(Event.ON_EPOCH_END, self, self._epoch_state(metrics))
        self._save_epoch_checkpoints(epoch + 1, finishing=self.should_stop or epoch + 1 == t.epochs)
        return metrics

    def _run_validation(self, epoch_number: int, at_epoch_end: bool = True) -> dict[str, float]:
        """on_validation_start, the validation itself, its metrics in the progress bar. `at_epoch_end` is False
        for the validations of `training.eval_every_steps` (`trainer.validation_at_epoch_end` tells hooks)."""
        self.validation_at_epoch_end = at_epoch_end
        self.callbacks.fire(Event.ON_VALIDATION_START, self)
        with oom.explained(self._phase("validation"), self.accelerator.device):
            metrics = self.validate(confusion=at_epoch_end and self._confusion_due(epoch_number))
            for name, loader in self.val_set_loaders.items():
                metrics.update(renamed_for_set(self.validate(loader=loader), name))
        self.progress.show_validation(metrics)
        return metrics

    def _validate_at_step(self, epoch: int) -> dict[str, float]:
        """A validation of `training.eval_every_steps`: its metrics go into the step record of this step (and
        the checkpoint policy sees them, so `best/` may be written mid-epoch)."""
        metrics = self._run_validation(epoch + 1, at_epoch_end=False)
        self.callbacks.fire(Event.ON_VALIDATION_END, self, {"step": self.global_step, "epoch": epoch + 1, **metrics})
        self._step_validation = (self.global_step, metrics)
        return metrics

    def train_one_epoch(self, epoch: int) -> dict[str, Any] | None:
        """One pass over the training data; returns the epoch's train metrics, reduced over processes."""
        acc, t = self.accelerator, self.cfg.training
        self.model.train()
        if self.stages:
            self._use_stage_loader()
        self.train_loader.set_epoch(epoch)  # every epoch, also after a restart: the shuffle follows it
        if hasattr(self.data.train, "set_epoch"):  # augmentation by epoch (image_folder): accelerate's loader
            self.data.train.set_epoch(epoch)  # passes it on only where its sampler has no set_epoch (1 process)
        loader = self.train_loader
        if self._resumed_mid_epoch:
            # The batch sampler skips the consumed batches' indices: their data is never loaded.
            loader = acc.skip_first_batches(self.train_loader, self.batch_in_epoch)
            self._resumed_mid_epoch = False
        else:
            self.stats.reset_epoch()
            self.batch_in_epoch = 0
        bar = self.progress.epoch_bar(epoch, t.epochs, len(self.train_loader))
        if bar is not None:
            bar.update(self.batch_in_epoch)
        accumulate = self.accumulation > 1 or not self.plain_step
        step_listeners = self.callbacks.has(Event.ON_STEP_END)
        self._before_step_listeners = self.callbacks.has(Event.ON_BEFORE_OPTIMIZER_STEP)
        policies = self.callbacks.of_type(CheckpointPolicy)
        eval_every_steps = t.eval_every_steps
        self.preemption_agreed = False
        expand = handover.expander(loader)  # 8-bit images arrive as uint8
        state = self.state  # the counters read directly (each `self.global_step` is a descriptor call)
        for inputs, targets in loader:
            if expand is not None:
                inputs, targets = expand(inputs, targets)
            if accumulate:
                with acc.accumulate(self.model):
                    loss, terms = self._forward_backward(inputs, targets)
                    synced = acc.sync_gradients
            else:
                loss, terms = self._forward_backward(inputs, targets)
                synced = True
            state.batch_in_epoch += 1
            self.stats.samples += len(inputs)
            if bar is not None:
                bar.update()
            if not synced:
                continue
            norm = self._optimizer_step(loss, terms)
            if self.stages and self.stages.after_step(state.global_step):
                self._enter_stage()
            if step_listeners:
                self.callbacks.fire(Event.ON_STEP_END, self, self._step_state(loss, terms, norm,
                                                                              self.schedule.last_step_lr))
            validation = (self._validate_at_step(epoch)
                          if eval_every_steps and state.global_step % eval_every_steps == 0 else None)
            if state.global_step % t.log_every == 0 or validation is not None:
                self._log_step(epoch, validation)
            targets = [target for policy in policies for target in policy.targets_after_step(self)]
            if targets:
                self.save_checkpoint(_unique(targets))
            if self.preemption.agreed():
                self.preemption_agreed = True
                break
            if state.global_step >= self.total_steps or self.should_stop:
                break
        self.progress.close()
        if self.preemption_agreed:
            return None
        return self.stats.epoch_totals(memory=memory.readings(acc.device))

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        loss, terms = loss_and_terms(self.loss_fn(self.normalization.run(self.model, inputs), targets))
        self.stats.add_loss(loss, self.state.global_step, terms)
        if self.plain_step:
            # What accelerator.backward does without a GradScaler, minus its per-call overhead.
            accum = self.accumulation
            (loss / accum if accum > 1 else loss).backward()
        else:
            self.accelerator.backward(loss)
        return loss, terms

    def _optimizer_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Clip (recording the pre-clip norm), step, advance the LR schedule, zero the gradients; returns the
        pre-clip gradient norm."""
        acc = self.accelerator
        for param in self.frozen:
            param.grad = None
        if self.plain_step:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = acc.clip_grad_norm_(self.params, self.max_grad_norm)  # unscales fp16 gradients first
        self.stats.add_grad_norm(norm)
        if self._before_step_listeners:
            lr = self.step_optimizer.param_groups[0]["lr"]
            self.callbacks.fire(Event.ON_BEFORE_OPTIMIZER_STEP, self, self._step_state(loss, terms, norm, lr))
        if self.cfg.training.skip_nonfinite and not torch.isfinite(norm):  # one sync per step, by request
            self.stats.skipped_steps += 1
            self.step_optimizer.zero_grad(set_to_none=True)
            return norm
        self.step_optimizer.step()
        if self.plain_step or not acc.optimizer_step_was_skipped:  # fp16 overflow steps do not count
            self.schedule.step()
            self.state.global_step += 1
        self.step_optimizer.zero_grad(set_to_none=True)
        return norm

    def _step_state(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None, norm: Any,
                    lr: float) -> TrainingState:
        state = self.state
        return TrainingState(step=state.global_step, epoch=state.epoch + 1, batch_in_epoch=state.batch_in_epoch,
                             loss=loss, lr=lr, grad_norm=norm, loss_terms=terms or {})

    def _epoch_state(self, metrics: dict[str, Any]) -> TrainingState:
        terms = {k[len("train_loss/"):]: v for k, v in metrics.items() if k.startswith("train_loss/")}
        return TrainingState(step=self.global_step, epoch=metrics["epoch"], batch_in_epoch=self.batch_in_epoch,
                             loss=metrics["train_loss"], lr=metrics["lr"], grad_norm=metrics["grad_norm"],
                             loss_terms=terms, metrics=metrics)

    # ---------------------------------------------------------------- records

    def log(self, values: dict[str, Any]) -> None:
        """Add values to the logs (a callback's own metrics, say): they are written with the next record the
        trainer writes -- the step record of the next `training.log_every` step, or the epoch record if that
        comes first (so values given in on_step_end at a logged step, or in on_validation_end, land in that
        record) -- to train.log's CSVs, the trackers and the dashboard. Numbers or 0-d tensors (read at the
        record, not now); the main process's values are the ones written."""
        self._logged.update(values)

    def _take_logged(self) -> dict[str, Any]:
        logged, self._logged = self._logged, {}
        return {k: float(v) for k, v in logged.items()}

    def _log_step(self, epoch: int, validation: dict[str, float] | None = None) -> None:
        """A step record: the means since the last one, over every process (one gather), to every sink; with
        the metrics of a validation at this step (training.eval_every_steps)."""
        values = self.stats.step_record()
        lr = self.schedule.lr_of_last_step()[0]
        record = {"step": self.global_step, "epoch": epoch + 1, "loss": values.pop("loss"), "lr": lr,
                  "grad_norm": values.pop("grad_norm"), **values, **(validation or {}), **self._take_logged()}
        if self.stages:
            record.update(self.stages.record(self.global_step))
        self.sinks.log_step(record)
        self.progress.report(epoch, self.global_step, self.total_steps, record["loss"], lr)

    # ---------------------------------------------------------------- checkpoints

    def _save_epoch_checkpoints(self, epoch_number: int, finishing: bool) -> None:
        """What the checkpoint policies ask for after the epoch (see callbacks/checkpointing.py)."""
        targets = [target for policy in self.callbacks.of_type(CheckpointPolicy)
                   for target in policy.targets_after_epoch(self, epoch_number, finishing)]
        if targets:
            self.save_checkpoint(_unique(targets))

    def _stop_for_preemption(self) -> None:
        self.text_log.info(f"{self.preemption.signal_name or 'signal'} received: saving a checkpoint at step "
                      f"{self.global_step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch}) and stopping")
        self.save_checkpoint(["last"])
        self.wait_for_checkpoint()  # exit 75 only once the checkpoint is published
        self.should_stop, self.stop_reason = True, "preempted"

    def _phase(self, name: str) -> oom.Phase:
        if name == "validation":
            return oom.Phase(name, self.cfg.data.val_batch_size or self.micro_batch_size, validation=True)
        return oom.Phase(name, self.micro_batch_size, self.accumulation, chosen=self.auto_batch.micro_batch_size is not None)

    def _confusion_due(self, epoch_number: int) -> bool:
        """A classification run draws its confusion matrix on the epochs that get a picture."""
        every = self.cfg.output.samples_every
        return bool(every) and epoch_number % every == 0 and self.data.metadata.get("task") == "classification"

    def _finish(self, status: str) -> None:
        self.progress.close()
        if status != "failed":
            self.wait_for_checkpoint()
        else:  # an error is on its way out already; the others may never reach a barrier
            try:
                self.background_save.wait()
            except Exception as exc:
                self.text_log.info(f"the checkpoint being written in the background failed too: {exc}")
        checkpoint.wait_for_discards()
        self.callbacks.fire(Event.ON_TRAIN_END, self, status)
        self.text_log.info(f"training {status} after {self.epoch} epochs, {self.global_step} optimizer steps")
        self.sinks.finish(status)
        self.text_log.close()
        if status != "failed":  # after a failure on one process, the others may never arrive
            self.accelerator.wait_for_everyone()


def _unique(targets: list[str]) -> list[str]:
    return list(dict.fromkeys(targets))


class _Recorded:
    """A value kept in checkpoints for readers (the dataset's metadata); loading it changes nothing."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        pass

