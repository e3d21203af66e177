"""Tests for cr_accel.config through the real command line: every shipped config validates, every bad
config or override fails with exit code 2 and a message naming the key and a hint before anything is
written, overrides keep their types, and the resolved config written next to a run reads back equal."""

import csv
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import accelerate
import pytest
import torch
import yaml

from cr_accel.config import Config, load_config, parse_yaml
from cr_accel.errors import ConfigError
from tests.forked_train import TrainServer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT = REPO_ROOT / "configs" / "default.yaml"
CONFIGS = sorted([*REPO_ROOT.glob("configs/*.yaml"), *REPO_ROOT.glob("configs/*.yml")])
TINY = ("training.epochs=1", "data.num_train=32", "data.num_val=16")


# ---------------------------------------------------------------------------------------------------------
# 1. Every shipped config validates.


@pytest.mark.parametrize("path", CONFIGS or [None], ids=lambda p: p.name if p else "configs-folder-empty")
def test_shipped_config_validates(path, monkeypatch):
    assert path is not None, f"no YAML files in {REPO_ROOT / 'configs'}; the shipped configs are untested"
    monkeypatch.chdir(REPO_ROOT)  # data paths in configs are relative to the repo root, as in train.py
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # validate the same way on every machine
    cfg = load_config(path)
    assert isinstance(cfg, Config)


# ---------------------------------------------------------------------------------------------------------
# 2. Bad configs through `python train.py`: exit 2, a specific message, no traceback, nothing created.

DROP = object()  # in a patch: remove this key from the default config


@dataclass
class Bad:
    id: str
    patterns: list  # regexes that must all match stderr
    patch: dict = None  # deep-merged into configs/default.yaml ("{tmp}" in values -> the case's folder)
    text: str = None  # raw file content instead of a patch
    overrides: list = field(default_factory=list)
    missing_file: bool = False  # pass --config of a file that does not exist
    raw_bytes: bytes = None  # the file's bytes, for encodings other than UTF-8
    folder: bool = False  # pass --config of a folder
    arguments: object = None  # case folder -> extra command-line arguments (after making what they point at)


