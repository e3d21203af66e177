"""The messages a run sends to the dashboard: their checks (server) and value conversions (tracker).

POST /api/runs                  start (or re-start: idempotent upsert)
    {"run_id": str, "name": str,                       required; run_id matches RUN_ID_PATTERN
     "config": object|null, "info": object|null,       optional: the resolved config; anything else
     "world_size": int>=1|null, "device": str|null,    optional
     "epochs_done": int>=0|null,                       optional: a resumed run's finished epochs; the
                                                       server forgets the run's epochs after it
     "steps_done": int>=0|null}                        optional: a resumed run's last optimizer step; the
                                                       server forgets the run's step records after it
POST /api/runs/<run_id>/epochs  one epoch (idempotent by (run_id, epoch): a re-send replaces the row)
    {"epoch": int>=1,                                  required, 1-based
     "step": int>=0|null,                              optional: optimizer steps so far
     "metrics": {name: number|null},                   required (may be empty); null = NaN/inf
     "samples_png": str|null}                          optional: base64 of a PNG (the latest is kept)
POST /api/runs/<run_id>/steps   step records, a batch of 1 to MAX_STEP_RECORDS (idempotent by (run_id, step))
    {"steps": [{"step": int>=1,                        required: the global optimizer step
                "epoch": int>=1,                       required, 1-based
                "metrics": {name: number|null}}, ...]} required (may be empty); null = NaN/inf
POST /api/runs/<run_id>/end     how the run ended
    {"status": one of END_STATUSES, "message": str|null}

Every answer is JSON: {"ok": true, ...} or {"ok": false, "error": "..."} with a 4xx status.
"""

import base64
import binascii
import math
import re
import secrets
import time
from urllib.parse import urlsplit

RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_RUN_ID = re.compile(RUN_ID_PATTERN)
START_FIELDS = ("config", "info", "world_size", "device", "epochs_done", "steps_done")  # besides run_id and name
END_STATUSES = ("finished", "failed", "preempted", "stopped_early")
MAX_BODY_BYTES = 4 * 2**20
MAX_EPOCH = 2**31 - 1
MAX_STEP = 2**63 - 1
MAX_NAME = 200
MAX_METRICS = 1000
MAX_STEP_RECORDS = 5000  # per POST .../steps: the tracker sends a few hundred; the folder importer 5000
_MAX_RECORD_ERRORS = 5  # a batch with many bad records names the first few
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ValidationError(ValueError):
    """A message that is well-formed JSON but not a valid message: the 422 answer's text."""


def valid_run_id(run_id):
    return isinstance(run_id, str) and _RUN_ID.fullmatch(run_id) is not None


