"""Observability: Prometheus metrics, the live dashboard, run directories, plots and logs.

Nothing here sits on the hot path beyond counter increments and histogram
observes (:class:`~tensorstream.observe.metrics.PipelineMetrics`); the rest runs
once a second (progress) or after the run (plots).

- ``metrics``: :class:`PipelineMetrics` (per-pipeline registry, ``/metrics`` server)
- ``dashboard``: the live page (Starlette + uvicorn, uPlot bundled) and its feed
- ``rundir``: ``run --run-dir`` files (``metrics.jsonl``, ``result.json``)
- ``plots``: PNG plots from plain data (``tensorstream report``, ``tensorstream bench``)
- ``logging``: text or JSON log lines, quiet mode
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["Observers", "PipelineMetrics"]


def __getattr__(name: str) -> Any:  # lazy: the CLI imports observe.logging without prometheus/numpy
    if name == "PipelineMetrics":
        from tensorstream.observe.metrics import PipelineMetrics

        return PipelineMetrics
    raise AttributeError(name)


class Observers:
    """Where a command sends its runs' progress besides the terminal.

    ``dashboard=True`` starts the live page (``url``); ``run_dir`` records
    ``metrics.jsonl`` + ``result.json``; ``json_logs=True`` logs progress as JSON
    lines. Payloads are ``Progress`` / ``RunResult`` objects or their dicts (the
    demo's children send dicts), keyed ``"<pipeline>/<backend>"``.
    """

    def __init__(self, *, dashboard: bool = False, dashboard_port: int = 0, run_dir: str | Path | None = None,
                 json_logs: bool = False, title: str = "tensorstream") -> None:
        self.feed: Any = None
        self.server: Any = None
        self.recorder: Any = None
        self.json_logs = json_logs
        self._logs: dict[str, Any] = {}
        if dashboard:
            from tensorstream.observe.dashboard import DashboardFeed, DashboardServer

            self.feed = DashboardFeed(title)
            self.server = DashboardServer(self.feed, port=dashboard_port)
            self.server.start()
        if run_dir is not None:
            from tensorstream.observe.rundir import RunRecorder

            self.recorder = RunRecorder(run_dir)

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    def _log(self, key: str) -> Any:
        if key not in self._logs:
            from tensorstream.observe.logging import ProgressLog

            self._logs[key] = ProgressLog(key)
        return self._logs[key]

    def progress(self, key: str, payload: Any) -> None:
        d = payload if isinstance(payload, dict) else payload.__dict__
        if self.feed is not None:
            self.feed.update(key, d)
        if self.recorder is not None:
            self.recorder.progress(key, d)
        if self.json_logs:
            self._log(key)(d)

    def result(self, key: str, payload: Any) -> None:
        d = payload if isinstance(payload, dict) else payload.to_dict()
        if self.feed is not None:
            self.feed.result(key, d)
        if self.recorder is not None:
            self.recorder.result(key, d)
        if self.json_logs:
            self._log(key).result(d)

    def error(self, key: str, message: str) -> None:
        if self.feed is not None:
            self.feed.error(key, message)
        if self.recorder is not None:
            self.recorder.error(key, message)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.recorder is not None:
            self.recorder.close()

    def __enter__(self) -> Observers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
