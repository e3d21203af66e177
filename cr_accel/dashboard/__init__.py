"""The live dashboard (issue #4): a tracker that sends each epoch and step record, and a server that stores
and shows runs.

    tracker.py     DashboardTracker: an accelerate tracker; log() and log_step() never block, a thread sends
    images.py      samples_png(): a PNG grid of validation samples (input | output | target), no PIL
    schema.py      the messages and their checks, shared by both sides
    store.py       RunStore: SQLite (runs, epochs, deletions), idempotent writes
    step_store.py  step records and the bucket summaries behind downsampled reads
    folders.py     run folders on disk (--runs) read into the store as they grow
    export.py      a run's epochs and step records as CSV
    server.py      `cr-accel dashboard`: make_server() / main(argv), standard library http.server
    assets.py      the page's files and the Content-Security-Policy
    static/        the page (index.html, dashboard.js) and uPlot (MIT, static/uPlot.LICENSE)

Names are imported lazily, so the server does not load accelerate and the tracker does not load the server.
"""

_EXPORTS = {
    "DashboardTracker": "tracker",
    "run_id_for": "tracker",
    "new_run_id": "schema",
    "samples_png": "images",
    "make_server": "server",
    "main": "server",
    "RunStore": "store",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
