"""The README's config reference lists every key the config accepts, under its own section."""

import dataclasses
import re
from pathlib import Path

from cr_accel.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def section_text(name):
    match = re.search(rf"^### `{name}`\n(.*?)(?=^### |^## )", README, re.S | re.M)
    assert match, f"README has no '### `{name}`' section"
    return match.group(1)


def test_readme_documents_every_config_key():
    missing = []
    for f in dataclasses.fields(Config):
        text = section_text(f.name)
        if f.default_factory is dataclasses.MISSING or not dataclasses.is_dataclass(f.default_factory):
            assert text, f"README has no section for `{f.name}`"
            continue  # a plain value such as `seed` or a list such as `stages`: the section itself documents it
        for key in (g.name for g in dataclasses.fields(f.default_factory) if g.name != "kwargs"):
            if f"| `{key}` |" not in text:
                missing.append(f"{f.name}.{key}")
    assert not missing, f"undocumented config keys: {missing}"


def test_readme_examples_of_evaluate_and_predict_parse():
    """Every `cr-accel evaluate` / `cr-accel predict` line in the README's shell blocks is a valid command line."""
    import shlex

    from cr_accel.evaluate import _parser as evaluate_parser
    from cr_accel.predict import _parser as predict_parser

    parsers = {"evaluate": evaluate_parser(), "predict": predict_parser()}
    blocks = re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    examples = [shlex.split(line)[1:] for line in lines if line.startswith(("cr-accel evaluate", "cr-accel predict"))]
    assert {argv[0] for argv in examples} == set(parsers), examples
    for command, *argv in examples:
        parsers[command].parse_intermixed_args(argv)  # a bad example exits 2 here
