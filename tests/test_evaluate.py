"""The test split, its score at the end of training (test_metrics.json) and `cr-accel evaluate`.

The splits: disjoint, reproducible from the seed, and adding a test split leaves train (synthetic_cr) and
validation as they were. The scores: the same numbers validation computes, checked exactly against the
`val_*` row of metrics.csv and against test_metrics.json.
"""

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cr_accel.callbacks.checkpointing import CheckpointPolicy
from cr_accel.checkpoint import read_state
from cr_accel.data import synthetic_cr, tensor_files
from cr_accel.errors import UserError
from tests.runners import launch_2_cpu_processes, metric_rows, small_config_file

# ---------------------------------------------------------------------------------------------------------
# The test split


def _rows(dataset):
    """The samples of a TensorDataset as a set of byte strings (inputs and targets together)."""
    inputs, targets = dataset.tensors
    return {x.numpy().tobytes() + y.numpy().tobytes() for x, y in zip(inputs, targets)}


def _ids(dataset):
    return sorted(int(x[0]) for x in dataset.tensors[0])


def _numbered(path, n):
    """n samples whose first input value is the sample's index, so each set can be read back as indices."""
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1).repeat(1, 3)
    np.savez(path, inputs=inputs.numpy(), targets=(inputs * 2).numpy())
    return path


def test_synthetic_test_split_is_its_own_stream():
    plain = synthetic_cr(seed=3, num_train=16, num_val=8)
    with_test = synthetic_cr(seed=3, num_train=16, num_val=8, num_test=6)
    assert plain.test is None and plain.metadata["num_test"] == 0
    for split in ("train", "val"):  # adding a test split changes neither
        for a, b in zip(getattr(plain, split).tensors, getattr(with_test, split).tensors):
            assert torch.equal(a, b)
    assert len(with_test.test) == with_test.metadata["num_test"] == 6
    assert not _rows(with_test.test) & (_rows(with_test.train) | _rows(with_test.val))
    again = synthetic_cr(seed=3, num_train=4, num_val=2, num_test=6)  # other sizes: the same test set
    assert all(torch.equal(a, b) for a, b in zip(with_test.test.tensors, again.test.tensors))
    other_seed = synthetic_cr(seed=4, num_train=4, num_val=2, num_test=6)
    assert not torch.equal(with_test.test.tensors[0], other_seed.test.tensors[0])


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_synthetic_num_test_must_be_a_count(value):
    with pytest.raises(UserError, match=r"data\.num_test must be an integer >= 0"):
        synthetic_cr(seed=0, num_train=4, num_val=2, num_test=value)


def test_tensor_files_test_ratio_partitions_the_data_and_keeps_validation(tmp_path):
    path = _numbered(tmp_path / "d.npz", 50)
    splits = tensor_files(seed=5, path=str(path), val_ratio=0.2, test_ratio=0.1)
    train, val, test = _ids(splits.train), _ids(splits.val), _ids(splits.test)
    assert (len(train), len(val), len(test)) == (35, 10, 5)
    assert sorted(train + val + test) == list(range(50))  # disjoint, and nothing lost
    assert _ids(tensor_files(seed=5, path=str(path), val_ratio=0.2).val) == val  # validation as without a test set
    assert _ids(tensor_files(seed=5, path=str(path), val_ratio=0.2, test_ratio=0.1).test) == test  # reproducible
    assert _ids(tensor_files(seed=6, path=str(path), val_ratio=0.2, test_ratio=0.1).test) != test
    meta = splits.metadata
    assert (meta["num_train"], meta["num_val"], meta["num_test"]) == (35, 10, 5)
    assert meta["source"]["test_split"] == {"test_ratio": 0.1, "seed": 5}
    assert tensor_files(seed=5, path=str(path)).test is None


def test_tensor_files_test_path_and_test_ratio_beside_a_val_path(tmp_path):
    train, other = _numbered(tmp_path / "t.npz", 20), _numbered(tmp_path / "o.npz", 7)
    from_file = tensor_files(seed=0, path=str(train), val_ratio=0.25, test_path=str(other))
    assert (len(from_file.train), len(from_file.val), len(from_file.test)) == (15, 5, 7)
    assert from_file.metadata["source"]["test_split"] == "test_path"
    assert from_file.metadata["source"]["test"] == [str(other.resolve())]
    held = tensor_files(seed=0, path=str(train), val_path=str(other), test_ratio=0.25)
    assert (len(held.train), len(held.val), len(held.test)) == (15, 7, 5)
    assert sorted(_ids(held.train) + _ids(held.test)) == list(range(20))


