"""Training in stages (cr_accel/stages.py): a frozen-encoder stage at one LR, then everything at another, with
another loss and batch size; logged per step and epoch; exact on resume in the middle of stage 2, on 1 and
2 processes; configs that cannot work refused before anything runs."""

import json

import pytest
import torch
import yaml

from cr_accel.config import config_from_dict, parse_yaml
from cr_accel.errors import ConfigError, UserError
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from cr_accel.trainer import Trainer
from tests.runners import PROBE, ROOT, assert_same_weights, launch_2_cpu_processes, metric_rows, run_1_process

# conv_autoencoder: stem and down are the encoder. 48 samples: 6 steps per epoch at batch 8, 4 at batch 12.
STAGES = [
    {"name": "frozen_encoder", "epochs": 1, "optimizer": {"lr": 2e-3}, "freeze": ["stem", "down"],
     "scheduler": {"name": "constant", "warmup_ratio": 0.0}},
    {"name": "everything", "epochs": 2, "optimizer": {"lr": 5e-4, "weight_decay": 0.01},
     "scheduler": {"name": "cosine", "warmup_ratio": 0.0}, "data": {"batch_size": 12},
     "loss": {"name": "weighted", "terms": {"mse": 1.0, "l1": 0.5}}},
]


def raw_config(out, **training):
    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4, dropout=0.1)
    raw["data"].update(num_train=48, num_val=12, batch_size=8)
    raw["training"].update(epochs=3, log_every=1, **training)
    raw["checkpoint"].update(save_every=1, keep_last_n=None)
    raw["output"].update(dir=str(out), samples_every=0)
    raw["dashboard"]["enabled"] = False
    raw["stages"] = STAGES
    return raw


