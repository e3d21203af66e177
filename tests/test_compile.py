"""torch.compile (`training.compile`, or accelerate's `--dynamo_backend`) keeps parameter names plain, so a
run resumes with compile on or off. The `aot_eager` backend traces and compiles through dynamo and AOT
autograd like inductor does, without generating C++ (seconds instead of minutes on CPU)."""

import os

import pytest
import torch
import torch._dynamo
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open

from cr_accel.config import config_from_dict, parse_yaml
from cr_accel.trainer import Trainer
from tests.runners import ROOT
from tests.test_checkpoint import StopAtStep


def cfg_for(out, compile_mode, epochs=3):
    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4)
    raw["data"].update(num_train=32, num_val=16, batch_size=8)
    raw["training"].update(epochs=epochs, compile=compile_mode)
    raw["checkpoint"].update(save_every=1, keep_last_n=None)
    raw["output"]["dir"] = str(out)
    return config_from_dict(raw)


def fresh_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")  # what `accelerate launch --dynamo_backend` sets
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("first, second", [(True, False), (False, True)], ids=["on->off", "off->on"])
def test_resume_with_compile_switched(tmp_path, aot_eager, first, second):
    backend = os.environ.pop("ACCELERATE_DYNAMO_BACKEND")  # the reference run is not compiled at all
    straight = Trainer(cfg_for(tmp_path / "straight", compile_mode=False))
    assert straight.train() == "finished" and compiled_graphs() == 0
    expected = weights(straight)

    def run(compile_mode, **train_kwargs):
        fresh_accelerate()
        if not compile_mode:
            os.environ.pop("ACCELERATE_DYNAMO_BACKEND", None)
        else:
            os.environ["ACCELERATE_DYNAMO_BACKEND"] = backend
        torch._dynamo.reset()  # compiled code of an earlier run must not be reused silently
        before = compiled_graphs()
        trainer = Trainer(cfg_for(tmp_path / "run", compile_mode=compile_mode),
                          callbacks=[StopAtStep(6)] if not train_kwargs else [])
        trainer.train(**train_kwargs)
        assert (compiled_graphs() > before) == bool(compile_mode)  # compiled exactly when asked
        return trainer

    run(first)
    last = tmp_path / "run/checkpoints/last"
    with safe_open(str(last / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert names == set(expected) and not any("_orig_mod" in n for n in names)
    resumed = run(second, resume_from_checkpoint="latest")
    assert resumed.global_step == 12
    for name, value in weights(resumed).items():
        assert torch.allclose(value, expected[name], atol=1e-5, rtol=0), name


def test_compile_mode_by_name_is_passed_to_torch(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.update(kw))
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    Trainer(cfg_for(tmp_path / "a", compile_mode="max-autotune", epochs=1))
    assert seen == {"mode": "max-autotune"}
    fresh_accelerate()
    seen.clear()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    Trainer(cfg_for(tmp_path / "b", compile_mode=False, epochs=1))
    assert seen == {"backend": "inductor"}
