"""Building a part named in the config (model, loss, optimizer, data, schedule) so that a failure is one message
naming its section, the call that failed, where it failed, and the keys whose values look wrong."""

import inspect
import os
import traceback

import torch

from .errors import UserError


def build_part(section, section_cfg, builder, build, report=True):
    """`build()`; an exception from it becomes a UserError about `section` (with `report`, else it passes)."""
    try:
        return build()
    except UserError:
        raise
    except Exception as exc:
        if not report:
            raise
        call = ", ".join(f"{k}={v!r}" for k, v in section_cfg.kwargs.items())
        hints = _suspects(section, section_cfg.name, builder, section_cfg.kwargs)
        if not hints and section_cfg.kwargs:
            hints = ["check the values of " + ", ".join(f"`{section}.{k}`" for k in section_cfg.kwargs)]
        raise UserError(f"`{section}` could not be built: `{section_cfg.name}({call})` raised "
                        f"{describe_exception(exc)}" + "".join(f"; {h}" for h in hints)) from None


def _suspects(section, name, builder, kwargs):
    """Hints for the keys whose values do not look like what the builder takes (its annotations and
    defaults): a string where a list or a number is expected, a list of another length than the default."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return []
    wrong_type, wrong_length = [], []
    for key, value in kwargs.items():
        p = params.get(key)
        if p is None:
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        annotated = p.annotation is not inspect.Parameter.empty and isinstance(p.annotation, type)
        expected = p.annotation if annotated else type(default) if default is not None else None
        if expected in (list, tuple):
            if not isinstance(value, (list, tuple)):
                example = f" like {list(default)}" if isinstance(default, (list, tuple)) else ""
                wrong_type.append(f"`{section}.{key}` is {value!r} ({type(value).__name__}), but "
                                  f"`{name}` takes a list{example}")
            elif isinstance(default, (list, tuple)) and len(value) != len(default):
                wrong_length.append(f"`{section}.{key}` has {len(value)} value(s) where the default "
                                    f"{list(default)} has {len(default)}")
        elif expected in (int, float, bool, str) and not _fits(value, expected):
            wrong_type.append(f"`{section}.{key}` is {value!r} ({type(value).__name__}), but "
                              f"`{name}` takes {expected.__name__}")
    return wrong_type or wrong_length


def _fits(value, expected):
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


_CALLERS = ("building.py", "preflight.py")  # where the lambdas that call a builder live: never the culprit


def describe_exception(exc):
    """`Type: first line` and, for an error raised outside torch, where (the user's code)."""
    text = str(exc).strip().splitlines()
    where = ""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    if frames and os.path.basename(frames[-1].filename) not in _CALLERS:
        where = f" (in {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}, {frames[-1].name})"
    return f"{type(exc).__name__}: {text[0] if text else 'no details'}{where}"