@pytest.mark.parametrize("kwargs, message", [
    ({"val_ratio": 0.5, "test_ratio": 0.5}, r"data\.val_ratio=0\.5 and data\.test_ratio=0\.5 together hold out 1 of"),
    ({"val_ratio": 0.7, "test_ratio": 0.4}, r"together hold out 1\.1 of the samples, leaving none to train on"),
    ({"test_ratio": 0}, r"data\.test_ratio must be a number strictly between 0 and 1, got 0"),
    ({"test_ratio": -0.1, "val_ratio": 2}, r"data\.val_ratio must be .* got 2; .*data\.test_ratio must be .* got -0\.1"),
    ({"test_ratio": 0.1, "test_path": "TEST"}, r"data\.test_path and data\.test_ratio are both set"),
    ({"test_ratio": 0.01}, r"with data\.val_ratio=0\.1 and data\.test_ratio=0\.01 leaves the test set empty"),
])
def test_tensor_files_bad_split_is_one_user_error(tmp_path, kwargs, message):
    path = _numbered(tmp_path / "d.npz", 20)
    kwargs = {k: str(path) if v == "TEST" else v for k, v in kwargs.items()}
    with pytest.raises(UserError, match=message):
        tensor_files(seed=0, path=str(path), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# A tiny trained run with a test split and an EMA, read by every test below (which only add eval_*.json files)

EPOCHS = 3
RUN_SECTIONS = {
    "model": {"base_channels": 4},
    # 12 validation samples in batches of 8 and 10 test samples: the last batch of each is a partial one
    "data": {"num_train": 32, "num_val": 12, "num_test": 10, "batch_size": 8, "image_size": 16},
    "training": {"epochs": EPOCHS, "log_every": 1, "ema_decay": 0.5},
    "checkpoint": {"save_every": 1, "keep_last_n": None},
    "output": {"samples_every": 0, "histograms_every": 0},
    "dashboard": {"enabled": False},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_train):
    folder = tmp_path_factory.mktemp("evaluate")
    config = small_config_file(folder, "tiny.yaml", **RUN_SECTIONS)
    rc, _, stderr = run_train("--config", config, f"output.dir={folder / 'run'}", timeout=300)
    assert rc == 0, stderr
    return folder / "run"


def _commands(run_command, commands):
    """{name: (rc, stdout, stderr)} of `commands` ({name: argv}), two at a time (each one mostly imports torch)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_command, argv, 180) for name, argv in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def _json_line(stdout):
    """The one JSON object a command printed on stdout."""
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def _one_line_error(rc, stdout, stderr, pattern):
    assert rc == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def evaluated(run, run_command, cr_accel_script):
    """The evaluate commands the tests below read, run once."""
    first_step = next(r for r in metric_rows(run) if r["epoch"] == "1")["step"]
    return _commands(run_command, {
        "test": [cr_accel_script, "evaluate", run, "--split", "test"],
        "best": [cr_accel_script, "evaluate", run],
        "last": [cr_accel_script, "evaluate", run, "--checkpoint", "last"],
        "first": [cr_accel_script, "evaluate", run, "--checkpoint", f"step_{int(first_step):08d}"],
        "by_path": [cr_accel_script, "evaluate", run, "--checkpoint", run / "checkpoints" / "last", "--split", "test"],
    })


def test_the_test_split_is_scored_once_at_the_end_with_the_best_checkpoint(run, evaluated):
    record = json.loads((run / "test_metrics.json").read_text())
    best_step = read_state(run / "checkpoints" / "best")["trainer"]["global_step"]
    assert (record["checkpoint"], record["global_step"]) == ("best", best_step)
    assert set(record["metrics"]) == {"test_loss", "test_psnr"}
    rc, stdout, stderr = evaluated["test"]
    assert rc == 0, stderr
    assert _json_line(stdout) == record["metrics"]  # exactly: the same weights, batches and sums
    log = (run / "train.log").read_text()
    assert log.count("test split (10 samples) scored with the best weights") == 1


def test_evaluate_gives_the_validation_numbers_of_metrics_csv(run, evaluated):
    rows = {int(r["step"]): r for r in metric_rows(run)}
    for name, folder in (("best", "best"), ("last", "last"), ("first", None)):
        rc, stdout, stderr = evaluated[name]
        assert rc == 0, stderr
        metrics = _json_line(stdout)
        assert set(metrics) == {"val_loss", "val_psnr"}
        written = sorted(run.glob(f"eval_val_{folder or 'step_'}*.json"))
        assert len(written) == 1, written
        record = json.loads(written[0].read_text())
        assert (record["split"], record["metrics"]) == ("val", metrics)
        step = read_state(run / "checkpoints" / record["checkpoint"])["trainer"]["global_step"]
        assert record["global_step"] == step
        row = rows[step]
        # The EMA weights, as validation measured them; repr in the CSV is exact.
        assert metrics == {"val_loss": float(row["val_loss"]), "val_psnr": float(row["val_psnr"])}, name
    assert _json_line(evaluated["by_path"][1]) == json.loads((run / "eval_test_last.json").read_text())["metrics"]


def _in_process(capsys, *argv):
    """`cr-accel ARGV` run in this process (no torch import to wait for): (exit code, stdout, stderr)."""
    from cr_accel.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_user_errors_are_one_line_and_exit_2(run, run_command, cr_accel_script, tmp_path, capsys):
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.yaml").write_text((run / "config.yaml").read_text())
    # Through the console script once: the exit code and stderr of a real process, no traceback.
    _one_line_error(*run_command([cr_accel_script, "evaluate", tmp_path / "missing"]),
                    r"^error: run folder `.*missing` does not exist")
    cases = [
        ((tmp_path,), r"holds no config\.yaml, so it is not a run's output\.dir"),
        ((tmp_path / "untrained",), r"has no complete best/ or last/ checkpoint \(no checkpoints/ folder"),
        ((run, "--checkpoint", "step_99999999"), r"--checkpoint `step_99999999` does not exist"),
        ((run, "--split", "test", "data.num_test=0"), r"has no test split; .*data\.num_test=64 \(synthetic_cr\)"),
        ((run, "data.num_tset=3"), r"`data\.num_tset`: is not a parameter of `synthetic_cr`"),
    ]
    for args, pattern in cases:
        _one_line_error(*_in_process(capsys, "evaluate", *args), pattern)
    # A bad test split is refused before anything runs.
    _one_line_error(*_in_process(capsys, "train", "--config", "configs/default.yaml", "data.num_test=-2",
                                 f"output.dir={tmp_path / 'never'}"),
                    r"^error: .*data\.num_test must be an integer >= 0, got -2")
    assert not (tmp_path / "never").exists()


class _NoBest(CheckpointPolicy):
    """A run's own policy that never writes best/."""

    def targets_after_epoch(self, trainer, epoch_number, finishing):
        return [t for t in super().targets_after_epoch(trainer, epoch_number, finishing) if t != "best"]

    def targets_after_step(self, trainer):
        return []


def test_without_best_the_final_weights_are_scored_and_only_after_a_finished_run(tmp_path):
    """No best/ checkpoint: the final weights (their EMA) are scored, as evaluate scores last/; a preempted or
    failed run scores nothing."""
    from cr_accel.callbacks.final_score import FinalTestScore
    from cr_accel.config import config_from_dict
    from cr_accel.evaluate import evaluate
    from cr_accel.trainer import Trainer

    raw = {name: dict(values) for name, values in RUN_SECTIONS.items()}
    raw["training"].update(epochs=1, ema_decay=0.9)
    raw["output"].update(dir=str(tmp_path / "run"))
    trainer = Trainer(config_from_dict(raw), callbacks=[_NoBest()])
    raw_weights = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.train() == "finished"
    assert not (tmp_path / "run" / "checkpoints" / "best").exists()
    record = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert (record["checkpoint"], record["global_step"]) == ("last", trainer.global_step)
    assert record["metrics"] == evaluate(str(tmp_path / "run"), "last", "test")
    assert not all(torch.equal(a, b) for a, b in zip(raw_weights, trainer.model.parameters()))  # it trained
    final = [p.detach().clone() for p in trainer.model.parameters()]
    (tmp_path / "run" / "test_metrics.json").unlink()
    for status in ("preempted", "failed"):
        FinalTestScore().on_train_end(trainer, status)
    assert not (tmp_path / "run" / "test_metrics.json").exists()
    FinalTestScore().on_train_end(trainer, "stopped_early")
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text()) == record
    assert all(torch.equal(a, b) for a, b in zip(final, trainer.model.parameters()))  # the raw weights are back


