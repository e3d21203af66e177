"""The page's files (static/ in this package) and the Content-Security-Policy every answer carries.

    static/index.html          the page: markup and styles, no inline script
    static/dashboard.js        the page's script
    static/uPlot.iife.min.js   uPlot 1.6.32 (MIT, static/uPlot.LICENSE): the charts; draws 100k-point series
    static/uPlot.min.css       its styles

Only the files named in STATIC_FILES are served (no path from a request ever reaches the file system), each
read once.
"""

from importlib import resources

STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}

# The page's script is a file served from here, so scripts need no inline allowance at all: 'self' only.
# Inline styles stay allowed (the page and uPlot set colours and sizes in style attributes); images and
# fetch() go to this server only; nothing else loads; no framing, no forms, no <base>.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")

_cache: dict[str, bytes] = {}


def page_html():
    """The page's bytes."""
    return _read("index.html")


def static_file(name):
    """(bytes, content type) of a file listed in STATIC_FILES, else None."""
    if name not in STATIC_FILES:
        return None
    return _read(name), STATIC_FILES[name]


def _read(name):
    if name not in _cache:
        _cache[name] = resources.files(__package__).joinpath("static", name).read_bytes()
    return _cache[name]
