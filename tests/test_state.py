"""The state registry: one list of what a checkpoint holds, each part saving and loading itself."""

import json

import pytest
import torch

from cr_accel.callbacks import Callback, CallbackList
from cr_accel.callbacks.checkpointing import CheckpointPolicy, EarlyStopping
from cr_accel.errors import CheckpointError
from cr_accel.state import StateRegistry, TrainState, parts_from_file


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class Averaged:
    """A part with tensors (as EMA weights would be)."""

    def __init__(self):
        self.weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
        self.decay = 0.9

    def state_dict(self):
        return {"weights": self.weights, "decay": self.decay, "history": [torch.ones(2), 1.5]}

    def load_state_dict(self, state):
        self.weights, self.decay, self.history = state["weights"], state["decay"], state["history"]


def test_duplicate_and_incomplete_parts_are_refused():
    registry = StateRegistry()
    registry.register("counter", Counter())
    with pytest.raises(ValueError, match="`counter` is already registered"):
        registry.register("counter", Counter())
    with pytest.raises(TypeError, match="needs state_dict"):
        registry.register("plain", object())


def test_tensors_go_to_their_own_file_and_come_back(tmp_path):
    from safetensors.torch import load_file, save_file

    source = StateRegistry()
    part = source.register("ema", Averaged())
    part.weights["w"] += 1
    states, tensors = source.state_dict()
    json.dumps(states)  # everything but the tensors is JSON
    assert sorted(tensors) == ["ema/history/0", "ema/weights/b", "ema/weights/w"]
    part.weights["w"] += 100  # the saved copy does not follow the live tensor
    save_file(tensors, str(tmp_path / "t.safetensors"))
    target = StateRegistry()
    loaded = target.register("ema", Averaged())
    target.load_state_dict(json.loads(json.dumps(states)), load_file(str(tmp_path / "t.safetensors")))
    assert torch.equal(loaded.weights["w"], torch.arange(6.0).reshape(2, 3) + 1)
    assert loaded.decay == 0.9 and loaded.history[1] == 1.5 and torch.equal(loaded.history[0], torch.ones(2))


def test_unknown_parts_are_refused_and_missing_ones_keep_their_values():
    registry = StateRegistry()
    counter = registry.register("counter", Counter())
    counter.n = 7
    with pytest.raises(CheckpointError, match="`other`"):
        registry.load_state_dict({"other": {}})
    registry.load_state_dict({})
    assert counter.n == 7


def test_a_tensor_reference_without_its_tensor_is_refused():
    registry = StateRegistry()
    registry.register("ema", Averaged())
    states, _ = registry.state_dict()
    with pytest.raises(CheckpointError, match="does not hold"):
        registry.load_state_dict(states, {})


@pytest.mark.parametrize("field, value", [("epoch", "3"), ("global_step", 2.5), ("world_size", True),
                                          ("best_value", "low"), ("batch_in_epoch", None), ("nonsense", 1)])
def test_train_state_with_wrong_types_is_refused(field, value):
    state = TrainState()
    with pytest.raises(CheckpointError, match=f"`{field}`"):
        state.load_state_dict({**state.state_dict(), field: value})
    assert state == TrainState()  # nothing was half applied


def test_the_best_value_of_older_checkpoints_reaches_the_checkpoint_policy_and_early_stopping():
    """Before they were callbacks, the best value and the early-stopping count lived in the trainer's part:
    an older checkpoint's values are checked there and taken by the callbacks (an integer best included)."""
    state = TrainState()
    state.load_state_dict({"best_value": 3, "bad_validations": 2})
    assert state == TrainState()  # checked, not kept
    callbacks = CallbackList()
    policy = callbacks.add(CheckpointPolicy("val_loss"))
    stopping = callbacks.add(EarlyStopping("val_loss", patience=5))
    callbacks.load_legacy({"best_value": 3, "bad_validations": 2}, saved={})
    assert policy.best == 3.0 and isinstance(policy.best, float)
    assert stopping.monitor.best == 3.0 and stopping.bad_validations == 2
    callbacks.load_state_dict({"checkpoint_policy": {"best": None}, "early_stopping": {"best": 1.5, "bad_validations": 0}})
    callbacks.load_legacy({"best_value": 3, "bad_validations": 2}, saved={"checkpoint_policy": {}, "early_stopping": {}})
    assert policy.best is None and stopping.monitor.best == 1.5 and stopping.bad_validations == 0
    with pytest.raises(CheckpointError, match="`best`"):
        policy.load_state_dict({"best": "low"})
    with pytest.raises(CheckpointError, match="`bad_validations`"):
        stopping.load_state_dict({"best": None, "bad_validations": -1})


def test_format_1_files_map_to_parts_with_documented_defaults():
    legacy = {"format": 1, "epoch": 2, "global_step": 8, "world_size": 2, "schedule": {"step_count": 8, "base_lrs": [0.1]},
              "epoch_stats": [{"losses": [1.0], "norms": [], "skipped_steps": 0, "samples": 8}]}
    parts = parts_from_file(legacy, "ckpt")
    assert parts["trainer"] == {"epoch": 2, "batch_in_epoch": 0, "global_step": 8, "world_size": 2,
                                "best_value": None, "bad_validations": 0}
    assert parts["schedule"]["step_count"] == 8 and parts["callbacks"] == {} and parts["dataset"] == {}
    assert parts["epoch_stats"] == {"per_process": legacy["epoch_stats"]}
    with pytest.raises(CheckpointError, match="lacks global_step"):
        parts_from_file({"format": 1, "epoch": 0, "world_size": 1, "schedule": {}}, "ckpt")
    with pytest.raises(CheckpointError, match="unknown keys surprise"):
        parts_from_file({**legacy, "surprise": 1}, "ckpt")
    with pytest.raises(CheckpointError, match="reads up to"):
        parts_from_file({"format": 99, "parts": {}}, "ckpt")


class Keyed(Callback):
    state_key = "my_counter"

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class Unkeyed(Keyed):
    state_key = None


def test_callback_state_follows_its_key_not_its_position():
    saved = CallbackList()
    saved.add(Keyed()).n = 5
    saved.add(Unkeyed()).n = 6
    saved.add(Unkeyed()).n = 7
    state = saved.state_dict()
    assert state == {"my_counter": {"n": 5}, "Unkeyed": {"n": 6}, "Unkeyed#2": {"n": 7}}
    loaded = CallbackList()
    loaded.add(Callback())  # a callback without state in front moves nobody's state
    first, second, keyed = loaded.add(Unkeyed()), loaded.add(Unkeyed()), loaded.add(Keyed())
    loaded.load_state_dict(state)
    assert (keyed.n, first.n, second.n) == (5, 6, 7)


def test_callback_state_of_format_1_checkpoints_is_found_by_position():
    loaded = CallbackList()
    cb = loaded.add(Unkeyed())
    loaded.load_state_dict({"0:Unkeyed": {"n": 3}})
    assert cb.n == 3
