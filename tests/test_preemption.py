"""The preemption vote with real processes: a signal that reaches ONE of two processes stops both at the same
optimizer step, the first decision step of the vote after the signal (cr_accel.preemption.VOTE_EVERY)."""

import json

import pytest
import yaml

from cr_accel import checkpoint
from cr_accel.preemption import VOTE_EVERY
from tests.runners import ROOT, launch_2_cpu_processes

SCRIPT = ROOT / "tests" / "signal_one_process.py"


def expected_stop(signal_step):
    """The flags are posted at the steps before decision steps (multiples of VOTE_EVERY); a signal during step
    S is in the first post at a step >= S, and the decision comes one step later."""
    post = signal_step + (VOTE_EVERY - 1 - signal_step) % VOTE_EVERY
    return post + 1


@pytest.fixture
def config_file(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["data"].update(num_train=64, num_val=8, batch_size=8)  # 4 optimizer steps per epoch with 2 processes
    raw["training"].update(epochs=3, log_every=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("signalled_rank, signal_step", [(1, 1), (1, 2), (0, 5)])
def test_a_signal_to_one_process_stops_both_at_the_same_step(config_file, tmp_path, signalled_rank, signal_step):
    out = tmp_path / "out"
    result = launch_2_cpu_processes(SCRIPT, "--config", config_file, "--out", out, "--rank", signalled_rank,
                                    "--at-step", signal_step, f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    stop = expected_stop(signal_step)
    assert signal_step < stop <= signal_step + VOTE_EVERY
    assert ranks == [{"status": "preempted", "global_step": stop}] * 2
    assert checkpoint.read_state(tmp_path / "run" / "checkpoints" / "last")["trainer"]["global_step"] == stop