BAD = [
    Bad("unknown_key_suggests_synonym", [r"unknown key `training\.lerning_rate`; did you mean `optimizer\.lr`\?"],
        patch={"training": {"lerning_rate": 0.01}}),
    Bad("unknown_section_suggests_section", [r"unknown key `trainig`; did you mean `training`\?"],
        patch={"trainig": {"epochs": 3}}),
    Bad("string_for_int", [r"`training\.epochs` must be an integer, got `'ten'` \(str\)"],
        patch={"training": {"epochs": "ten"}}),
    Bad("bool_for_int", [r"`data\.batch_size` must be an integer, got `True` \(bool\)"],
        patch={"data": {"batch_size": True}}),
    Bad("list_for_float", [r"`optimizer\.lr` must be a number, got `\[0\.001\]` \(list\)"],
        patch={"optimizer": {"lr": [0.001]}}),
    Bad("negative_lr", [r"`optimizer\.lr`: must be > 0, got -0\.001"], patch={"optimizer": {"lr": -0.001}}),
    Bad("warmup_ratio_one", [r"`scheduler\.warmup_ratio`: must be in \[0, 1\), got 1\.0"],
        patch={"scheduler": {"warmup_ratio": 1.0}}),
    Bad("warmup_ratio_negative", [r"`scheduler\.warmup_ratio`: must be in \[0, 1\), got -0\.1"],
        patch={"scheduler": {"warmup_ratio": -0.1}}),
    Bad("unknown_model", [r"`model\.name`: unknown model `unet`", r"(?i)choose one of: conv_autoencoder, mlp\b",
                          r"package\.module:Name"], patch={"model": {"name": "unet"}}),
    Bad("unknown_loss", [r"`loss\.name`: unknown loss `huber`", r"(?i)choose one of: cross_entropy, l1, mse, smooth_l1\b"],
        patch={"loss": {"name": "huber"}}),
    Bad("unknown_optimizer", [r"`optimizer\.name`: unknown optimizer `lbfgs`", r"(?i)choose one of: adam, adamw, sgd\b"],
        patch={"optimizer": {"name": "lbfgs"}}),
    Bad("unknown_scheduler", [r"`scheduler\.name`: unknown scheduler `cosin`; did you mean `cosine`\?",
                              r"(?i)choose one of: constant, cosine, cosine_restarts, linear, multistep, plateau, step\b"], patch={"scheduler": {"name": "cosin"}}),
    Bad("unknown_dataset", [r"`data\.name`: unknown dataset `mnist`", r"(?i)choose one of: hf_dataset, image_folder, synthetic_cr, tensor_files\b"],
        patch={"data": {"name": "mnist"}}),
    Bad("model_kwarg_not_in_signature",
        [r"`model\.base_chanels`: is not a parameter of `ConvAutoencoder`; did you mean `base_channels`\?",
         r"accepted: .*\bbase_channels\b"], patch={"model": {"base_chanels": 4}}),
    Bad("fp16_without_cuda", [r"`training\.mixed_precision`: is `fp16`", r"CUDA", r"use `bf16`"],
        patch={"training": {"mixed_precision": "fp16"}}),
    Bad("use_amp_false_with_bf16",
        [r"`training\.use_amp`: is false but training\.mixed_precision is `bf16`; set only one of them"],
        patch={"training": {"use_amp": False, "mixed_precision": "bf16"}}),
    Bad("tensor_files_missing_path", [r"`data\.path`: path `[^`]*missing\.npz` does not exist"],
        patch={"data": {"name": "tensor_files", "path": "{tmp}/missing.npz", "num_train": DROP, "num_val": DROP}}),
    Bad("override_without_equals", [r"override `training\.epochs5` must look like `section\.key=value`"],
        overrides=["training.epochs5"]),
    Bad("override_unknown_key", [r"unknown key `training\.epoch`; did you mean `training\.epochs`\?"],
        overrides=["training.epoch=3"]),
    Bad("override_too_deep", [r"override `model\.x\.y=3`: keys have the form `section\.key`"],
        overrides=["model.x.y=3"]),
    Bad("epochs_zero", [r"`training\.epochs`: must be >= 1, got 0"], patch={"training": {"epochs": 0}}),
    Bad("gradient_accumulation_zero", [r"`training\.gradient_accumulation_steps`: must be >= 1, got 0"],
        patch={"training": {"gradient_accumulation_steps": 0}}),
    Bad("config_file_missing", [r"config file `[^`]*no_such_config\.yaml` does not exist", r"--config"],
        missing_file=True),
    Bad("config_not_utf8", [r"config file `[^`]*config\.yaml` is not UTF-8 text \(byte 15: b'\\xff'\); save it as UTF-8"],
        raw_bytes=b"model:\n  name: \xff\xfe\n"),
    Bad("config_is_a_folder", [r"config file `[^`]*config\.yaml` is a folder; pass a YAML file"], folder=True),
    Bad("synonym_inside_a_part_section", [r"`optimizer\.learning_rate`: is not a parameter of `adamw`",
                                          r"did you mean `optimizer\.lr`\?"], overrides=["optimizer.learning_rate=1e-3"]),
    Bad("yaml_not_a_mapping", [r"config file `[^`]*config\.yaml` must hold a mapping of sections", r"not list"],
        text="- model\n- data\n"),
    Bad("yaml_syntax_error", [r"config file `[^`]*config\.yaml` is not valid YAML", r"line \d+"],
        text="model:\n  name: [conv_autoencoder\ndata:\n  batch_size: 32\n"),
    Bad("target_not_importable", [r"`model\.name`: cannot import module `no_such_pkg\.models` for `no_such_pkg\.models:Net`"],
        patch={"model": {"name": "no_such_pkg.models:Net"}}),
    Bad("target_attribute_missing", [r"`model\.name`: module `cr_accel\.models` has no attribute `NoSuchNet`"],
        patch={"model": {"name": "cr_accel.models:NoSuchNet"}}),
    # Three problems found by the same pass: all in one message.
    Bad("three_errors_together",
        [r"found 3 errors", r"unknown key `training\.lerning_rate`", r"`optimizer\.lr` must be a number, got `'fast'`",
         r"`data\.batch_size` must be an integer, got `0\.5` \(float\)"],
        patch={"training": {"lerning_rate": 0.1}, "optimizer": {"lr": "fast"}, "data": {"batch_size": 0.5}}),
    # Three problems of different kinds (a typo, an impossible value, an unknown name): the module promises
    # "every problem in a file is collected and reported together", so the user fixes them in one pass.
    Bad("three_errors_of_different_kinds_together",
        [r"found 3 errors", r"unknown key `training\.lerning_rate`", r"`optimizer\.lr`: must be > 0",
         r"`model\.name`: unknown model `conv_autoencodr`"],
        patch={"training": {"lerning_rate": 0.1}, "optimizer": {"lr": -0.1}, "model": {"name": "conv_autoencodr"}}),
    Bad("yaml_key_given_twice", [r"config file `[^`]*config\.yaml`: `epochs` is given twice in one mapping "
                                 r"\(lines 2 and 3\); keep one of them"],
        text="training:\n  epochs: 2\n  epochs: 3\n"),
    Bad("config_file_empty", [r"config file `[^`]*config\.yaml` is empty \(or holds only comments\)",
                              r"configs/default\.yaml"], text="# nothing here yet\n"),
    Bad("metric_listed_twice", [r"`training\.metrics\[1\]`: `psnr` is listed twice; list each metric once"],
        overrides=["training.metrics=[psnr, psnr]"]),
    Bad("metric_listed_twice_via_a_mapping",
        [r"`training\.metrics\[1\]`: `psnr` is listed twice; list each metric once"],
        patch={"training": {"metrics": ["psnr", {"name": "psnr", "data_range": 2.0}]}}),
    Bad("metric_unknown_option", [r"`training\.metrics\[0\]\.gain`: is not a parameter of `psnr` "
                                  r"\(accepted: data_range\)"],
        overrides=["training.metrics=[{name: psnr, gain: 2}]"]),
    Bad("metric_option_misspelt", [r"`training\.metrics\[1\]\.windw`: is not a parameter of `ssim`; did you mean "
                                   r"`window`\? \(accepted: data_range, window, sigma\)"],
        overrides=["training.metrics=[psnr, {name: ssim, windw: 7}]"]),
    Bad("overwrite_and_resume_together", [r"--overwrite replaces an earlier run and --resume_from_checkpoint "
                                          r"continues one; pass one of them"],
        overrides=["--overwrite", "--resume_from_checkpoint", "latest"]),
    Bad("resume_from_a_folder_without_manifest",
        [r"checkpoint `[^`]*not_a_checkpoint` has no manifest\.json: it is incomplete or not a cr_accel checkpoint"],
        arguments=lambda case_dir: ["--resume_from_checkpoint", _folder(case_dir / "not_a_checkpoint")]),
    Bad("model_is_not_a_module", [r"`model\.name=collections:OrderedDict` returned `OrderedDict`, not a "
                                  r"torch\.nn\.Module"],
        overrides=["model.name=collections:OrderedDict", "~model.in_channels", "~model.out_channels",
                   "~model.base_channels", "~model.depth"]),
    Bad("data_builder_raises", [r"`data` could not be built: `tests\.test_config:failing_data_builder\(\)` raised "
                                r"FileNotFoundError: no shards under /data/missing \(in test_config\.py:\d+, "
                                r"failing_data_builder\)"],
        overrides=["data.name=tests.test_config:failing_data_builder", "~data.num_train", "~data.num_val"]),
    Bad("schedule_builder_raises", [r"`scheduler` could not be built: `tests\.test_config:failing_schedule\(\)` "
                                    r"raised ValueError: warm-up longer than the run"],
        overrides=["scheduler.name=tests.test_config:failing_schedule"]),
]


