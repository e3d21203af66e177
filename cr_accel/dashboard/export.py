"""A run's epochs and step records as CSV downloads, in the layout the trainer writes into its run folder.

    metrics.csv   epoch, step, then every metric (in the order the columns first appear)
    steps.csv     step, epoch, then every metric

Floats are written with Python's repr (the shortest text that reads back exactly, as the trainer does);
a missing value or a null (NaN, infinity) is an empty cell.
"""

import csv
import io


def epochs_csv(epochs):
    """`epochs` as the store returns them ({"epoch", "step", "metrics"})."""
    return _csv([("epoch", "step"), *((e["epoch"], e["step"], e["metrics"]) for e in epochs)])


def steps_csv(records):
    """`records` [(step, epoch, metrics)]."""
    return _csv([("step", "epoch"), *records])


def _csv(table):
    """table[0]: the two index columns; then (index values..., metrics) rows. UTF-8 bytes."""
    head, rows = table[0], table[1:]
    columns = {}
    for row in rows:
        for name in row[-1]:
            columns.setdefault(name, None)
    columns = [c for c in columns if c not in head]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*head, *columns])
    for *index, metrics in rows:
        writer.writerow([*("" if v is None else v for v in index), *(_cell(metrics.get(c)) for c in columns)])
    return out.getvalue().encode()


def _cell(value):
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value
