"""EMA of the weights (training.ema_decay): the average against a reference computed from the raw weights of
every step, validation and best/ on the EMA model, exact resume, load_model, and a 2-process run."""

import csv
import signal
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import cr_accel
from cr_accel import checkpoint, components
from cr_accel.callbacks import Callback, builtin_callbacks
from cr_accel.callbacks.ema import EMA
from cr_accel.config import config_from_dict, load_config
from cr_accel.errors import ConfigError, UserError
from cr_accel.trainer import Trainer
from tests.runners import ROOT, launch_2_cpu_processes, small_config_file
from tests.test_trainer import mlp_config, regression_files

DECAY, START, EVERY = 0.9, 2, 2
EPOCHS, STEPS_PER_EPOCH = 3, 3  # 30 training samples in batches of 10


def ema_config(tmp_path, folder="run", **overrides):
    data = regression_files(tmp_path, n=40)
    return mlp_config(tmp_path, data, data__val_ratio=0.25, training__epochs=EPOCHS, training__ema_decay=DECAY,
                      training__ema_start_step=START, training__ema_every=EVERY, checkpoint__save_every=1,
                      checkpoint__keep_last_n=None, output__dir=str(tmp_path / folder), **overrides)


def reset_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def ema_of(trainer):
    (ema,) = [cb for cb in trainer.callbacks.callbacks if isinstance(cb, EMA)]
    return ema


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def averages(ema):
    return {n: t.clone() for n, t in zip(ema.names, ema.averages)}


class Recorder(Callback):
    """The raw weights at the start and after every optimizer step; what the model holds during validation
    (on_validation_end) and after it (on_epoch_end), next to the EMA callback's average at that moment."""

    def __init__(self):
        self.raw = []  # raw[s]: the weights after optimizer step s (raw[0]: before the first)
        self.at_validation_end, self.at_epoch_end = [], []

    def on_train_start(self, trainer):
        self.raw.append(weights(trainer.accelerator.unwrap_model(trainer.model)))

    def on_step_end(self, trainer, state):
        assert state.step == len(self.raw)
        self.raw.append(weights(trainer.accelerator.unwrap_model(trainer.model)))

    def _seen(self, trainer):
        ema = ema_of(trainer)
        return weights(trainer.accelerator.unwrap_model(trainer.model)), averages(ema)

    def on_validation_end(self, trainer, metrics):
        self.at_validation_end.append(self._seen(trainer))

    def on_epoch_end(self, trainer, state):
        self.at_epoch_end.append(self._seen(trainer))


def reference_ema(raw, decay=DECAY, start=START, every=EVERY):
    """references[s]: the EMA after step s, in float64, written out from the definition (README)."""
    ema = {n: w.double() for n, w in raw[0].items()}
    references = [dict(ema)]
    for step in range(1, len(raw)):
        if step < start:
            ema = {n: w.double() for n, w in raw[step].items()}
        elif step % every == 0:
            ema = {n: decay * ema[n] + (1 - decay) * raw[step][n].double() for n in ema}
        references.append(dict(ema))
    return references


def assert_close(ema, reference, atol=1e-6):
    assert ema.keys() == reference.keys()
    for name in ema:
        assert torch.allclose(ema[name].double(), reference[name], rtol=0, atol=atol), name


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def val_loss_of(trainer, params):
    """The mean MSE over the validation set of the model with `params`, computed apart from the trainer."""
    model = type(trainer.accelerator.unwrap_model(trainer.model))(8, 4, [64, 64])
    model.load_state_dict(params)
    inputs, targets = trainer.data.val.tensors
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(inputs), targets).item()


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ema")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_CPU", "1")
        reset_accelerate()
        recorder = Recorder()
        trainer = Trainer(ema_config(tmp_path), callbacks=[recorder])
        trainer.train()
        reset_accelerate()
    return SimpleNamespace(trainer=trainer, recorder=recorder, run=tmp_path / "run",
                           references=reference_ema(recorder.raw))


def test_the_ema_is_the_average_of_the_recorded_weights(recorded_run):
    recorder, ema = recorded_run.recorder, ema_of(recorded_run.trainer)
    assert len(recorder.raw) == EPOCHS * STEPS_PER_EPOCH + 1
    final = averages(ema)
    assert ema.step == EPOCHS * STEPS_PER_EPOCH
    assert_close(final, recorded_run.references[-1])
    # Not trivially the weights: the average lags behind them.
    assert max((final[n] - recorder.raw[-1][n]).abs().max().item() for n in final) > 1e-3
    # Before ema_start_step the average is a copy of the weights.
    assert_equal({n: t.float() for n, t in recorded_run.references[1].items()}, recorder.raw[1])