def failing_data_builder(seed):
    """A user's dataset builder whose files are not there."""
    raise FileNotFoundError("no shards under /data/missing")


def failing_schedule(num_training_steps, num_warmup_steps, min_lr_ratio):
    """A user's LR schedule that refuses the run's length."""
    raise ValueError("warm-up longer than the run")


def _folder(path):
    path.mkdir()
    return path


def _merge(base, patch):
    out = dict(base)
    for key, value in patch.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _run_bad(case, case_dir, run_train):
    case_dir.mkdir(parents=True)
    config = case_dir / ("no_such_config.yaml" if case.missing_file else "config.yaml")
    if case.folder:
        config.mkdir()  # a folder where the file should be
    elif case.raw_bytes is not None:
        config.write_bytes(case.raw_bytes)
    elif case.text is not None:
        config.write_text(case.text)
    elif not case.missing_file:
        merged = _merge(parse_yaml(DEFAULT.read_text()), case.patch or {})
        config.write_text(yaml.safe_dump(merged, sort_keys=False).replace("{tmp}", str(case_dir)))
    out_dir = case_dir / "out"
    arguments = case.arguments(case_dir) if case.arguments else []
    rc, stdout, stderr = run_train("--config", config, f"output.dir={out_dir}", *case.overrides, *arguments,
                                   timeout=60)
    return rc, stdout, stderr, out_dir, case_dir


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """All BAD cases run once, a few at a time, each `train.py` in a process forked from one that has imported
    torch (`tests/forked_train.py`: most of a refused run's 1.6 s would be that import)."""
    root = tmp_path_factory.mktemp("bad_configs")
    with TrainServer() as server, ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        futures = {c.id: pool.submit(_run_bad, c, root / c.id, server.run) for c in BAD}
        return {key: future.result() for key, future in futures.items()}


