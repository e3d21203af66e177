"""Held-out sets taken from one folder or file of samples, shared by the builders that read the user's data:
the ratios checked together, and one seeded shuffle that validation takes the first samples of and the test set
the next ones -- so adding a test split leaves validation as it was, and every resume splits the same way.

`held` names the kind of setting that gives a held-out set instead of a ratio, for messages: `path`
(data.val_path, data.test_path: tensor_files, image_folder) or `split` (data.val_split, data.test_split:
hf_dataset)."""

import torch

from ..errors import UserError
from . import seeded_generator


def split_counts(train, val, test=None):
    """The metadata keys of the splits' sizes (`num_test` 0 without a test split)."""
    return {"num_train": len(train), "num_val": len(val), "num_test": len(test) if test else 0}


def check_ratios(val_ratio, val_path, test_ratio, test_path, held="path"):
    """{split: fraction held out} for the splits taken from `path` (validation unless `val_path` is given, test
    when `test_ratio` is), with every problem in one message (see `ratio_problems`)."""
    ratios, problems = ratio_problems(val_ratio, val_path, test_ratio, test_path, held)
    if problems:
        raise UserError("; ".join(problems))
    return ratios


def ratio_problems(val_ratio, val_path, test_ratio, test_path, held="path"):
    """({split: fraction held out}, problems): each fraction in (0, 1), their sum below 1, and `test_path` and
    `test_ratio` not both given."""
    problems, ratios = [], {}
    given = ({"val": val_ratio} if val_path is None else {}) | ({} if test_ratio is None else {"test": test_ratio})
    for name, ratio in given.items():
        is_number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
        if not is_number or not 0 < ratio < 1:
            when = f" when data.val_{held} is not set" if name == "val" else ""
            problems.append(f"data.{name}_ratio must be a number strictly between 0 and 1{when}, got {ratio!r}; "
                            f"e.g. {name}_ratio: 0.1 holds out 10% of the samples, or set data.{name}_{held}")
        ratios[name] = ratio
    if test_ratio is not None and test_path is not None:
        problems.append(f"data.test_{held} and data.test_ratio are both set ({test_path!r}, {test_ratio!r}); the "
                        "test set comes from one of them: remove the other")
    if not problems and len(ratios) == 2 and sum(ratios.values()) >= 1:
        problems.append(f"data.val_ratio={ratios['val']} and data.test_ratio={test_ratio} together hold out "
                        f"{sum(ratios.values()):g} of the samples, leaving none to train on; make their sum "
                        "less than 1 (e.g. val_ratio: 0.1, test_ratio: 0.1)")
    return ratios, problems


def split_indices(total, ratios, seed, stream, path, held="path"):
    """(training indices, {split: indices}) of `total` samples for `ratios` ({"val": r, "test": r}, either may
    be absent), from the shuffle of `seed`'s stream `stream`; each set in ascending order (the files' order)."""
    order = torch.randperm(total, generator=seeded_generator(seed, stream))
    sets, start = {}, 0
    for name, what in (("val", "validation"), ("test", "test")):
        if name not in ratios:
            continue
        count = round(total * ratios[name])
        if count == 0:
            raise UserError(_empty_split(total, path, ratios, what, name, held))
        sets[name] = order[start : start + count].sort().values
        start += count
    if sets and start >= total:
        raise UserError(_empty_split(total, path, ratios, "training", next(iter(sets)), held))
    return order[start:].sort().values, sets


def _empty_split(total, path, ratios, empty, name, held):
    given = " and ".join(f"data.{n}_ratio={r}" for n, r in ratios.items())
    fix = f"a {name}_ratio" if len(ratios) == 1 else "ratios"
    alternative = f"set data.{name}_{held}"
    return (f"splitting the {total} samples at `{path}` with {given} leaves the {empty} set empty; choose "
            f"{fix} that keeps at least one sample in each set, or {alternative}")
