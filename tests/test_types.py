"""The type checker over the package (mypy, configured in pyproject.toml): every annotated function checked, and
the public API and the Trainer annotated throughout."""

import subprocess
import sys

from tests.runners import ROOT


def test_mypy_finds_no_type_errors_in_the_package():
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout


def test_an_unannotated_trainer_method_is_caught(tmp_path):
    """The check is not vacuous: a Trainer method without annotations fails it."""
    trainer = (ROOT / "cr_accel" / "trainer.py").read_text()
    package = tmp_path / "cr_accel"
    package.mkdir()
    (package / "__init__.py").write_text("")
    annotated = "    def _phase(self, name: str) -> oom.Phase:"
    assert annotated in trainer  # the method this test strips of its annotations
    (package / "trainer.py").write_text(trainer.replace(annotated, "    def _phase(self, name):"))
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--config-file",
                             ROOT / "pyproject.toml", str(package / "trainer.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert "trainer.py" in result.stdout and "Function is missing a" in result.stdout, result.stdout[-3000:]
