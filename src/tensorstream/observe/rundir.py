"""Run directories: what a run recorded, for ``tensorstream report`` and the dashboard.

``run --run-dir DIR`` (and ``demo --run-dir DIR``) write:

- ``DIR/metrics.jsonl``: one JSON object per line, appended about once a second
  per run while it goes (so a crash keeps what was measured):

  - ``{"type": "progress", "key": "<pipeline>/<backend>", "t": <unix s>, ...}``
    with the fields of :class:`~tensorstream.pipeline.Progress` (``records``,
    ``records_per_s``, ``lag``, ``metrics`` {prequential, overall and
    ``*_window``}, ``elapsed_s``, ``model_version``, ``latency_p50_ms``,
    ``latency_p99_ms``, ``loss``); ``history`` holds only the
    ``[records scored, windowed metric]`` points new since the previous line
    and ``events`` only the new events (``{"kind": "drift"|"model_version"|
    "checkpoint", "label", "records", "t"}``);
  - ``{"type": "result", "key": ..., "t": ..., ...}`` with the fields of
    :class:`~tensorstream.pipeline.RunResult` when a run ends;
  - ``{"type": "error", "key": ..., "t": ..., "error": "..."}`` when it failed.
- ``DIR/result.json``: ``{"format": "tensorstream.run/1", "runs": {key: RunResult fields}}``
  rewritten (atomically) when a run ends.

NaN and infinities are written as ``null``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

FORMAT = "tensorstream.run/1"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"

_DUMP = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _jsonable(v: Any) -> Any:
    return v.__dict__ if hasattr(v, "__dict__") and not isinstance(v, (dict, list)) else v


class RunRecorder:
    """Appends progress / result lines to ``metrics.jsonl`` and keeps ``result.json`` current."""

    def __init__(self, run_dir: str | Path, *, meta: Mapping[str, Any] | None = None) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta or {})
        self._f = open(self.dir / METRICS_FILE, "ab")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._last_n: dict[str, int] = {}
        self._seen_events: dict[str, set[tuple[Any, ...]]] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def _write(self, line: dict[str, Any]) -> None:
        with self._lock:
            self._f.write(orjson.dumps(line, option=_DUMP) + b"\n")
            self._f.flush()

    def progress(self, key: str, payload: Any, *, t: float | None = None) -> None:
        p = dict(_jsonable(payload))
        last = self._last_n.get(key, -1)
        hist = [list(h) for h in p.get("history") or () if h[0] > last]
        if hist:
            self._last_n[key] = int(hist[-1][0])
        seen = self._seen_events.setdefault(key, set())
        events = []
        for ev in p.get("events") or ():
            k = (ev.get("kind"), ev.get("t"), ev.get("label"))
            if k not in seen:
                seen.add(k)
                events.append(ev)
        p.update(history=hist, events=events)
        self._write({"type": "progress", "key": key, "t": time.time() if t is None else t, **p})

    def result(self, key: str, payload: Any, *, t: float | None = None) -> None:
        p = dict(_jsonable(payload))
        self._write({"type": "result", "key": key, "t": time.time() if t is None else t, **p})
        self.results[key] = p
        self._write_results()

    def error(self, key: str, message: str) -> None:
        self._write({"type": "error", "key": key, "t": time.time(), "error": message})
        self.results[key] = {"error": message}
        self._write_results()

    def _write_results(self) -> None:
        body = orjson.dumps({"format": FORMAT, **self.meta, "runs": self.results},
                            option=_DUMP | orjson.OPT_INDENT_2)
        tmp = self.dir / (RESULT_FILE + ".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, self.dir / RESULT_FILE)

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RunData:
    """A run directory, read back (see the module docstring for the files)."""

    path: Path
    #: per run key: its RunResult fields (or {"error": ...})
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per run key: progress lines in time order
    progress: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: per run key: [(records scored, windowed metric)] from the progress lines and the result
    history: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: per run key: events (drift, model_version, checkpoint), de-duplicated, in time order
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return sorted(set(self.results) | set(self.progress))


def load_run(run_dir: str | Path) -> RunData:
    """Read ``metrics.jsonl`` and ``result.json`` of a run directory (either may be missing, not both)."""
    d = Path(run_dir)
    mfile, rfile = d / METRICS_FILE, d / RESULT_FILE
    if not mfile.exists() and not rfile.exists():
        raise FileNotFoundError(f"{d} is not a run directory: no {METRICS_FILE} and no {RESULT_FILE}")
    data = RunData(d)
    hist: dict[str, dict[float, float]] = {}
    events: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    if mfile.exists():
        for raw in mfile.read_bytes().splitlines():
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:  # a torn last line after a crash
                continue
            key, kind = line.get("key", "?"), line.get("type")
            if kind == "progress":
                data.progress.setdefault(key, []).append(line)
            elif kind == "result":
                data.results[key] = line
            elif kind == "error":
                data.results[key] = {"error": line.get("error")}
            for h in line.get("history") or ():
                if h[1] is not None:
                    hist.setdefault(key, {})[float(h[0])] = float(h[1])
            for ev in line.get("events") or ():
                events.setdefault(key, {})[(ev.get("kind"), ev.get("t"), ev.get("label"))] = ev
    if rfile.exists():
        doc = orjson.loads(rfile.read_bytes())
        for key, res in (doc.get("runs") or {}).items():
            data.results.setdefault(key, res)
            for h in res.get("history") or ():
                if h[1] is not None:
                    hist.setdefault(key, {})[float(h[0])] = float(h[1])
    for lines in data.progress.values():
        lines.sort(key=lambda ln: ln.get("t") or 0)
    data.history = {k: sorted(v.items()) for k, v in hist.items()}
    data.events = {k: sorted(v.values(), key=lambda e: e.get("t") or 0) for k, v in events.items()}
    return data
