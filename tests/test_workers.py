"""DataLoader workers (data.num_workers, persistent_workers): the default synthetic job trains to the same
weights with 2 workers as with none, and stopped mid-epoch and resumed it ends as an uninterrupted run does,
on 1 and 2 processes. The sampler's shuffle and any augmentation depend on (seed, epoch, sample), never on
which process loads a sample."""

import pytest

from cr_accel.preemption import PREEMPTED_EXIT_CODE
from tests.runners import (PROBE, assert_same_weights, launch_2_cpu_processes, metric_rows, run_1_process,
                           small_config_file)

WORKERS = ("data.num_workers=2", "data.persistent_workers=true")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """48 samples at batch 8: 6 steps an epoch on 1 process, 3 on 2; 2 epochs; dropout, so the RNG matters."""
    return small_config_file(tmp_path_factory.mktemp("workers"), "workers.yaml",
                             model={"base_channels": 4, "dropout": 0.1},
                             data={"num_train": 48, "num_val": 16, "batch_size": 8},
                             training={"epochs": 2, "log_every": 1},
                             checkpoint={"save_every": 1, "keep_last_n": None},
                             output={"samples_every": 0}, dashboard={"enabled": False})


def _run(run, config, folder, *args):
    return run(PROBE, "--config", config, "--probe", folder / "p.json", f"output.dir={folder / 'run'}", *args)


def _same_run(a, b):
    assert_same_weights(a / "p.safetensors", b / "p.safetensors")
    assert metric_rows(a / "run") == metric_rows(b / "run")
    assert metric_rows(a / "run", "steps.csv") == metric_rows(b / "run", "steps.csv")


@pytest.mark.parametrize("run", [run_1_process, launch_2_cpu_processes], ids=["1-process", "2-processes"])
def test_mid_epoch_resume_with_persistent_workers_is_exact(run, config, tmp_path):
    straight = _run(run, config, tmp_path / "s", *WORKERS)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # 2 processes stop one step after the signal (they agree on it at the next step): step 2 of 3
    two = run is launch_2_cpu_processes
    first = _run(run, config, tmp_path / "r", *WORKERS, "--stop-at-step", 1 if two else 3)
    if not two:  # the launcher turns its processes' exit code 75 into 1
        assert first.returncode == PREEMPTED_EXIT_CODE, first.stderr[-3000:]
    from cr_accel import checkpoint

    state = checkpoint.read_state(tmp_path / "r/run/checkpoints/last")["trainer"]
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2 if two else 3), first.stderr[-3000:]  # mid-epoch 1
    second = _run(run, config, tmp_path / "r", *WORKERS, "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    _same_run(tmp_path / "s", tmp_path / "r")
    if run is run_1_process:  # no workers: the same batches, so the same run
        none = _run(run, config, tmp_path / "w0", "data.num_workers=0")
        assert none.returncode == 0, none.stderr[-3000:]
        _same_run(tmp_path / "s", tmp_path / "w0")


@pytest.mark.parametrize("pin_memory, expected", [(None, False), (True, True), (False, False)])
def test_pinned_batches_are_copied_without_blocking(pin_memory, expected):
    """On CPU a null pin_memory is off; asked for, pinned batches reach the device with non_blocking copies."""
    from cr_accel.config import config_from_dict
    from cr_accel.environment import make_accelerator

    cfg = config_from_dict({"data": {"pin_memory": pin_memory}, "dashboard": {"enabled": False}},
                           check_components=False)
    assert make_accelerator(cfg).dataloader_config.non_blocking is expected


class _Priorities:
    """Each sample is the CPU priority (niceness) of the process that loads it."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        import os

        return os.getpriority(os.PRIO_PROCESS, 0)


def test_workers_run_at_a_lower_cpu_priority_than_training():
    """Where cores are short (2 here), the training step keeps its core and the workers take what it leaves."""
    import os

    from torch.utils.data import DataLoader

    from cr_accel.config import DataConfig
    from cr_accel.validation import WORKER_NICENESS, loader_options

    loader = DataLoader(_Priorities(), batch_size=1, **loader_options(DataConfig(num_workers=1), None))
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert [int(batch) for batch in loader] == [min(ours + WORKER_NICENESS, 19)] * 2
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the training process keeps its own
