"""The `cr-accel` console script: --help and --version, unknown commands, `config show` and `config check`
(which writes nothing), run as a user would run them. (`cr-accel plot` has its own tests/test_plot.py, `evaluate`
and `predict` tests/test_evaluate.py.)"""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

import cr_accel

DEFAULT = "configs/default.yaml"


def _commands(out):
    """The runs every test below reads, started two at a time (each one mostly imports torch)."""
    return {
        "help": ["--help"],
        "version": ["--version"],
        "unknown": ["trian"],
        "nothing": [],
        "config_nothing": ["config"],
        "show": ["config", "show", "--config", DEFAULT, "training.epochs=7", "~model.depth", f"output.dir={out}"],
        "show_bad": ["config", "show", "--config", DEFAULT, "training.epochs=ten"],
        "check": ["config", "check", "--config", DEFAULT, "training.metrics=[psnr, {name: ssim, window: 7}]",
                  f"output.dir={out}"],
        "check_bad": ["config", "check", "--config", DEFAULT, "model.depth=6", f"output.dir={out}"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cr_accel_script, run_command):
    out = tmp_path_factory.mktemp("cli") / "run"
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_command, [cr_accel_script, *argv])
                   for name, argv in _commands(out).items()}
        results = {name: f.result() for name, f in futures.items()}
    results["out"] = out
    return results


def test_help_lists_every_command_with_one_line(runs):
    rc, stdout, stderr = runs["help"]
    assert rc == 0, stderr
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  (\w+) +(\S.*)$", stdout, re.M)}
    assert set(lines) == {"train", "config", "evaluate", "predict", "dashboard", "plot"}, stdout
    assert "--version" in stdout


def test_version(runs):
    rc, stdout, stderr = runs["version"]
    assert (rc, stdout) == (0, f"cr_accel {cr_accel.__version__}\n"), stderr


@pytest.mark.parametrize("name, message", [("unknown", r"error: unknown command `trian`; did you mean `train`\?"),
                                           ("nothing", r"error: no command given")])
def test_unknown_or_missing_command_exits_2_with_the_list(runs, name, message):
    rc, stdout, stderr = runs[name]
    assert rc == 2
    assert re.search(message, stderr), stderr
    assert all(f"  {c} " in stderr for c in ("train", "config", "evaluate", "predict", "dashboard", "plot")), stderr


def test_config_without_action_lists_show_and_check(runs):
    rc, _, stderr = runs["config_nothing"]
    assert rc == 2
    assert "  show " in stderr and "  check " in stderr, stderr


def test_config_show_prints_the_resolved_config(runs, repo_root):
    rc, stdout, stderr = runs["show"]
    assert rc == 0, stderr
    shown = yaml.safe_load(stdout)
    # Expected from the file itself, the two overrides, and the documented defaults of keys the file leaves out.
    expected = yaml.safe_load((repo_root / DEFAULT).read_text())
    expected["training"]["epochs"] = 7
    del expected["model"]["depth"]
    expected["output"]["dir"] = str(runs["out"])
    expected["optimizer"].update(lr=0.001, weight_decay=0.005)  # PyYAML reads the file's `1e-3` as a string
    assert shown["model"] == expected["model"]
    for section in ("loss", "data", "optimizer", "scheduler", "training", "checkpoint", "output", "dashboard"):
        assert expected[section].items() <= shown[section].items(), section
    assert shown["seed"] == 42
    assert shown["data"]["val_batch_size"] is None and shown["training"]["max_steps"] is None
    assert shown["checkpoint"]["async_save"] is True and shown["dashboard"]["token"] is None
    assert not runs["out"].exists()


def test_config_show_of_a_bad_config_exits_2_with_one_message(runs):
    rc, stdout, stderr = runs["show_bad"]
    assert rc == 2 and stdout == ""
    assert "`training.epochs` must be an integer, got `'ten'` (str)" in stderr
    assert "Traceback" not in stderr


def test_config_check_ok_writes_nothing(runs):
    rc, stdout, stderr = runs["check"]
    assert rc == 0, stderr
    assert stdout.count("\n") == 1 and stdout.startswith(f"config OK: {DEFAULT}: model conv_autoencoder"), stdout
    assert "one batch of each split ran through model, loss and metrics" in stdout
    assert "metrics [psnr, ssim];" in stdout, stdout  # an entry with options is named by its metric
    assert not runs["out"].exists()


def test_config_check_runs_the_preflight(runs):
    rc, stdout, stderr = runs["check_bad"]
    assert rc == 2 and stdout == ""
    assert "`model.depth=6` halves the images 6 times" in stderr
    assert "Traceback" not in stderr
    assert not runs["out"].exists()
