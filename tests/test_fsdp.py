"""FSDP2 through the real Trainer and accelerate's own FSDP code paths, on 2 CPU processes over gloo
(tests/fsdp_on_cpu.py): checkpoints in the sharded (DCP) and full layouts, saved in the background, a run
stopped by SIGTERM and resumed with `latest` ends with the weights of an uninterrupted run, and what it wrote is
verified and loaded by `cr_accel.load_model` like any other checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

import cr_accel
from cr_accel import checkpoint
from cr_accel.checkpoint.layouts import FSDP_FULL, FSDP_SHARDED, detect
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from tests.runners import PROBE, launch_fsdp2_on_cpu, small_config_file, worker_exit_codes

# 64 samples, batch 8 per process: 4 optimizer steps an epoch on 2 processes, 8 in all; a periodic checkpoint
# every 2 steps, so a stop lands between saves and the resume continues mid-epoch.
SECTIONS = {"data": {"num_train": 64, "num_val": 16, "batch_size": 8}, "training": {"epochs": 2, "log_every": 1},
            "checkpoint": {"save_every_steps": 2, "keep_last_n": None}}
STOP_AT_STEP = 3


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return small_config_file(tmp_path_factory.mktemp("cfg"), "fsdp.yaml", **SECTIONS)


@pytest.fixture(scope="module")
def straight_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("straight")


@pytest.fixture(scope="module")
def straight(config_file, straight_dir):
    """The uninterrupted run, saving synchronously; weight and gradient histograms to TensorBoard every epoch."""
    out = straight_dir
    result = launch_fsdp2_on_cpu("SHARDED_STATE_DICT", PROBE, "--config", config_file, "--probe", out / "p.json",
                                 f"output.dir={out / 'run'}", "checkpoint.async_save=false",
                                 "output.trackers=[tensorboard]", "output.histograms_every=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "run/train.log").read_text()
    assert "DistributedType.FSDP" in (out / "run/environment.json").read_text()
    assert "started in the background" not in log
    return load_file(out / "p.safetensors")


def test_histograms_show_whole_parameters_gathered_from_their_shards(straight, straight_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_dir / "run" / "trackers" / "cr_accel"), size_guidance={"histograms": 0})
    events.Reload()
    assert straight  # the final weights, gathered: every one a parameter of the small model
    for name, weight in straight.items():
        weights = events.Histograms(f"weights/{name}")
        assert [e.step for e in weights] == [4, 8], name  # every epoch of 4 optimizer steps
        assert weights[-1].histogram_value.num == weight.numel(), name  # every process's shard
        assert weights[-1].histogram_value.sum == pytest.approx(float(weight.double().sum()), rel=1e-5, abs=1e-6)
        assert [e.histogram_value.num for e in events.Histograms(f"gradients/{name}")] == [weight.numel()] * 2


@pytest.mark.parametrize("state_dict_type, layout", [("SHARDED_STATE_DICT", FSDP_SHARDED),
                                                     ("FULL_STATE_DICT", FSDP_FULL)])
def test_fsdp2_saves_in_the_background_stops_and_resumes_exactly(config_file, straight, tmp_path, state_dict_type,
                                                                 layout):
    run = tmp_path / "run"
    first = launch_fsdp2_on_cpu(state_dict_type, PROBE, "--config", config_file, "--probe", tmp_path / "first.json",
                                f"output.dir={run}", "--stop-at-step", STOP_AT_STEP)
    output = first.stdout + first.stderr
    # Both processes stopped for the signal at the same step (each one's own record; their exit codes race with
    # torchrun's agent, which SIGTERMs the other worker as soon as the first exits with 75).
    ranks = [json.loads((tmp_path / f"first.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["status"] for r in ranks] == ["preempted", "preempted"], output[-3000:]
    assert ranks[0]["global_step"] == ranks[1]["global_step"]
    assert PREEMPTED_EXIT_CODE in worker_exit_codes(output).values(), output[-3000:]
    log = (run / "train.log").read_text()
    assert "started in the background" in log and "saved synchronously" not in log
    ckpts = run / "checkpoints"
    stopped_at = checkpoint.read_state(ckpts / "last")["trainer"]["global_step"]
    assert STOP_AT_STEP < stopped_at < 8
    for folder in ckpts.iterdir():
        assert detect(folder) is layout, folder
        checkpoint.verify(folder)  # every shard listed, hashed and allowed in the layout

    resumed = launch_fsdp2_on_cpu(state_dict_type, PROBE, "--config", config_file, "--probe", tmp_path / "p.json",
                                  f"output.dir={run}", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'last'}: epoch 1, batch {stopped_at}, step {stopped_at}" in (
        run / "train.log").read_text()
    final = load_file(tmp_path / "p.safetensors")
    assert final.keys() == straight.keys()
    for name in final:
        assert torch.equal(final[name], straight[name]), name
    model = cr_accel.load_model(run)  # best/ or last/, whatever the layout, into a plain model
    assert detect(ckpts / "last") is layout
    last = cr_accel.load_model(ckpts / "last")
    for name, tensor in last.state_dict().items():
        assert torch.equal(tensor, straight[name]), name
    assert model.state_dict().keys() == straight.keys()