def test_bad_table_is_big_enough():
    assert len(BAD) >= 40 and len({c.id for c in BAD}) == len(BAD)


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_config_exits_2_with_specific_message(case, bad_runs):
    rc, stdout, stderr, out_dir, case_dir = bad_runs[case.id]
    shown = f"\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}"
    assert rc == 2, f"exit code {rc}, expected 2{shown}"
    assert "Traceback" not in stderr, f"a user error printed a traceback{shown}"
    assert stderr.startswith("error: "), f"the message should start with `error: `{shown}"
    for pattern in case.patterns:
        assert re.search(pattern, stderr), f"stderr does not match /{pattern}/{shown}"
    assert not out_dir.exists(), f"a refused config created {out_dir}: {sorted(p.name for p in out_dir.iterdir())}"
    made = sorted(p.name for p in case_dir.iterdir() if p.name != "not_a_checkpoint")
    assert made in ([], ["config.yaml"]), f"the refused run left files beside its config: {made}"


# ---------------------------------------------------------------------------------------------------------
# 3. Overrides keep their types; `1e-3` is a float, a quoted "1e-3" is a string and refused.


def test_overrides_change_config_with_types(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    base = load_config(DEFAULT)
    cfg = load_config(DEFAULT, ["training.epochs=5", "optimizer.lr=3e-4", "model.base_channels=4"])
    assert type(cfg.training.epochs) is int and cfg.training.epochs == 5
    assert type(cfg.optimizer.lr) is float and cfg.optimizer.lr == 3e-4
    assert type(cfg.model.kwargs["base_channels"]) is int and cfg.model.kwargs["base_channels"] == 4
    # Nothing else moved.
    changed = {(s, k) for s, sec in cfg.to_dict().items() if isinstance(sec, dict)
               for k, v in sec.items() if base.to_dict()[s].get(k) != v}
    assert changed == {("training", "epochs"), ("optimizer", "lr"), ("model", "base_channels")}


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E-3", 1e-3), ("3e-4", 3e-4), ("-2e-5", -2e-5),
                                          ("1.0e-3", 1e-3), ("5e+2", 500.0), ("0.001", 1e-3)])
def test_scientific_notation_in_yaml_is_float(text, value):
    loaded = parse_yaml(f"lr: {text}")["lr"]
    assert type(loaded) is float and loaded == value


