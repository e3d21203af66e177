"""Shared test fixtures: the repo root, running the real command line in a subprocess, every test on the CPU,
and the example data that the configs in configs/ point at."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runners import clean_env, example_data_script

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env():
    """The environment of a command a test runs: `tests.runners.clean_env`, the one definition."""
    return clean_env()


def _run_command(argv, timeout=120, cwd=REPO_ROOT):
    """Run `argv` as a user would; (returncode, stdout, stderr). A hang fails the test instead of blocking it."""
    try:
        proc = subprocess.run(
            [str(a) for a in argv], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(map(str, argv))}` did not finish in {timeout} s\nstderr: {exc.stderr}")
    return proc.returncode, proc.stdout, proc.stderr


def _run_train(*args, timeout=120):
    """`python train.py ARGS` from the repo root."""
    return _run_command([sys.executable, "train.py", *args], timeout=timeout)


def console_script(name="cr-accel"):
    """The installed console script: next to this interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"console script `{name}` is not installed; run `pip install -e .` in the venv"
    return found


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """Every test trains on the CPU, in process too (subprocesses get it from `clean_env`): on a GPU machine a
    Trainer built in the test would otherwise pick CUDA and `auto` precision would mean bf16, so the CPU
    expectations (fp32, bitwise-equal resumes, fp16 refused) would silently be tested on something else."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")


@pytest.fixture(autouse=True, scope="session")
def example_data():
    """The example data files the configs in configs/ point at (examples/data/, not committed), written by
    the same script a user runs, when missing; tests that train on them generate their own copy in tmp_path."""
    script = example_data_script()
    out = script.DEFAULT_OUT
    if not all((out / name).is_file() for name in script.FILES):
        script.write_example_data(out)
    return out


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (its state, the gradient state); every test that builds a
    Trainer in this process starts from scratch, as a new run would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def run_command():
    """run_command(argv, timeout=120) -> (returncode, stdout, stderr), cwd = repo root."""
    return _run_command


@pytest.fixture(scope="session")
def run_train():
    """run_train(*args, timeout=120) -> (returncode, stdout, stderr) of `python train.py ARGS`."""
    return _run_train


@pytest.fixture(scope="session")
def cr_accel_script():
    """Path of the installed `cr-accel` console script."""
    return console_script()