def test_validation_sees_the_ema_and_the_raw_weights_come_back(recorded_run):
    trainer, recorder, references = recorded_run.trainer, recorded_run.recorder, recorded_run.references
    with open(recorded_run.run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for epoch, row in enumerate(rows):
        step = (epoch + 1) * STEPS_PER_EPOCH
        model_then, average_then = recorder.at_validation_end[epoch]
        assert_equal(model_then, average_then)  # on_validation_end hooks (the pictures too) see the EMA model
        assert_close(average_then, references[step])
        model_after, _ = recorder.at_epoch_end[epoch]
        assert_equal(model_after, recorder.raw[step])  # the raw weights are back for on_epoch_end hooks
        ema_loss, raw_loss = val_loss_of(trainer, average_then), val_loss_of(trainer, recorder.raw[step])
        assert float(row["val_loss"]) == pytest.approx(ema_loss, rel=1e-5)
        assert abs(ema_loss - raw_loss) > 1e-4 * raw_loss  # the two models really differ on this data
    # best/ is decided on the EMA's val_loss.
    best = checkpoint.read_state(recorded_run.run / "checkpoints/best")["callbacks"]["checkpoint_policy"]
    assert best["best"] == min(float(r["val_loss"]) for r in rows)


def test_checkpoints_hold_the_raw_weights_and_the_ema(recorded_run):
    recorder, references = recorded_run.recorder, recorded_run.references
    for step in range(STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH):
        folder = recorded_run.run / f"checkpoints/step_{step:08d}"
        assert_equal(load_file(folder / "model.safetensors"), recorder.raw[step])
        saved = load_file(folder / checkpoint.store.TENSORS)
        prefix = "callbacks/ema/params/"
        assert_close({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}, references[step])
        assert checkpoint.read_state(folder)["callbacks"]["ema"]["step"] == step


def test_load_model_gives_the_ema_weights_and_the_raw_ones_on_request(recorded_run):
    run, recorder, references = recorded_run.run, recorded_run.recorder, recorded_run.references
    best_step = checkpoint.read_state(run / "checkpoints/best")["trainer"]["global_step"]
    model = cr_accel.load_model(run)  # the run's best/
    assert_close(weights(model), references[best_step])
    assert_equal(weights(cr_accel.load_model(run, ema=False)), recorder.raw[best_step])
    assert not model.training


def test_validations_every_few_steps_see_the_ema_and_the_training_goes_on_from_the_raw_weights(recorded_run,
                                                                                             tmp_path):
    """training.eval_every_steps=2: each mid-epoch validation measures the EMA model, and the training goes on
    from the raw weights -- the run ends with the same weights and EMA as the run without those validations."""
    recorder = Recorder()
    trainer = Trainer(ema_config(tmp_path, training__eval_every_steps=2), callbacks=[recorder])
    assert trainer.train() == "finished"
    reset_accelerate()
    assert_equal(weights(trainer.accelerator.unwrap_model(trainer.model)), recorded_run.recorder.raw[-1])
    assert_equal(averages(ema_of(trainer)), averages(ema_of(recorded_run.trainer)))
    with open(tmp_path / "run/steps.csv", newline="") as f:
        validated = [int(r["step"]) for r in csv.DictReader(f) if r.get("val_loss")]
    assert validated == [2, 4, 6, 8]
    # Each validation measured the EMA model of its step (the one at step 6 also gives epoch 2 its row).
    with open(tmp_path / "run/steps.csv", newline="") as f:
        losses = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")}
    for step in validated:
        reference = {n: t.float() for n, t in recorded_run.references[step].items()}
        assert losses[step] == pytest.approx(val_loss_of(trainer, reference), rel=1e-5), step
        assert losses[step] != pytest.approx(val_loss_of(trainer, recorded_run.recorder.raw[step]), rel=1e-5)
    # Mid-epoch, the raw weights are back once EMA's on_validation_end has run (hooks after it see them).
    assert all(not torch.equal(model_then["1.weight"], average_then["1.weight"])
               for model_then, average_then in recorder.at_validation_end[:1])


class StopAt(Callback):
    def __init__(self, step, how):
        self.step, self.how = step, how

    def on_step_end(self, trainer, state):
        if state.step != self.step:
            return
        if self.how == "sigterm":
            signal.raise_signal(signal.SIGTERM)  # the real preemption path: checkpoint this step at once, stop
        else:
            trainer.should_stop = True  # the epoch ends as usual: validation (on the EMA), then the checkpoint


@pytest.mark.parametrize("stop_at, how", [(4, "sigterm"), (6, "should_stop")], ids=["sigterm-mid-epoch", "after-validation"])
def test_a_stopped_and_resumed_run_has_the_same_ema_bit_for_bit(recorded_run, tmp_path, stop_at, how):
    """Stopped inside epoch 2 by SIGTERM, or at the end of epoch 2 (its checkpoint written after a validation
    that put the EMA into the model), then resumed with `latest`: the EMA and the weights equal the
    uninterrupted run's exactly."""
    first = Trainer(ema_config(tmp_path), callbacks=[StopAt(stop_at, how)])
    assert first.train() == ("preempted" if how == "sigterm" else "finished") and first.global_step == stop_at
    reset_accelerate()
    resumed = Trainer(ema_config(tmp_path))
    assert resumed.train(resume_from_checkpoint="latest") == "finished"
    straight, again = ema_of(recorded_run.trainer), ema_of(resumed)
    assert again.step == straight.step == EPOCHS * STEPS_PER_EPOCH
    assert_equal(averages(again), averages(straight))
    assert_equal(weights(resumed.accelerator.unwrap_model(resumed.model)), recorded_run.recorder.raw[-1])


def test_config_keys_are_checked():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"training": {"ema_decay": 1.0, "ema_start_step": -1, "ema_every": 0}})
    message = str(error.value)
    assert "`training.ema_decay`: must be in (0, 1)" in message
    assert "`training.ema_start_step`: must be >= 0" in message and "`training.ema_every`: must be >= 1" in message
    with pytest.raises(ConfigError, match=r"training\.ema_decay"):
        config_from_dict({"training": {"ema_decay": 0}})


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_engines_are_refused(engine):
    cfg = config_from_dict({"training": {"ema_decay": 0.99}})
    with pytest.raises(UserError, match=r"`training.ema_decay` is set, but this run is launched with"):
        builtin_callbacks(cfg, SimpleNamespace(distributed_type=engine))
    assert isinstance(builtin_callbacks(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))[0], EMA)
    assert not any(isinstance(cb, EMA) for cb in builtin_callbacks(config_from_dict({})))


