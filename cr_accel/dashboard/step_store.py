"""Step records in the store, and the bucket summaries that make a downsampled read cheap at any run length.

Tables (created by store.py, written only through the functions here, always inside its transaction):
    steps         (run_id, step) -> epoch, metrics JSON, received_at: the records as sent; a re-send replaces
    step_buckets  (run_id, width, bucket) -> summary JSON: for the steps in [bucket*width, (bucket+1)*width),
                  per series the first, last, lowest and highest point, each as (step, value)

Why summaries: reading 100,000 records of one run out of SQLite and parsing their JSON takes about 0.3 s on
the 2-core machine this was written on, so overlaying 10 such runs took 3 s. Summaries are kept at bucket
widths growing 4x (WIDTHS), starting at a width chosen per run from the spacing of its steps so that a bucket
holds about RECORDS_PER_BUCKET records or more: their rows add ~1/6 to the run's row count. A read picks the
narrowest width that gives at most the wanted number of buckets and reads only those rows (a few hundred to
a few thousand), whatever the run's length.

Downsampling keeps, per series, the first and the last point and the lowest and highest point of each bucket
(not LTTB). It never loses an extreme: a loss spike or a gradient-norm blow-up at a single step is always
drawn, and that is what one looks for in step-level curves. It composes (the lowest point of two buckets is
the lower of their lowest points), which is what lets summaries be merged as records arrive and coarsened
from finer widths. LTTB picks visually representative points but may drop a one-step spike, and it needs the
raw points at read time. Points whose value is null (NaN, infinity, or a metric a record does not have)
are left out: they are gaps, not values.
"""

import json

