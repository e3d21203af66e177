"""The live dashboard (issue #4): a tracker that sends each epoch, and a server that stores and shows runs.

    tracker.py  DashboardTracker: an accelerate tracker; log() never blocks, a thread sends and retries
    images.py   samples_png(): a PNG grid of validation samples (input | output | target), no PIL
    schema.py   the messages and their checks, shared by both sides
    store.py    RunStore: SQLite (runs, epochs), idempotent writes
    server.py   `cr-accel dashboard`: make_server() / main(argv), standard library http.server
    static/index.html  the page: runs, live charts, config, latest samples picture

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