def test_two_processes_keep_the_same_ema(tmp_path):
    """2 processes (DDP over gloo): the EMA in the checkpoints follows the saved raw weights, and the last
    validation -- its samples split over both processes -- measured the EMA model."""
    config = small_config_file(tmp_path, "ema.yaml", data={"num_train": 32, "num_val": 13, "batch_size": 8},
                               model={"base_channels": 4},
                               training={"epochs": 2, "ema_decay": 0.8, "ema_start_step": 3, "ema_every": 2},
                               checkpoint={"save_every": 1, "keep_last_n": None}, dashboard={"enabled": False})
    result = launch_2_cpu_processes(ROOT / "train.py", "--config", config, f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = tmp_path / "run/checkpoints"
    # 32 samples / (2 processes x 8) = 2 steps per epoch; steps 1, 2 copy the weights, step 4 averages.
    raw2, raw4 = (load_file(ckpts / f"step_{s:08d}/model.safetensors") for s in (2, 4))
    assert_equal(weights(cr_accel.load_model(ckpts / "step_00000002")), raw2)
    expected = {n: 0.8 * raw2[n].double() + 0.2 * raw4[n].double() for n in raw4}
    model = cr_accel.load_model(ckpts / "step_00000004")
    assert_close(weights(model), expected)
    cfg = load_config(config, [f"output.dir={tmp_path / 'run'}"])
    data, loss_fn = components.build_datasets(cfg), components.build_loss(cfg)
    inputs, targets = (torch.stack(t) for t in zip(*(data.val[i] for i in range(len(data.val)))))
    raw_model = cr_accel.load_model(ckpts / "step_00000004", ema=False)
    with torch.no_grad():
        ema_loss, raw_loss = (loss_fn(m(inputs), targets).item() for m in (model, raw_model))
    with open(tmp_path / "run/metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["val_loss"]) == pytest.approx(ema_loss, rel=1e-5)
    assert abs(ema_loss - raw_loss) > 1e-4 * raw_loss  # the two models really differ on this data