def test_evaluate_under_accelerate_launch_counts_each_sample_once(run, evaluated, cr_accel_script):
    """2 processes: 10 test samples in batches of 8 are 1 batch per process, the second one padded with
    samples from the start; the means are those of one process up to the order of the sums."""
    (run / "eval_test_best.json").unlink()
    result = launch_2_cpu_processes(cr_accel_script, "evaluate", run, "--split", "test")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _json_line(result.stdout)  # printed by the main process only
    assert metrics == pytest.approx(_json_line(evaluated["test"][1]), rel=1e-6)
    assert (run / "eval_test_best.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# cr-accel predict

def _outputs(path):
    """The `outputs` tensor of a .npz, .safetensors or .pt file."""
    from cr_accel.data.files import read_tensor

    return read_tensor(path, "outputs", "the key")


@pytest.fixture(scope="module")
def inputs(run):
    """12 inputs of the run's shape: in batches of 4, 3 batches, so 2 processes get 2 and 1 + padding."""
    x = torch.rand((12, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    folder = run.parent / "inputs"
    folder.mkdir()
    np.savez(folder / "x.npz", inputs=x.numpy(), targets=x.numpy())  # other tensors in the file are ignored
    torch.save({"images": x.double()}, folder / "x64.pt")  # float64: cast to the run's float32
    np.savez(folder / "small.npz", inputs=np.zeros((3, 1, 8, 8), np.float32))
    return x, folder


def test_predict_writes_the_models_outputs_in_order(run, inputs, run_command, cr_accel_script):
    import cr_accel

    x, folder = inputs
    out = run.parent / "predictions"
    results = _commands(run_command, {
        "npz": [cr_accel_script, "predict", run, "--input", folder / "x.npz", "--output", out / "p.npz",
                "--batch-size", "4"],
        "pt_in": [cr_accel_script, "predict", run, "--input", folder / "x64.pt", "--input-key", "images",
                  "--output", out / "p.safetensors", "--batch-size", "4"],
    })
    for rc, stdout, stderr in results.values():
        assert rc == 0, stderr
        assert "wrote 12 outputs of shape [1, 16, 16] to " in stdout, stdout
    model = cr_accel.load_model(run)  # best/, with its EMA weights
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the commands ran (OMP_NUM_THREADS=1)
    try:
        with torch.no_grad():
            expected = torch.cat([model(batch) for batch in x.split(4)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_outputs(out / "p.npz"), expected)
    assert torch.equal(_outputs(out / "p.safetensors"), expected)


def test_predict_under_accelerate_launch_writes_the_same_file(run, inputs, run_command, cr_accel_script):
    _, folder = inputs
    one, two = run.parent / "one.npz", run.parent / "two.npz"
    rc, _, stderr = run_command([cr_accel_script, "predict", run, "--input", folder / "x.npz", "--output", one,
                                 "--batch-size", "4"])
    assert rc == 0, stderr
    result = launch_2_cpu_processes(cr_accel_script, "predict", run, "--input", folder / "x.npz", "--output", two,
                                    "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 12 outputs") == 1, result.stdout  # the main process writes and says so
    assert two.read_bytes() == one.read_bytes()  # every sample once, in order, the padding batch dropped


def test_predict_user_errors_are_one_line_and_exit_2(run, inputs, run_command, cr_accel_script, capsys):
    _, folder = inputs
    taken = run.parent / "taken.pt"
    taken.write_bytes(b"keep me")
    x = folder / "x.npz"
    _one_line_error(*run_command([cr_accel_script, "predict", run, "--input", x, "--output", taken]),
                    r"^error: --output `.*taken\.pt` already exists; remove it first")
    cases = [
        ((folder / "small.npz", "--output", run.parent / "s.npz"), r"`inputs` in `.*small\.npz` has shape "
         r"\[3, 1, 8, 8\], samples of shape \[1, 8, 8\], but the model of `.*` takes samples of shape \[1, 16, 16\]"),
        ((x, "--input-key", "x", "--output", run.parent / "k.npz"),
         r"has no `x` tensor \(keys present: inputs, targets\); set --input-key"),
        ((x, "--output", run.parent / "p.csv"), r"--output `.*p\.csv` has extension `\.csv`"),
    ]
    for args, pattern in cases:
        _one_line_error(*_in_process(capsys, "predict", run, "--input", *args), pattern)
    assert taken.read_bytes() == b"keep me"
    assert not any((run.parent / name).exists() for name in ("s.npz", "k.npz", "p.csv"))


def test_overwrite_removes_the_scores_of_the_earlier_run(tmp_path):
    from cr_accel.cli import _earlier_run
    from cr_accel.config import config_from_dict

    cfg = config_from_dict({"output": {"dir": str(tmp_path)}})
    for name in ("test_metrics.json", "eval_val_best.json", "eval_test_step_00000004.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(UserError, match=r"already holds a run \(test_metrics\.json, eval_test_step_00000004\.json, "
                                        r"eval_val_best\.json\)"):
        _earlier_run(cfg, overwrite=False)
    assert {p.name for p in _earlier_run(cfg, overwrite=True)} == {
        "test_metrics.json", "eval_val_best.json", "eval_test_step_00000004.json"}
