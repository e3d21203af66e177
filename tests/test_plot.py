"""`cr-accel plot` (cr_accel/plot.py) on run folders written by hand: the PNG, the curves drawn from each file,
and the errors (exit 2, one line naming the file). Run in process through `cli.main`, as the console script
runs it; `cr-accel --help` listing `plot` is checked in tests/test_cli.py."""

import re
import sys

import pytest
from PIL import Image

from cr_accel import cli, plot

METRICS_A = """epoch,train_loss,grad_norm,skipped_steps,val_loss,val_psnr,step,best_val,lr,samples_per_s,epoch_time,val_ssim
1,0.5,1.0,0,0.4,20.0,4,0.4,0.001,100.0,0.1,
2,0.3,1.0,0,,nan,8,0.4,0.0008,100.0,0.1,
3,0.2,1.0,0,0.25,24.5,12,0.25,0.0005,100.0,0.1,0.8
"""
# steps.csv: a row every 2 optimizer steps; a `loss/<term>` column as weighted losses write them.
STEPS_A = "step,epoch,loss,lr,grad_norm,loss/mse\n" + "".join(
    f"{s},{(s - 1) // 4 + 1},{0.6 * 0.9 ** s},{0.001 * (1 - s / 24)},1.0,{0.6 * 0.9 ** s}\n" for s in range(2, 13, 2))
METRICS_B = """epoch,train_loss,val_loss,val_psnr,step,lr
1,0.7,0.6,18.0,5,0.002
2,0.4,0.35,21.0,10,0.001
"""


@pytest.fixture
def runs(tmp_path):
    a, b = tmp_path / "lr1e-3", tmp_path / "lr2e-3"
    a.mkdir(), b.mkdir()
    (a / "metrics.csv").write_text(METRICS_A)
    (a / "steps.csv").write_text(STEPS_A)
    (b / "metrics.csv").write_text(METRICS_B)  # an older run: no steps.csv
    return a, b


def test_two_runs_make_one_png(runs, tmp_path, capsys):
    out = tmp_path / "figures" / "curves.png"
    assert cli.main(["plot", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"  # the path written, nothing else
    with Image.open(out) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(out) as image:
        width, height = image.size
        # 4 panels (loss, learning rate, val_psnr, val_ssim), two per row at 640x360 pixels each
        assert (width, height) == (1280, 720)
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 50  # drawn on, not a blank canvas
    assert out.stat().st_size > 20_000


def test_curves_come_from_steps_csv_when_present_else_from_metrics_csv(runs):
    with open(runs[0] / "steps.csv", "a") as f:
        f.write("4,1,0.01,0.0009,1.0,0.01\n")  # step 4 again, as a resumed run that re-ran it writes it
    a, b = plot.read_runs([str(runs[0]), str(runs[1])])
    assert (a.label, b.label) == ("lr1e-3", "lr2e-3")
    assert a.step_level and a.train_loss.steps == [2, 4, 6, 8, 10, 12]
    assert a.train_loss.values == pytest.approx([0.6 * 0.9**s if s != 4 else 0.01 for s in range(2, 13, 2)])
    assert a.lr.steps == [2, 4, 6, 8, 10, 12]  # the step-level learning rate
    assert not b.step_level and (b.train_loss.steps, b.train_loss.values) == ([5, 10], [0.7, 0.4])
    assert (b.lr.steps, b.lr.values) == ([5, 10], [0.002, 0.001])
    # An empty cell (epoch 2's val_loss) and `nan` (its val_psnr) are left out, not drawn as zero.
    assert (a.val_loss.steps, a.val_loss.values) == ([4, 12], [0.4, 0.25])
    assert (a.metrics["val_psnr"].steps, a.metrics["val_psnr"].values) == ([4, 12], [20.0, 24.5])
    assert (a.metrics["val_ssim"].steps, a.metrics["val_ssim"].values) == ([12], [0.8])  # a column added later
    assert set(a.metrics) == {"val_psnr", "val_ssim"} and set(b.metrics) == {"val_psnr"}


def test_the_figure_overlays_the_runs_with_their_names(runs):
    from matplotlib.figure import Figure

    figure = plot.draw(plot.read_runs([str(r) for r in runs]), Figure)
    loss, lr, psnr, ssim = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in (lr, psnr, ssim)] == ["learning rate", "val_psnr", "val_ssim"]
    assert [line.get_label() for line in loss.lines] == ["lr1e-3 train (steps)", "lr1e-3 validation",
                                                         "lr2e-3 train (epochs)", "lr2e-3 validation"]
    assert [line.get_label() for line in psnr.lines] == ["lr1e-3", "lr2e-3"]
    assert [line.get_label() for line in ssim.lines] == ["lr1e-3"]
    assert loss.get_yscale() == "log" and loss.get_xlabel() == "optimizer step"
    assert psnr.lines[0].get_color() == loss.lines[0].get_color() != psnr.lines[1].get_color()


def test_same_folder_names_are_told_apart_by_their_paths(tmp_path):
    for parent in ("x", "y"):
        (tmp_path / parent / "run").mkdir(parents=True)
        (tmp_path / parent / "run" / "metrics.csv").write_text(METRICS_B)
    paths = [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]
    assert [r.label for r in plot.read_runs(paths)] == paths


def _error_of(argv, capsys):
    code = cli.main(["plot", *map(str, argv)])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    return code, captured.err


def test_bad_input_exits_2_with_one_line_naming_the_file(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "metrics.csv").write_text("epoch,step,train_loss\n1,4,low\n")
    (runs[1] / "steps.csv").write_text("step,epoch\n2,1\n")
    cases = {
        tmp_path / "missing": r"run folder `[^`]*missing` does not exist",
        tmp_path / "empty": r"`[^`]*empty/metrics\.csv` does not exist: `[^`]*empty` is not a run folder",
        tmp_path / "odd": r"`[^`]*odd/metrics\.csv` has no column `step`, `train_loss` \(it has: epoch, loss\)",
        tmp_path / "text": r"`[^`]*text/metrics\.csv` line 2: `train_loss` is `low`, not a number",
        runs[1]: r"`[^`]*lr2e-3/steps\.csv` has no column `loss` \(it has: step, epoch\)",
    }
    for folder, message in cases.items():
        code, err = _error_of([runs[0], folder, "--out", tmp_path / "never.png"], capsys)
        assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "never.png").exists()


def test_without_matplotlib_it_says_how_to_install_it(runs, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code, err = _error_of([runs[0], "--out", tmp_path / "c.png"], capsys)
    assert code == 2 and err == "error: cr-accel plot needs matplotlib, which is not installed: " \
                                "pip install 'cr_accel[plot]'\n"


def test_default_out_is_curves_png_in_the_current_folder(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot", str(runs[1])]) == 0
    assert capsys.readouterr().out == "curves.png\n" and (tmp_path / "curves.png").stat().st_size > 0
    assert "default: curves.png in the current folder" in plot._parser().format_help()