def test_a_frozen_encoder_stage_then_everything(tmp_path):
    cfg = config_from_dict(raw_config(tmp_path / "run"))
    trainer = Trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    encoder = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("stem.", "down."))}
    head = model.head.weight.clone()
    seen = {}

    from cr_accel.callbacks import Callback

    class Snapshot(Callback):
        def on_step_end(self, trainer, state):
            if state.step == 6:
                seen["encoder"] = {k: v.clone() for k, v in model.state_dict().items() if k in encoder}
                seen["head"] = model.head.weight.clone()

    trainer.add_callback(Snapshot())
    assert trainer.train() == "finished"
    assert all(torch.equal(encoder[k], seen["encoder"][k]) for k in encoder), "the frozen encoder changed in stage 1"
    assert not torch.equal(head, seen["head"])  # the rest trained
    assert any(not torch.equal(encoder[k], v) for k, v in model.state_dict().items() if k in encoder)  # stage 2

    steps = metric_rows(tmp_path / "run", "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 15))  # 6 steps at batch 8, then 2 x 4 at batch 12
    assert [r["stage"] for r in steps] == ["frozen_encoder"] * 6 + ["everything"] * 8
    assert [r["stage_id"] for r in steps] == ["0"] * 6 + ["1"] * 8
    assert all(float(r["lr"]) == pytest.approx(2e-3) for r in steps[:6])
    assert float(steps[6]["lr"]) == pytest.approx(5e-4) and float(steps[-1]["lr"]) == 0.0  # cosine to 0
    assert "loss/l1" in steps[-1] and steps[-1]["loss/l1"] and not steps[0].get("loss/l1")
    epochs = metric_rows(tmp_path / "run")
    assert [(r["epoch"], r["stage"], r["stage_id"]) for r in epochs] == [
        ("1", "frozen_encoder", "0"), ("2", "everything", "1"), ("3", "everything", "1")]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "stage 2/2 `everything` from step 6: 8 optimizer steps, lr 0.0005" in log
    # `cr-accel evaluate` scores the last checkpoint with stage 2's loss (mse + 0.5 l1), as its validation did.
    from cr_accel.evaluate import evaluate

    assert evaluate(str(tmp_path / "run"), "last", "val")["val_loss"] == pytest.approx(float(epochs[-1]["val_loss"]),
                                                                                    rel=1e-6)


@pytest.fixture(scope="module")
def stages_config(tmp_path_factory):
    config = tmp_path_factory.mktemp("stages") / "stages.yaml"
    config.write_text(yaml.safe_dump(raw_config("unused")))
    return config


@pytest.fixture(scope="module")
def straight_one_process(stages_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    straight = run_1_process(PROBE, "--config", stages_config, "--probe", out / "p.json", f"output.dir={out / 'run'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    return out


@pytest.mark.parametrize("stop_at_step, stage_step, batch_in_epoch", [(8, 2, 2), (6, 0, 6)],
                         ids=["mid-stage-2", "stage-1s-last-step-before-the-epoch-ends"])
def test_resume_in_stage_2_is_exact_one_process(stages_config, straight_one_process, tmp_path, stop_at_step,
                                                stage_step, batch_in_epoch):
    """Step 8: two steps into stage 2, mid-epoch at batch 12. Step 6: stage 1's last step, checkpointed before
    its epoch is closed, so the resume finishes that epoch at batch 8 and only then takes batch 12."""
    run = f"output.dir={tmp_path / 'r/run'}"
    first = run_1_process(PROBE, "--config", stages_config, "--probe", tmp_path / "r/first.json", run,
                          "--stop-at-step", stop_at_step)
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stderr[-3000:]
    from cr_accel import checkpoint

    state = checkpoint.read_state(tmp_path / "r/run/checkpoints/last")
    assert state["stages"]["current_stage"] == 1 and state["stages"]["stage_step"] == stage_step
    assert state["trainer"]["batch_in_epoch"] == batch_in_epoch
    second = run_1_process(PROBE, "--config", stages_config, "--probe", tmp_path / "r/p.json", run,
                           "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    straight = straight_one_process
    assert_same_weights(straight / "p.safetensors", tmp_path / "r/p.safetensors")
    assert metric_rows(straight / "run") == metric_rows(tmp_path / "r/run")
    assert metric_rows(straight / "run", "steps.csv") == metric_rows(tmp_path / "r/run", "steps.csv")
    assert json.loads((straight / "p.json").read_text())["lrs"] == (
        json.loads((tmp_path / "r/first.json").read_text())["lrs"] + json.loads((tmp_path / "r/p.json").read_text())["lrs"])


def test_resume_in_the_middle_of_stage_2_is_exact_two_processes(stages_config, tmp_path):
    """Batch 8 per process: 3 steps per epoch, then 2 at batch 12. The processes stop one step after the signal."""
    config = stages_config
    straight = launch_2_cpu_processes(PROBE, "--config", config, "--probe", tmp_path / "s/p.json",
                                      f"output.dir={tmp_path / 's/run'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = f"output.dir={tmp_path / 'r/run'}"
    launch_2_cpu_processes(PROBE, "--config", config, "--probe", tmp_path / "r/first.json", run, "--stop-at-step", 3)
    from cr_accel import checkpoint

    state = checkpoint.read_state(tmp_path / "r/run/checkpoints/last")
    assert state["stages"]["current_stage"] == 1 and state["stages"]["stage_step"] == 1
    assert state["trainer"]["batch_in_epoch"] == 1
    second = launch_2_cpu_processes(PROBE, "--config", config, "--probe", tmp_path / "r/p.json", run,
                                    "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(tmp_path / "s/p.safetensors", tmp_path / "r/p.safetensors")
    assert metric_rows(tmp_path / "s/run") == metric_rows(tmp_path / "r/run")


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["training"].update(epochs=4), "the stages add up to 3 epochs but training.epochs is 4"),
    (lambda raw: raw["stages"][1].update(steps=8), "give the stage's length as `epochs` or `steps`"),
    (lambda raw: raw["stages"][0].update(epochs=None, steps=6) or raw["stages"][0].pop("epochs"),
     "all `epochs` or all `steps`"),
    (lambda raw: raw["stages"][1].update(fraze=["stem"]), "`stages[1].fraze`: is not a stage key (did you mean `freeze`?)"),
    (lambda raw: raw["stages"][1].update(name="frozen_encoder"), "names two stages"),
    (lambda raw: raw["stages"][0]["optimizer"].update(betas=[0.9, 0.99]), "may change lr, weight_decay here"),
    (lambda raw: raw["stages"][0]["optimizer"].update(lr=-1), "with this stage's changes, `optimizer.lr`: must be > 0"),
    (lambda raw: raw["stages"][1]["loss"].update(name="msee"), "with this stage's changes"),
    (lambda raw: raw["training"].update(auto_batch_size=True), "`training.auto_batch_size`: does not work with"),
])
def test_stages_that_cannot_work_are_refused_with_the_key(tmp_path, change, message):
    raw = raw_config(tmp_path / "run")
    raw["stages"] = json.loads(json.dumps(STAGES))
    change(raw)
    with pytest.raises(ConfigError, match=None) as refused:
        config_from_dict(raw)
    assert message in str(refused.value)


def test_a_freeze_prefix_that_names_no_module_is_refused_before_anything_is_written(tmp_path):
    raw = raw_config(tmp_path / "run")
    raw["stages"] = json.loads(json.dumps(STAGES))
    raw["stages"][0]["freeze"] = ["stem", "donw"]
    with pytest.raises(UserError, match=r"stages\[0\].freeze: `donw` names no parameter of the model \(did you mean `down`"):
        Trainer(config_from_dict(raw))
    assert not (tmp_path / "run").exists()
