"""`cr-accel plot RUN_DIR [RUN_DIR ...] [--out curves.png]`: a run's curves, several runs overlaid, in one PNG.

Reads what a run folder already holds -- `metrics.csv` (a row per epoch) and, where the run wrote one,
`steps.csv` (a row every `training.log_every` optimizer steps) -- and draws against the optimizer step: the
training loss (from steps.csv when present, else per epoch) with the validation loss, the learning rate, and
one panel per validation metric (`val_<name>` columns). Empty cells are missing values (an epoch without
validation, a metric added later); `nan` cells are values that cannot be drawn; both are left out. A step
written twice (a resumed run that re-ran it) keeps its later row.

matplotlib is an optional extra (`pip install 'cr_accel[plot]'`); the figure is drawn on matplotlib's Agg
canvas, never a window, so it works over ssh and in CI.
"""

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

DEFAULT_OUT = "curves.png"
METRICS_FILE, STEPS_FILE = "metrics.csv", "steps.csv"
NEEDED = {METRICS_FILE: ("step", "train_loss"), STEPS_FILE: ("step", "loss")}  # columns without which nothing fits
INSTALL = "pip install 'cr_accel[plot]'"


@dataclass
class Series:
    """Points of one curve: optimizer steps and values, the missing and non-finite ones left out."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class RunCurves:
    label: str
    train_loss: Series
    step_level: bool  # the training loss comes from steps.csv
    val_loss: Series
    lr: Series
    metrics: dict[str, Series]  # column (`val_psnr`) -> series


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        figure_class = _figure_class()
        runs = read_runs(args.runs)
        out = write(draw(runs, figure_class), Path(args.out))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cr-accel plot",
        description="Draw the training and validation loss, the learning rate and every validation metric of "
                    "one or more run folders against the optimizer step, into one PNG (runs overlaid).",
        epilog="example: %(prog)s runs/default runs/lr3e-4 --out compare.png")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output.dir, holding metrics.csv "
                   "(and steps.csv, when the run wrote one)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="PNG",
                   help=f"the image to write (default: {DEFAULT_OUT} in the current folder)")
    return p


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"cr-accel plot needs matplotlib, which is not installed: {INSTALL}") from None
    return Figure


# ---------------------------------------------------------------- reading run folders


def read_runs(folders: Sequence[str]) -> list[RunCurves]:
    """The curves of each run folder, labelled by the folder's name (its path as given where two names clash)."""
    names = [Path(f).resolve().name for f in folders]
    return [read_run(Path(f), f if names.count(name) > 1 else name) for f, name in zip(folders, names)]


def read_run(folder: Path, label: str) -> RunCurves:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"run folder `{folder}` {what}; give the output.dir of a run")
    if not (folder / METRICS_FILE).is_file():
        raise UserError(f"`{folder / METRICS_FILE}` does not exist: `{folder}` is not a run folder, or its run has "
                        "not finished an epoch yet")
    epochs = Table.read(folder / METRICS_FILE)
    steps = Table.read(folder / STEPS_FILE) if (folder / STEPS_FILE).is_file() else None
    if steps is not None:  # step-level values: finer than one point per epoch
        train_loss = steps.series("loss")
        lr = steps.series("lr") if "lr" in steps.columns else epochs.series("lr")
    else:
        train_loss, lr = epochs.series("train_loss"), epochs.series("lr")
    metrics = {c: epochs.series(c) for c in epochs.columns if c.startswith("val_") and c != "val_loss"}
    return RunCurves(label, train_loss, steps is not None, epochs.series("val_loss"), lr, metrics)


@dataclass
class Table:
    """A CSV file of a run: its columns and rows of text cells."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]

    @classmethod
    def read(cls, path: Path) -> "Table":
        """The file at `path`, whose header must hold the columns without which nothing can be drawn."""
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                columns, rows = list(reader.fieldnames or []), list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"cannot read `{path}`: {exc}") from None
        missing = [c for c in NEEDED[path.name] if c not in columns]
        if missing:
            found = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "") if columns else "no header"
            raise UserError(f"`{path}` has no column {', '.join(f'`{c}`' for c in missing)} (it has: {found}); "
                            f"is it a cr_accel {path.name}?")
        return cls(path, columns, rows)

    def series(self, column: str) -> Series:
        """`column` against `step`, in step order; empty and non-finite cells are left out (an absent column: no
        points), and of a step written twice (a resumed run that re-ran it) the later row is kept."""
        points: dict[float, float] = {}
        for line, row in enumerate(self.rows if column in self.columns else [], start=2):
            step, value = self._number(row, "step", line), self._number(row, column, line)
            if step is not None and value is not None and math.isfinite(step) and math.isfinite(value):
                points[step] = value
        steps = sorted(points)
        return Series(steps, [points[s] for s in steps])

    def _number(self, row: dict[str, str], column: str, line: int) -> float | None:
        cell = (row.get(column) or "").strip()  # a row shorter than the header leaves None
        if cell == "":
            return None
        try:
            return float(cell)  # "nan" and "inf" read as such
        except ValueError:
            raise UserError(f"`{self.path}` line {line}: `{column}` is `{cell}`, not a number") from None


# ---------------------------------------------------------------- drawing


def draw(runs: list[RunCurves], figure_class: Any) -> Any:
    """One figure: loss, learning rate, then a panel per validation metric (in the order first met), two
    panels per row; each run one colour throughout."""
    colours = [f"C{i % 10}" for i in range(len(runs))]  # matplotlib's default cycle
    metric_columns = list(dict.fromkeys(c for run in runs for c in run.metrics))
    panels = ["loss", "learning rate", *metric_columns]
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = figure_class(figsize=(6.4 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _draw_loss(axes[0], runs, colours)
    _draw_panel(axes[1], "learning rate", [(colour, run.label, run.lr) for colour, run in zip(colours, runs)])
    for ax, column in zip(axes[2:], metric_columns):
        _draw_panel(ax, column, [(colour, run.label, run.metrics[column])
                                 for colour, run in zip(colours, runs) if column in run.metrics])
    return figure


def _draw_loss(ax: Any, runs: list[RunCurves], colours: list[str]) -> None:
    for colour, run in zip(colours, runs):
        source = "steps" if run.step_level else "epochs"
        ax.plot(run.train_loss.steps, run.train_loss.values, color=colour, linewidth=1,
                marker=None if run.step_level else ".", label=f"{run.label} train ({source})")
        ax.plot(run.val_loss.steps, run.val_loss.values, color=colour, linestyle="--", marker="o", markersize=3,
                label=f"{run.label} validation")
    values = [v for run in runs for v in (*run.train_loss.values, *run.val_loss.values)]
    if values and min(values) > 0:
        ax.set_yscale("log")  # losses fall over orders of magnitude
    _finish(ax, "loss (train solid, validation dashed)")


def _draw_panel(ax: Any, title: str, curves: list[tuple[str, str, Series]]) -> None:
    for colour, label, series in curves:
        ax.plot(series.steps, series.values, color=colour, marker=".", label=label)
    _finish(ax, title)


def _finish(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="grey")


def write(figure: Any, out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png", dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write `{out}`: {exc.strerror or exc}") from None
    return out