WIDTHS = tuple(4**k for k in range(2, 12))  # 16 ... 4,194,304 steps per bucket
RECORDS_PER_BUCKET = 8  # the narrowest width kept for a run holds about this many records per bucket
SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    run_id      TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    step        INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    metrics     TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS step_buckets (
    run_id  TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    width   INTEGER NOT NULL,
    bucket  INTEGER NOT NULL,
    summary TEXT NOT NULL,
    PRIMARY KEY (run_id, width, bucket)
) WITHOUT ROWID;
"""
# A summary entry: [first_step, first_value, last_step, last_value, min_step, min_value, max_step, max_value]


def add(db, run_id, records, now):
    """Store step records [(step, epoch, {name: float|None})] (a later record of the same step wins) and
    bring the summaries up to date."""
    latest = {step: (epoch, metrics) for step, epoch, metrics in records}
    steps = sorted(latest)
    texts = {step: _dumps(latest[step][1]) for step in steps}
    lo, hi = steps[0], steps[-1]
    before = dict(db.execute("SELECT step, metrics FROM steps WHERE run_id=? AND step BETWEEN ? AND ?",
                             (run_id, lo, hi)).fetchall())
    db.executemany(
        """INSERT INTO steps (run_id, step, epoch, metrics, received_at) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT(run_id, step) DO UPDATE SET
             epoch=excluded.epoch, metrics=excluded.metrics, received_at=excluded.received_at""",
        [(run_id, step, latest[step][0], texts[step], now) for step in steps],
    )
    db.execute("UPDATE runs SET step_count=step_count+? WHERE run_id=?",
               (sum(step not in before for step in steps), run_id))
    width = _width(db, run_id)
    if width is None:
        return
    if any(step in before and before[step] != texts[step] for step in steps):
        # A value changed: a bucket's extremes may now be wrong; recompute them from the records.
        rebuild(db, run_id, width, lo, hi)
    else:  # new records, or re-sent identical ones: merging is exact
        _write(db, run_id, width, [(step, latest[step][1]) for step in steps], merge=True)


def delete_after(db, run_id, step):
    """Forget the records after `step` (a resumed run trains them again)."""
    gone = db.execute("DELETE FROM steps WHERE run_id=? AND step>?", (run_id, step)).rowcount
    db.execute("UPDATE runs SET step_count=step_count-? WHERE run_id=?", (gone, run_id))
    width = db.execute("SELECT step_width FROM runs WHERE run_id=?", (run_id,)).fetchone()
    if width and width[0]:
        rebuild(db, run_id, width[0], step + 1, None)


def rebuild(db, run_id, width, lo, hi):
    """Recompute every summary row over the steps lo..hi (hi None: to the end) from the records: the span is
    widened to whole buckets of the widest width, so that every bucket it touches is recomputed whole."""
    top = WIDTHS[-1]
    span_lo = lo // top * top
    span_hi = None if hi is None else (hi // top + 1) * top - 1
    for w in _levels(width):
        if span_hi is None:
            db.execute("DELETE FROM step_buckets WHERE run_id=? AND width=? AND bucket>=?", (run_id, w, span_lo // w))
        else:
            db.execute("DELETE FROM step_buckets WHERE run_id=? AND width=? AND bucket BETWEEN ? AND ?",
                       (run_id, w, span_lo // w, span_hi // w))
    rows = db.execute("SELECT step, metrics FROM steps WHERE run_id=? AND step BETWEEN ? AND ? ORDER BY step",
                      (run_id, span_lo, span_hi if span_hi is not None else 2**63 - 1)).fetchall()
    _write(db, run_id, width, [(step, json.loads(text)) for step, text in rows], merge=False)


def read(db, run_id, max_points, after=0):
    """The run's records after step `after`, at most `max_points` points per series:
    {"total": records, "first_step", "last_step", "downsampled": bool, "bucket_steps": width or null,
     "series": {name: {"step": [...], "value": [...]}}}."""
    # Two queries: SQLite reads MIN() or MAX() alone from the index's end, both together by a scan.
    first = db.execute("SELECT MIN(step) FROM steps WHERE run_id=? AND step>?", (run_id, after)).fetchone()[0]
    last = db.execute("SELECT MAX(step) FROM steps WHERE run_id=? AND step>?", (run_id, after)).fetchone()[0]
    if after == 0:  # counting 100,000 index entries takes ~20 ms: the run keeps its count
        total = db.execute("SELECT step_count FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]
    else:
        total = db.execute("SELECT COUNT(*) FROM steps WHERE run_id=? AND step>?", (run_id, after)).fetchone()[0]
    answer = {"total": total, "first_step": first, "last_step": last, "downsampled": False, "bucket_steps": None,
              "series": {}}
    if total == 0:
        return answer
    if total <= max_points:
        rows = db.execute("SELECT step, metrics FROM steps WHERE run_id=? AND step>? ORDER BY step",
                          (run_id, after)).fetchall()
        series = {}
        for step, text in rows:
            for name, value in json.loads(text).items():
                if value is not None:
                    points = series.setdefault(name, ([], []))
                    points[0].append(step)
                    points[1].append(value)
        answer["series"] = {name: {"step": s, "value": v} for name, (s, v) in series.items()}
        return answer
    buckets = max(1, (max_points - 2) // 2)  # two points a bucket, and the first and last points
    answer["downsampled"] = True
    width = _summary_width(db, run_id, buckets, first, last, after)
    if width is not None:
        rows = db.execute("SELECT summary FROM step_buckets WHERE run_id=? AND width=? AND bucket BETWEEN ? AND ? "
                          "ORDER BY bucket", (run_id, width, first // width, last // width)).fetchall()
        summaries = [json.loads(text) for (text,) in rows]
        answer["bucket_steps"] = width
    else:  # no usable summary (e.g. `after` falls inside a bucket): equal buckets over the records themselves
        rows = db.execute("SELECT step, metrics FROM steps WHERE run_id=? AND step>? ORDER BY step",
                          (run_id, after)).fetchall()
        span = last - first + 1
        by_bucket = _summarize(((step, json.loads(text)) for step, text in rows),
                               lambda step: (step - first) * buckets // span)
        summaries = [by_bucket[b] for b in sorted(by_bucket)]
    answer["series"] = _points(summaries)
    return answer


def rows(db, run_id):
    """Every record of the run in step order: [(step, epoch, metrics)]."""
    found = db.execute("SELECT step, epoch, metrics FROM steps WHERE run_id=? ORDER BY step", (run_id,)).fetchall()
    return [(step, epoch, json.loads(text)) for step, epoch, text in found]


# ---------------------------------------------------------------- summaries

def _levels(width):
    return [w for w in WIDTHS if w >= width]


def _width(db, run_id):
    """The run's narrowest summary width; chosen (and every summary built) once it has two records: the median
    gap between its first records is its logging interval."""
    width = db.execute("SELECT step_width FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]
    if width is not None:
        return width
    first = [s for (s,) in db.execute("SELECT step FROM steps WHERE run_id=? ORDER BY step LIMIT 65", (run_id,))]
    if len(first) < 2:
        return None  # one record: no spacing yet, and nothing worth summarizing
    gaps = sorted(b - a for a, b in zip(first, first[1:]))
    wanted = gaps[len(gaps) // 2] * RECORDS_PER_BUCKET
    width = next((w for w in WIDTHS if w >= wanted), WIDTHS[-1])
    db.execute("UPDATE runs SET step_width=? WHERE run_id=?", (width, run_id))
    rebuild(db, run_id, width, 0, None)
    return None  # the rebuild already covered the records just added


def _summary_width(db, run_id, buckets, first, last, after):
    """The narrowest kept width giving at most `buckets` buckets over first..last, or None when there is none
    or its first bucket also holds records at or before `after`."""
    narrowest = db.execute("SELECT step_width FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]
    if narrowest is None:
        return None
    for width in _levels(narrowest):
        if last // width - first // width + 1 <= buckets:
            start = first // width * width
            if start <= after and db.execute("SELECT 1 FROM steps WHERE run_id=? AND step BETWEEN ? AND ? LIMIT 1",
                                             (run_id, start, after)).fetchone():
                return None
            return width
    return None


def _write(db, run_id, width, points, merge):
    """Summaries of `points` [(step, metrics)] (in step order) at every kept width; `merge`: combined with the
    rows already there (the points are new), else written over them."""
    if not points:
        return
    levels = _levels(width)
    summaries = _summarize(points, lambda step: step // levels[0])
    for i, w in enumerate(levels):
        if i:
            summaries = _coarsen(summaries, levels[i - 1], w)
        if merge:
            lo, hi = min(summaries), max(summaries)
            for bucket, text in db.execute("SELECT bucket, summary FROM step_buckets WHERE run_id=? AND width=? "
                                           "AND bucket BETWEEN ? AND ?", (run_id, w, lo, hi)).fetchall():
                if bucket in summaries:
                    summaries[bucket] = _merge(json.loads(text), summaries[bucket])
        db.executemany("INSERT OR REPLACE INTO step_buckets (run_id, width, bucket, summary) VALUES (?, ?, ?, ?)",
                       [(run_id, w, bucket, _dumps(s)) for bucket, s in summaries.items()])


def _summarize(points, bucket_of):
    """{bucket: {name: entry}} of points [(step, metrics)] given in step order."""
    out = {}
    for step, metrics in points:
        summary = out.setdefault(bucket_of(step), {})
        for name, value in metrics.items():
            if value is None:
                continue
            e = summary.get(name)
            if e is None:
                summary[name] = [step, value, step, value, step, value, step, value]
                continue
            e[2], e[3] = step, value
            if value < e[5]:  # strict: on a tie the earlier point stays, as in _entry
                e[4], e[5] = step, value
            if value > e[7]:
                e[6], e[7] = step, value
    return out


def _coarsen(summaries, fine, coarse):
    out = {}
    for bucket in sorted(summaries):
        key = bucket * fine // coarse
        out[key] = _merge(out[key], summaries[bucket]) if key in out else summaries[bucket]
    return out


def _merge(a, b):
    """Two summaries (of disjoint steps) as one."""
    out = dict(a)
    for name, e in b.items():
        out[name] = _entry(out[name], e) if name in out else e
    return out


def _entry(a, b):
    first = a[0:2] if a[0] <= b[0] else b[0:2]
    last = a[2:4] if a[2] >= b[2] else b[2:4]
    low = a[4:6] if (a[5], a[4]) <= (b[5], b[4]) else b[4:6]
    high = a[6:8] if (a[7], -a[6]) >= (b[7], -b[6]) else b[6:8]
    return first + last + low + high


def _points(summaries):
    """{name: {"step", "value"}} from summaries in bucket order: each bucket's lowest and highest point in
    step order, and the series' first and last point."""
    series, last = {}, {}
    for summary in summaries:
        for name, e in summary.items():
            found = series.get(name)
            if found is None:
                found = series[name] = ([e[0]], [e[1]])  # the series' first point
            steps, values = found
            a_step, a_value, b_step, b_value = e[4], e[5], e[6], e[7]
            if b_step < a_step:
                a_step, a_value, b_step, b_value = b_step, b_value, a_step, a_value
            if a_step != steps[-1]:
                steps.append(a_step)
                values.append(a_value)
            if b_step != steps[-1]:
                steps.append(b_step)
                values.append(b_value)
            last[name] = e[2], e[3]
    out = {}
    for name, (steps, values) in series.items():
        if last[name][0] != steps[-1]:
            steps.append(last[name][0])
            values.append(last[name][1])
        out[name] = {"step": steps, "value": values}
    return out


def _dumps(value):
    # Sorted keys: the same record sent twice, or read back from a run folder, is the same text (see `add`).
    return json.dumps(value, allow_nan=False, separators=(",", ":"), sort_keys=True)
