"""Log output for people (text) and for machines (one JSON object per line).

``tensorstream --log-format json ...`` turns every log record, and the live
progress of ``run`` / ``demo``, into JSON lines on stderr (for a log shipper);
``--quiet`` leaves only warnings and errors. The human progress displays (rich)
are off in both modes.

>>> import io, json, logging
>>> buf = io.StringIO()
>>> configure(fmt="json", stream=buf)
>>> logging.getLogger("tensorstream.demo").warning("lag is %d", 42, extra={"partition": 3})
>>> rec = json.loads(buf.getvalue()); (rec["level"], rec["msg"], rec["partition"])
('warning', 'lag is 42', 3)
>>> configure()  # back to text
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

PROGRESS_LOGGER = "tensorstream.progress"

#: the attributes every LogRecord has; anything else came in ``extra=`` and is logged as a field
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime",
                                                                                  "taskName"}

_state = {"format": "text", "quiet": False, "verbose": False}
_handler: logging.Handler | None = None


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields, "exc"}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00",
                                                                                                          "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(_nan_free(out), default=str)


def _nan_free(obj: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nan_free(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_free(v) for v in obj]
    return obj


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


class RepeatFilter(logging.Filter):
    """Summarises floods: a message seen again within ``window_s`` seconds (digits ignored, so
    ports, counters and durations do not make it new) is held back and counted; the next one let
    through after the window says how many were held back.

    librdkafka retries a dead broker every few milliseconds and logs every attempt: without this a
    run against a stopped broker prints hundreds of identical "Connection refused" lines.

    >>> f = RepeatFilter(window_s=60)
    >>> rec = lambda m: logging.LogRecord("tensorstream.kafka.source", logging.ERROR, "x", 0, m, None, None)
    >>> [f.filter(rec(f"Connect to 127.0.0.1:{p} failed")) for p in (1, 2, 3)]
    [True, False, False]
    >>> f.held
    2
    """

    def __init__(self, window_s: float = 30.0, prefix: str = "tensorstream.kafka") -> None:
        super().__init__()
        self.window_s = window_s
        self.prefix = prefix
        self._seen: dict[str, tuple[float, int]] = {}
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = "".join("#" if c.isdigit() else c for c in record.getMessage())
        now = time.monotonic()
        first, count = self._seen.get(key, (None, 0))
        if first is not None and now - first < self.window_s:
            self._seen[key] = (first, count + 1)
            self.held += 1
            return False
        if count:
            record.msg = f"{record.getMessage()} (and {count} more like it in the last {self.window_s:.0f}s)"
            record.args = None
        self._seen[key] = (now, 0)
        if len(self._seen) > 1000:  # bounded: forget the oldest kinds
            for k in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                del self._seen[k]
        return True


def announce(text: str, **fields: Any) -> None:
    """A line the user asked for (e.g. the dashboard URL): shown even with ``--quiet``; a JSON
    object with ``--log-format json``."""
    if json_logs():
        rec = logging.LogRecord("tensorstream", logging.INFO, __file__, 0, text, None, None)
        rec.__dict__.update(fields)
        sys.stderr.write(JsonFormatter().format(rec) + "\n")
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def configure(*, verbose: bool = False, fmt: str = "text", quiet: bool = False, stream: IO[str] | None = None) -> None:
    """Set up the root logger (replacing what an earlier call installed)."""
    global _handler
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    _handler.setFormatter(JsonFormatter() if fmt == "json" else
                          logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _handler.addFilter(RepeatFilter())
    root.addHandler(_handler)
    root.setLevel(logging.WARNING if quiet or not verbose else logging.INFO)
    # JSON mode: progress lines are the production replacement of the live display.
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO if fmt == "json" and not quiet else logging.NOTSET)
    _state.update(format=fmt, quiet=quiet, verbose=verbose)


def json_logs() -> bool:
    return _state["format"] == "json"


def quiet() -> bool:
    return bool(_state["quiet"])


def human_output() -> bool:
    """Whether rich progress displays and chatty messages are wanted (neither --quiet nor JSON logs)."""
    return not quiet() and not json_logs()


class ProgressLog:
    """Logs a run's progress (a ``Progress`` or its dict) as one record every ``every_s`` seconds."""

    def __init__(self, key: str, every_s: float = 10.0, logger: str = PROGRESS_LOGGER) -> None:
        self.key = key
        self.every_s = every_s
        self.log = logging.getLogger(logger)
        self._last = 0.0

    def __call__(self, p: Any, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        d = p if isinstance(p, dict) else p.__dict__
        fields = {k: d.get(k) for k in ("records", "records_per_s", "lag", "model_version", "latency_p50_ms",
                                         "latency_p99_ms", "elapsed_s") if d.get(k) is not None}
        fields.update({k: v for k, v in (d.get("metrics") or {}).items()})
        self.log.info("progress %s", self.key, extra={"run": self.key, **fields})

    def result(self, result: Any) -> None:
        d = result if isinstance(result, dict) else result.to_dict()
        fields = {k: d.get(k) for k in ("records", "predictions", "bad", "seconds", "records_per_s", "latency_p50_ms",
                                         "latency_p99_ms", "peak_rss_mb", "model_version")}
        fields.update(d.get("metrics") or {})
        self.log.info("done %s", self.key, extra={"run": self.key, **fields})
