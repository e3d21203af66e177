"""metrics.csv across a resume: new columns widen the file, re-run epochs move aside, nothing is lost."""

import csv

from cr_accel.run_log import RecordsCSV


def read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_a_metric_that_appears_later_widens_the_file(tmp_path):
    path = tmp_path / "metrics.csv"
    first = RecordsCSV(path, enabled=True)
    first.append({"epoch": 1, "train_loss": 0.5})
    first.append({"epoch": 2, "train_loss": 0.25})
    resumed = RecordsCSV(path, enabled=True)  # a resumed run that logs one more metric
    resumed.append({"epoch": 3, "train_loss": 0.125, "val_psnr": 30.0})
    resumed.append({"epoch": 4, "train_loss": 0.0625, "val_psnr": 31.0})
    columns, rows = read(path)
    assert columns == ["epoch", "train_loss", "val_psnr"]
    assert [(r["epoch"], r["train_loss"], r["val_psnr"]) for r in rows] == [
        ("1", "0.5", ""), ("2", "0.25", ""), ("3", "0.125", "30.0"), ("4", "0.0625", "31.0")]


def test_keep_epochs_moves_later_rows_aside(tmp_path):
    path = tmp_path / "metrics.csv"
    log = RecordsCSV(path, enabled=True)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch})
    log.keep_through(1)
    log.append({"epoch": 2, "train_loss": 0.4})
    assert [r["epoch"] for r in read(path)[1]] == ["1", "2"]
    assert read(path)[1][1]["train_loss"] == "0.4"
    assert [r["epoch"] for r in read(tmp_path / "metrics.csv.superseded")[1]] == ["2", "3"]


def test_other_processes_write_nothing(tmp_path):
    RecordsCSV(tmp_path / "metrics.csv", enabled=False).append({"epoch": 1})
    assert not (tmp_path / "metrics.csv").exists()