def check_url(url):
    """None for a usable dashboard url (http or https, a host, a valid port), else what is wrong with it."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            return f"dashboard url must look like http://HOST:PORT (e.g. http://127.0.0.1:8765), got {url!r}"
        parts.port
    except ValueError:
        return f"dashboard url {url!r} has an invalid port"
    return None


def check_start(body):
    """The start message's fields, checked; raises ValidationError naming every problem."""
    errors = []
    _only(body, ("run_id", "name") + START_FIELDS, errors)
    run_id = body.get("run_id")
    if "run_id" not in body:
        errors.append("`run_id` is required")
    elif not valid_run_id(run_id):
        errors.append(f"`run_id` must be a string of 1-128 letters, digits, '.', '_' or '-' "
                      f"starting with a letter or digit; got {_show(run_id)}")
    name = body.get("name")
    if "name" not in body:
        errors.append("`name` is required")
    elif not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        errors.append(f"`name` must be a non-empty string of at most {MAX_NAME} characters; got {_show(name)}")
    for key in ("config", "info"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            errors.append(f"`{key}` must be a JSON object or null; got {type_name(body[key])}")
    _optional_int(body, "world_size", 1, 2**31 - 1, errors)
    _optional_int(body, "epochs_done", 0, MAX_EPOCH, errors)
    _optional_int(body, "steps_done", 0, MAX_STEP, errors)
    device = body.get("device")
    if device is not None and (not isinstance(device, str) or len(device) > MAX_NAME):
        errors.append(f"`device` must be a string of at most {MAX_NAME} characters or null; got {_show(device)}")
    _raise(errors)
    return {"run_id": run_id, "name": name, "config": body.get("config"), "info": body.get("info"),
            "world_size": body.get("world_size"), "device": device, "epochs_done": body.get("epochs_done"),
            "steps_done": body.get("steps_done")}


def check_epoch(body):
    """(epoch, step, metrics as {str: float|None}, png bytes or None); raises ValidationError."""
    errors = []
    _only(body, ("epoch", "step", "metrics", "samples_png"), errors)
    epoch = body.get("epoch")
    if "epoch" not in body:
        errors.append("`epoch` is required")
    elif not _is_int(epoch) or not 1 <= epoch <= MAX_EPOCH:
        errors.append(f"`epoch` must be an integer from 1 to {MAX_EPOCH} (1-based); got {_show(epoch)}")
    _optional_int(body, "step", 0, MAX_STEP, errors)
    metrics = _check_metrics(body, errors)
    png = None
    encoded = body.get("samples_png")
    if encoded is not None:
        if not isinstance(encoded, str):
            errors.append(f"`samples_png` must be a base64 string or null; got {type_name(encoded)}")
        else:
            try:
                png = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                errors.append("`samples_png` is not valid base64")
            else:
                if not png.startswith(PNG_SIGNATURE):
                    errors.append("`samples_png` does not decode to a PNG image")
    _raise(errors)
    return epoch, body.get("step"), metrics, png


def check_steps(body):
    """[(step, epoch, metrics as {str: float|None}), ...] in the order sent; raises ValidationError naming
    the first few bad records by their index."""
    errors = []
    _only(body, ("steps",), errors)
    raw = body.get("steps")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_STEP_RECORDS:
        got = f"{len(raw)} records" if isinstance(raw, list) else _show(raw)
        errors.append(f"`steps` must be an array of 1 to {MAX_STEP_RECORDS} step records; got {got}")
        _raise(errors)
    records, bad = [], 0
    for i, record in enumerate(raw):
        problems = []
        if not isinstance(record, dict):
            problems.append(f"must be an object {{step, epoch, metrics}}; got {type_name(record)}")
        else:
            _only(record, ("step", "epoch", "metrics"), problems)
            step, epoch = record.get("step"), record.get("epoch")
            if not _is_int(step) or not 1 <= step <= MAX_STEP:
                problems.append(f"`step` must be an integer from 1 to {MAX_STEP}; got {_show(step)}")
            if not _is_int(epoch) or not 1 <= epoch <= MAX_EPOCH:
                problems.append(f"`epoch` must be an integer from 1 to {MAX_EPOCH} (1-based); got {_show(epoch)}")
            metrics = _check_metrics(record, problems)
            if not problems:
                records.append((step, epoch, metrics))
        if problems:
            bad += 1
            if bad <= _MAX_RECORD_ERRORS:
                errors.append(f"steps[{i}]: " + "; ".join(problems))
    if bad > _MAX_RECORD_ERRORS:
        errors.append(f"... {bad} bad records in all")
    _raise(errors)
    return records


def _check_metrics(body, errors):
    """body["metrics"] as {name: float|None} (NaN/inf as None); problems appended to `errors`."""
    metrics = {}
    raw = body.get("metrics")
    if "metrics" not in body:
        errors.append("`metrics` is required (an object of name: number; {} for none)")
    elif not isinstance(raw, dict):
        errors.append(f"`metrics` must be an object of name: number; got {type_name(raw)}")
    elif len(raw) > MAX_METRICS:
        errors.append(f"`metrics` has {len(raw)} entries; at most {MAX_METRICS}")
    else:
        for name, value in raw.items():
            if not name or len(name) > MAX_NAME:
                errors.append(f"metric name {_show(name)} must be 1-{MAX_NAME} characters")
            elif value is None:
                metrics[name] = None
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                metrics[name] = number if math.isfinite(number) else None
            else:
                errors.append(f"metric `{name}` must be a number or null; got {_show(value)}")
    return metrics


def check_end(body):
    """(status, message); raises ValidationError."""
    errors = []
    _only(body, ("status", "message"), errors)
    status = body.get("status")
    if "status" not in body:
        errors.append(f"`status` is required: one of {', '.join(END_STATUSES)}")
    elif status not in END_STATUSES:
        errors.append(f"`status` must be one of {', '.join(END_STATUSES)}; got {_show(status)}")
    message = body.get("message")
    if message is not None and not isinstance(message, str):
        errors.append(f"`message` must be a string or null; got {type_name(message)}")
    _raise(errors)
    return status, None if message is None else message[:2000]


def _only(body, allowed, errors):
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        errors.append(f"unknown field(s) {', '.join(f'`{k}`' for k in unknown)}; allowed: {', '.join(allowed)}")


def _optional_int(body, key, low, high, errors):
    value = body.get(key)
    if value is not None and (not _is_int(value) or not low <= value <= high):
        errors.append(f"`{key}` must be an integer from {low} to {high} or null; got {_show(value)}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _raise(errors):
    if errors:
        raise ValidationError("; ".join(errors))


def type_name(value):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _show(value):
    text = repr(value)
    return f"{type_name(value)} {text[:60]}{'...' if len(text) > 60 else ''}"


# ---------------------------------------------------------------- the sending side

def new_run_id(name):
    """A fresh run id: the name (made safe), the time and a random suffix."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:80] or "run"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


SKIP = object()  # metric_value's answer for a value that is not a metric


def metric_value(value):
    """A float for anything numeric (bool, int, numpy, 0-d tensor), None for NaN/inf, else SKIP."""
    if isinstance(value, str) or value is None:
        return SKIP
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return SKIP
    return number if math.isfinite(number) else None


def plain_json(value, depth=0):
    """The value as plain JSON (dicts, lists, str, numbers, null); other objects as their str()."""
    if depth > 50:
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain_json(v, depth + 1) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