def test_unquoted_1e_3_in_file_loads_as_float(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\nscheduler:\n  min_lr_ratio: 1e-2\n")
    cfg = load_config(path)
    assert type(cfg.optimizer.lr) is float and cfg.optimizer.lr == 1e-3
    assert type(cfg.scheduler.min_lr_ratio) is float and cfg.scheduler.min_lr_ratio == 1e-2


def test_quoted_1e_3_is_refused_as_string(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    path = tmp_path / "c.yaml"
    path.write_text('optimizer:\n  lr: "1e-3"\n')
    with pytest.raises(ConfigError, match=r"`optimizer\.lr` must be a number, got `'1e-3'` \(str\)"):
        load_config(path)



@pytest.mark.parametrize("data, pattern", [
    ({"persistent_workers": True}, r"`data\.persistent_workers`: needs data\.num_workers > 0 .*got num_workers 0"),
    ({"prefetch_factor": 4}, r"`data\.prefetch_factor`: needs data\.num_workers > 0 .*leave it null without workers"),
    ({"num_workers": 2, "prefetch_factor": 0}, r"`data\.prefetch_factor`: must be >= 1 or null"),
    ({"pin_memory": "yes"}, r"`data\.pin_memory` must be a boolean or null|`data\.pin_memory` must be"),
], ids=["persistent_without_workers", "prefetch_without_workers", "prefetch_zero", "pin_memory_string"])
def test_loader_keys_need_workers(data, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)


def test_loader_keys_with_workers_resolve(tmp_path, monkeypatch):
    from cr_accel.validation import loader_options

    monkeypatch.chdir(REPO_ROOT)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 3}}))
    d = load_config(path).data
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    from cr_accel.validation import yield_to_training

    assert loader_options(d, cpu) == {"num_workers": 2, "pin_memory": False, "persistent_workers": True,
                                      "prefetch_factor": 3, "worker_init_fn": yield_to_training}
    assert loader_options(d, cuda)["pin_memory"] is True  # null: on for CUDA
    d.pin_memory = False
    assert loader_options(d, cuda)["pin_memory"] is False  # as given
    d.num_workers, d.persistent_workers, d.prefetch_factor = 0, False, None
    assert loader_options(d, cpu) == {"num_workers": 0, "pin_memory": False}  # torch refuses worker keys without


# ---------------------------------------------------------------------------------------------------------
# 4-6. Real runs: the resolved config and environment in the run folder; --overwrite; the console script.


def _data_rows(metrics_csv):
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_resolved_config_that_round_trips(tmp_path, run_train, monkeypatch):
    out = tmp_path / "run"
    overrides = [*TINY, f"output.dir={out}"]
    rc, stdout, stderr = run_train("--config", DEFAULT, *overrides)
    assert rc == 0, stderr
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    expected = load_config(DEFAULT, overrides)
    written = (out / "config.yaml").read_text()
    assert parse_yaml(written) == expected.to_dict()  # the file is the whole resolved config
    assert load_config(out / "config.yaml").to_dict() == expected.to_dict()  # and reads back equal

    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 1
    assert env["device"] == "cpu"
    assert env["mixed_precision"] == "no"  # use_amp: true is `auto`, which is fp32 on CPU
    assert env["torch"] == torch.__version__
    assert env["accelerate"] == accelerate.__version__
    assert len(_data_rows(out / "metrics.csv")) == 1


def test_second_run_needs_overwrite(tmp_path, run_train):
    out = tmp_path / "run"
    rc, _, stderr = run_train("--config", DEFAULT, *TINY, f"output.dir={out}")
    assert rc == 0, stderr
    before = {name: (out / name).read_bytes() for name in ("metrics.csv", "config.yaml", "environment.json")}

    rc, _, stderr = run_train("--config", DEFAULT, *TINY, "optimizer.lr=5e-4", f"output.dir={out}")
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    assert re.search(rf"output\.dir `{re.escape(str(out))}` already holds a run", stderr), stderr
    assert "--overwrite" in stderr, stderr
    after = {name: (out / name).read_bytes() for name in before}
    assert after == before, "a refused run changed the earlier run's files"

    rc, _, stderr = run_train("--config", DEFAULT, "--overwrite", *TINY, "optimizer.lr=5e-4", f"output.dir={out}")
    assert rc == 0, stderr
    assert parse_yaml((out / "config.yaml").read_text())["optimizer"]["lr"] == 5e-4
    assert len(_data_rows(out / "metrics.csv")) == 1  # replaced, not appended to


def test_console_script_trains(tmp_path, run_command, cr_accel_script):
    out = tmp_path / "run"
    rc, _, stderr = run_command([cr_accel_script, "train", "--config", "configs/default.yaml", *TINY,
                                 f"output.dir={out}"])
    assert rc == 0, stderr
    rows = _data_rows(out / "metrics.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == "1"


@pytest.mark.parametrize("argv", [[], ["trian"]], ids=["no-args", "unknown-command"])
def test_console_script_without_command_prints_usage(argv, run_command, cr_accel_script):
    rc, stdout, stderr = run_command([cr_accel_script, *argv], timeout=60)
    assert rc == 2
    assert re.search(r"usage: cr-accel \{?train", stderr), stderr
    assert "Traceback" not in stderr
