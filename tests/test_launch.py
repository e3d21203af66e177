"""Tests of launch.sh and accelerate_configs/.

Most tests use `launch.sh --dry-run` (it prints the exact command, one line) and set
CR_ACCEL_NUM_GPUS to fix what GPU detection sees, so they are fast and do not depend on the
machine. `test_gpu_detection_*` runs the real detection, and `test_real_two_process_cpu_run`
really starts 2 gloo processes through accelerate launch (about 5-10 s on 2 cores).
"""

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch.sh"
LAUNCHER = ROOT / "cr_accel" / "launch_exit.py"  # `accelerate launch`, with the workers' exit codes
CONFIGS = ROOT / "accelerate_configs"
CONFIG_NAMES = ["cpu", "deepspeed", "fsdp", "multi_gpu", "multi_node", "single_gpu"]


# Set by an outer launcher, these would make the test's processes join someone else's job.
OUTER_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(*args, gpus=0, extra_env=None, timeout=60):
    """Run launch.sh with `args`. gpus=None lets it detect GPUs itself."""
    env = {k: v for k, v in os.environ.items() if k not in OUTER_LAUNCHER_VARS and k != "CR_ACCEL_NUM_GPUS"}
    env.update(PYTHON=sys.executable, **(extra_env or {}))
    if gpus is not None:
        env["CR_ACCEL_NUM_GPUS"] = str(gpus)
    return subprocess.run(
        [str(LAUNCH), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def dry_run(*args, gpus=0):
    """The command launch.sh would run, split into words the way bash would."""
    result = launch("--dry-run", *args, gpus=gpus)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1, f"not one line: {result.stdout!r}"
    return shlex.split(result.stdout)


def value_after(words, flag):
    assert flag in words, f"{flag} missing from {words}"
    return words[words.index(flag) + 1]


def test_launch_sh_is_executable_and_has_help():
    assert os.access(LAUNCH, os.X_OK)
    result = launch("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: ./launch.sh")
    for name in CONFIG_NAMES:
        assert name in result.stdout


def test_cpu_two_processes_uses_the_multi_cpu_recipe():
    words = dry_run("--num-processes", "2", "--config", "c.yaml")
    assert words[:2] == ["env", "ACCELERATE_USE_CPU=1"]
    assert words[2:4] == [sys.executable, str(LAUNCHER)]
    assert value_after(words, "--config_file") == str(CONFIGS / "cpu.yaml")
    assert "--multi_gpu" in words
    assert "--cpu" not in words  # `--cpu --num_processes 2` silently starts one process
    assert value_after(words, "--num_processes") == "2"
    assert value_after(words, "--num_machines") == "1"


def test_cpu_without_num_processes_is_a_plain_single_process_launch():
    words = dry_run("--config", "c.yaml")
    assert words[:2] == [sys.executable, str(LAUNCHER)]
    assert value_after(words, "--config_file") == str(CONFIGS / "cpu.yaml")
    assert not {"env", "ACCELERATE_USE_CPU=1", "--multi_gpu", "--num_processes"} & set(words)
    assert words[-3:] == [str(ROOT / "train.py"), "--config", "c.yaml"]


def test_gpu_detection_picks_the_config_for_this_machine():
    import torch

    expected = {0: "cpu", 1: "single_gpu"}.get(torch.cuda.device_count(), "multi_gpu")
    words = dry_run("--config", "c.yaml", gpus=None)
    # A mismatch on a GPU machine means nvidia-smi and torch disagree (e.g. a CPU-only torch build).
    assert value_after(words, "--config_file") == str(CONFIGS / f"{expected}.yaml")


@pytest.mark.parametrize(
    "gpus, options, config, num_processes",
    [
        (1, [], "single_gpu", None),
        (4, [], "multi_gpu", "4"),
        (4, ["--num-processes", "2"], "multi_gpu", "2"),
        (1, ["--num-processes", "2"], "multi_gpu", "2"),
        (8, ["--accelerate-config", "fsdp"], "fsdp", "8"),
        (8, ["--accelerate-config=deepspeed", "--num-processes=4"], "deepspeed", "4"),
    ],
)
def test_gpu_machines_get_the_matching_config_and_process_count(gpus, options, config, num_processes):
    words = dry_run(*options, "--config", "c.yaml", gpus=gpus)
    assert words[0] == sys.executable  # no ACCELERATE_USE_CPU on GPU configs
    assert value_after(words, "--config_file") == str(CONFIGS / f"{config}.yaml")
    if num_processes is None:
        assert "--num_processes" not in words
    else:
        assert value_after(words, "--num_processes") == num_processes


def test_config_given_as_a_path(tmp_path):
    config = tmp_path / "my accel.yaml"
    config.write_text((CONFIGS / "cpu.yaml").read_text())
    words = dry_run("--accelerate-config", config, "--num-processes", "3")
    assert value_after(words, "--config_file") == str(config)
    assert words[:2] == ["env", "ACCELERATE_USE_CPU=1"]  # use_cpu: true in the file
    assert value_after(words, "--num_processes") == "3"


TRICKY_ARGS = [
    "--config",
    "configs/my run.yaml",
    "training.name=hello world",
    "model.kwargs=a=b=c",
    "it's",
    'say "hi"',
    "$HOME",
    "*",
    "--overwrite",
    "--dry-run",  # after the first train.py argument, launcher options are not parsed
]


def test_arguments_after_the_launcher_options_reach_train_py_unchanged():
    words = dry_run("--num-processes", "2", *TRICKY_ARGS)
    assert words[-len(TRICKY_ARGS) - 1 :] == [str(ROOT / "train.py"), *TRICKY_ARGS]


def test_double_dash_ends_the_launcher_options():
    words = dry_run("--", "--num-processes", "abc", "--accelerate-config", "nope")
    assert words[-5:] == [str(ROOT / "train.py"), "--num-processes", "abc", "--accelerate-config", "nope"]
    assert "--multi_gpu" not in words


@pytest.mark.parametrize(
    "options",
    [
        ["--num-processes", "abc"],
        ["--num-processes", "0"],
        ["--num-processes", "-1"],
        ["--num-processes=2.5"],
        ["--num-processes="],
        ["--num-processes"],
    ],
)
def test_bad_num_processes_exits_2_with_a_one_line_message(options):
    result = launch(*options, "--dry-run", "--config", "c.yaml")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "--num-processes" in result.stderr
    assert "available accelerate configs: " + ", ".join(CONFIG_NAMES) in result.stderr


@pytest.mark.parametrize("name", ["nope", "cpu.yml", "/does/not/exist.yaml", ""])
def test_unknown_accelerate_config_exits_2_and_lists_the_configs(name):
    result = launch("--accelerate-config", name, "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"unknown accelerate config '{name}'" in result.stderr
    assert "available accelerate configs: " + ", ".join(CONFIG_NAMES) in result.stderr


@pytest.mark.parametrize("name", ["multi_gpu", "fsdp", "deepspeed"])
def test_gpu_configs_are_refused_without_gpus(name):
    # accelerate would otherwise start N independent one-process runs without a word.
    result = launch("--accelerate-config", name, "--dry-run", gpus=0)
    assert result.returncode == 2
    assert "needs CUDA GPUs" in result.stderr


def test_multi_node_by_name_is_refused_but_a_filled_in_copy_works(tmp_path):
    # The shipped file has no main_process_ip: accelerate would hang retrying "(None, 29500)".
    result = launch("--accelerate-config", "multi_node", "--num-processes", "16", "--dry-run", gpus=8)
    assert result.returncode == 2
    assert "docs/slurm.md" in result.stderr
    copy = tmp_path / "node1.yaml"
    text = (CONFIGS / "multi_node.yaml").read_text()
    copy.write_text(text.replace("machine_rank: 0", "machine_rank: 1\nmain_process_ip: 10.0.0.1"))
    words = dry_run("--accelerate-config", copy, "--num-processes", "16", gpus=8)
    assert value_after(words, "--config_file") == str(copy)
    assert value_after(words, "--num_processes") == "16"


def test_single_gpu_refuses_several_processes():
    result = launch("--accelerate-config", "single_gpu", "--num-processes", "2", "--dry-run", gpus=1)
    assert result.returncode == 2
    assert "multi_gpu" in result.stderr


def test_missing_training_script_exits_2(tmp_path):
    missing = tmp_path / "nope.py"
    result = launch("--accelerate-config", "cpu", extra_env={"CR_ACCEL_TRAIN_SCRIPT": str(missing)})
    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_every_accelerate_config_is_valid_for_accelerate_launch():
    """Every file parses (unknown keys raise) and passes `accelerate launch`'s own checks."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == CONFIG_NAMES
    expected = {
        "cpu": (False, False, False),
        "single_gpu": (False, False, False),
        "multi_gpu": (True, False, False),
        "multi_node": (True, False, False),
        "fsdp": (False, True, False),
        "deepspeed": (False, False, True),
    }
    for name in CONFIG_NAMES:
        path = str(CONFIGS / f"{name}.yaml")
        config = load_config_from_file(path)
        # 'no' (quoted): the trainer's Accelerator(mixed_precision=...) decides precision.
        assert config.mixed_precision == "no", name
        cli = ["--config_file", path, "--num_processes", "2", "--main_process_ip", "10.0.0.1", "train.py"]
        if config.num_processes != -1:
            cli = ["--config_file", path, "train.py"]
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cli))
        assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == expected[name], name
        assert args.mixed_precision == "no", name


FAKE_TRAIN = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    value = torch.tensor([float(accelerator.process_index + 1)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)  # a real collective: sum over all ranks
    out = Path(sys.argv[1])
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "reduced_sum": value.item(),
        "argv": sys.argv[2:],
    }))
    accelerator.end_training()
    """
)


def test_real_two_process_cpu_run(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    out = tmp_path / "out dir"
    out.mkdir()
    passthrough = ["training.name=hello world", "a=b=c", "--overwrite"]
    result = launch(
        "--accelerate-config", "cpu", "--num-processes", "2", out, *passthrough,
        gpus=None, extra_env={"CR_ACCEL_TRAIN_SCRIPT": str(script)}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(reports) == 2, result.stderr[-3000:]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["world_size"] == 2
        assert report["distributed_type"] == "MULTI_CPU"
        assert report["reduced_sum"] == 3.0
        assert report["argv"] == passthrough


def test_slurm_example_is_valid_bash_and_matches_the_docs():
    script = ROOT / "scripts" / "slurm_example.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text
    assert "--resume_from_checkpoint latest" in text
    assert f"```bash\n{text}```" in (ROOT / "docs" / "slurm.md").read_text()


# ---------------------------------------------------------------- exit codes through the launcher

# Tiny and long: 16 samples, batch 8, 2 processes -> 1 optimizer step an epoch, a progress line each.
TINY_RUN = ["--config", ROOT / "configs" / "default.yaml", "data.num_train=16", "data.num_val=8", "data.batch_size=8",
            "model.base_channels=4", "training.log_every=1", "checkpoint.save_every=1000"]
REAL_RUN_TIMEOUT = 180  # seconds; a 2-process run takes 5-15 s on a busy 2-core machine


def start_launch(*args):
    """launch.sh running in its own session, stdout and stderr merged on proc.stdout."""
    from tests.runners import _drains

    env = {k: v for k, v in os.environ.items() if k not in OUTER_LAUNCHER_VARS}
    env.update(PYTHON=sys.executable, CR_ACCEL_NUM_GPUS="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(LAUNCH), *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _drains(proc)  # read from the start: a full pipe would stall the launcher
    return proc


@pytest.fixture
def launched():
    """Launchers started by a test; any still running at its end are killed with their workers (torchrun
    starts each worker in a session of its own, so killing the launcher's group would leave them running)."""
    import signal

    from tests.runners import child_pids

    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            for pid in child_pids(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_no_launcher_noise(output):
    for noise in ("Traceback", "ChildFailedError", "exitcode", "closing signal", "death signal"):
        assert noise not in output, f"{noise!r} shown:\n{output[-4000:]}"


# A sample of the bad-input table (tests/test_config.py, tests/test_preflight.py) through 2 processes: errors
# found before the Accelerator exists, after it (on every rank), by argparse, and in a user's data builder.
LAUNCHED_USER_ERRORS = {
    "corrupt checkpoint": (lambda tmp: ["--resume_from_checkpoint", _corrupt_checkpoint(tmp)],
                           lambda tmp: f"error: checkpoint `{tmp / 'ckpt'}`: the manifest is not valid JSON"),
    "unknown key": (lambda tmp: ["training.epoch=3"],
                    lambda tmp: "unknown key `training.epoch`; did you mean `training.epochs`?"),
    "preflight": (lambda tmp: ["data.image_size=30"], lambda tmp: "(`data.image_size=30`): set `model.depth=1`"),
    "data builder": (lambda tmp: ["data.name=tests.test_config:failing_data_builder", "~data.num_train",
                                  "~data.num_val"],
                     lambda tmp: "error: `data` could not be built: `tests.test_config:failing_data_builder()` "
                                 "raised FileNotFoundError: no shards under /data/missing"),
    "argparse": (lambda tmp: ["--epochs", "3"], lambda tmp: "train.py: error: unrecognized arguments: --epochs 3"),
    # found after the statistics pass's gather: only rank 1 reads the bad sample, both ranks refuse the run
    "normalize": (lambda tmp: ["data.name=tests.test_launch:synthetic_with_a_nan", "data.normalize=per_channel"],
                  lambda tmp: "error: data.normalize=per_channel: the training inputs hold non-finite values"),
}


def synthetic_with_a_nan(seed, num_train, num_val):
    """The default job's data with one NaN in the inputs of training sample 1 (read by rank 1 of 2)."""
    from cr_accel.data.synthetic import synthetic_cr

    splits = synthetic_cr(seed, num_train=num_train, num_val=num_val)
    splits.train.tensors[0][1, 0, 0, 0] = float("nan")
    return splits


def _corrupt_checkpoint(tmp):
    corrupt = tmp / "ckpt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    return corrupt


@pytest.mark.parametrize("case", sorted(LAUNCHED_USER_ERRORS))
def test_a_user_error_on_2_processes_exits_2_with_its_message_once(tmp_path, case):
    extra, expected = LAUNCHED_USER_ERRORS[case]
    run_dir = tmp_path / "run"
    result = launch("--num-processes", "2", *TINY_RUN, f"output.dir={run_dir}", *extra(tmp_path),
                    extra_env={"OMP_NUM_THREADS": "1"}, timeout=REAL_RUN_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert output.count(expected(tmp_path)) == 1, output[-4000:]
    assert len(re.findall(r"^(train\.py: )?error: ", output, re.M)) == 1, output[-4000:]  # once, not once per rank
    assert_no_launcher_noise(output)
    assert not run_dir.exists()


def wait_for_training(proc):
    from tests.runners import read_lines_until

    read_lines_until(proc, lambda line: re.match(r"epoch \d+ step \d+/\d+ loss ", line), timeout=REAL_RUN_TIMEOUT)


@pytest.mark.parametrize("target", ["launcher", "one worker"])
def test_a_preempted_2_process_run_exits_75(tmp_path, launched, target):
    """SIGTERM to launch.sh (what SLURM or `kill` does; torchrun's agent passes it on to the workers) or to
    one worker only (the other learns it through the trainer's all-reduce): both save `last/` and stop."""
    import signal

    from cr_accel import checkpoint
    from tests.runners import child_pids, finish

    run_dir = tmp_path / "run"
    proc = start_launch("--num-processes", "2", *TINY_RUN, "training.epochs=100000", f"output.dir={run_dir}")
    launched.append(proc)
    wait_for_training(proc)
    workers = sorted(child_pids(proc.pid))
    assert len(workers) == 2, workers
    os.kill(proc.pid if target == "launcher" else workers[1], signal.SIGTERM)
    output, _ = finish(proc, timeout=REAL_RUN_TIMEOUT)
    assert proc.returncode == 75, output[-4000:]
    assert_no_launcher_noise(output)
    checkpoint.verify(run_dir / "checkpoints" / "last")
    assert checkpoint.read_state(run_dir / "checkpoints" / "last")["trainer"]["world_size"] == 2


def test_launch_sh_prefers_the_project_venv(tmp_path):
    """Right after the quickstart, `python` on PATH is the system's (no accelerate): launch.sh must use .venv."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        pytest.skip("no .venv in this checkout (scripts/setup.sh makes it)")
    bare_path = str(tmp_path / "empty-bin") + ":/usr/bin:/bin"  # no venv on it
    env = {k: v for k, v in os.environ.items() if k not in OUTER_LAUNCHER_VARS and k != "PYTHON"}
    env.update(PATH=bare_path, CR_ACCEL_NUM_GPUS="0")
    words = shlex.split(subprocess.run([str(LAUNCH), "--dry-run", "--config", "c.yaml"], env=env, cwd=tmp_path,
                                       capture_output=True, text=True, check=True).stdout)
    assert words[:2] == [str(venv_python), str(LAUNCHER)]
    # A real one-process run from another folder: accelerate and cr_accel come from .venv.
    script = tmp_path / "which_python.py"
    script.write_text("import sys, accelerate; print('PYTHON', sys.executable); sys.exit(int(sys.argv[1]))\n")
    env.update(CR_ACCEL_TRAIN_SCRIPT=str(script))
    result = subprocess.run([str(LAUNCH), "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=REAL_RUN_TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]  # one process: accelerate would raise CalledProcessError
    assert f"PYTHON {venv_python}" in result.stdout
    assert "Traceback" not in result.stderr


def test_the_root_cause_decides_the_exit_code(tmp_path, monkeypatch):
    """The workers' records (written by `recorded`) decide; torchrun's own report only without records."""
    import subprocess as sp
    from types import SimpleNamespace

    from cr_accel.launch_exit import EXIT_DIR_ENV, exit_code, read_records, recorded

    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path))
    for rank, code in (("1", 75), ("0", 2)):
        monkeypatch.setenv("RANK", rank)
        assert recorded(lambda: code) == code
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SystemExit):
        recorded(lambda: sys.exit(None))
    (tmp_path / "rank9.json").write_text('{"half": ')  # ignored, not fatal
    records = read_records(tmp_path)
    assert [(rank, code) for _, rank, code in records] == [(1, 75), (0, 2), (2, 0)]
    failure = RuntimeError("the agent's report")
    assert exit_code(records, failure) == 75  # rank 1 exited first
    assert exit_code([(1.0, 1, 1), (2.0, 0, 2)], failure) == 1  # a crash first: a failure, whatever follows
    assert exit_code([(1.0, 0, 2), (2.0, 1, 1)], failure) == 2  # the peer failed because rank 0 had left
    assert exit_code([(1.0, 0, 0)], None) == 0
    assert exit_code([(1.0, 0, -15)], failure) == 1
    # No records (a script without `recorded`): torchrun's root cause, accelerate's one process, or nothing.
    child_failed = SimpleNamespace(get_first_failure=lambda: (1, SimpleNamespace(exitcode=75)))
    assert exit_code([], child_failed) == 75
    assert exit_code([], sp.CalledProcessError(2, ["python"])) == 2
    assert exit_code([], sp.CalledProcessError(-9, ["python"])) == 1
    assert exit_code([], KeyboardInterrupt()) == 1
    assert exit_code([], SystemExit(0)) == 0
