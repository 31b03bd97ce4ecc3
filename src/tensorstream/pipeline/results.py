"""What a run reports: live progress, the final result, and the counters behind them."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: how many latency samples are kept for percentiles (a ring buffer)
LATENCY_RING = 100_000


@dataclass
class Progress:
    """A live snapshot, handed to ``on_progress`` about once a second."""

    backend: str
    records: int
    records_per_s: float
    lag: int | None
    metrics: dict[str, float]
    elapsed_s: float
    model_version: str = ""
    # for the live views (observe/): recent history points, events, latency, loss
    pipeline: str = ""
    history: list[tuple[int, float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    loss: float | None = None


@dataclass
class RunResult:
    backend: str
    records: int
    predictions: int
    bad: int
    seconds: float
    records_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    peak_rss_mb: float
    metrics: dict[str, float]
    #: (records scored, windowed accuracy or MAE) for plots
    history: list[tuple[int, float]] = field(default_factory=list)
    model_version: str = ""
    checkpoints: int = 0
    last_checkpoint: str | None = None
    versions_seen: list[str] = field(default_factory=list)
    #: the first dead letter's reason (``topic[partition]@offset: error_type: message``)
    first_bad: str | None = None
    #: the spec's mode (infer: ``metrics`` are the loaded model's, from its training)
    mode: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RunCounters:
    """Records, predictions and dead letters of a run, rates, and a latency ring buffer."""

    def __init__(self) -> None:
        self.records = 0
        self.predictions = 0
        self.bad = 0
        self.t_first: float | None = None  # first record: rates exclude the group join
        self._latencies = np.zeros(LATENCY_RING, dtype=np.float64)
        self._n_lat = 0

    def started(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def note_latency(self, seconds: float, n: int) -> None:
        """One latency sample per record (hand-over to prediction queued), into the ring buffer."""
        n = min(n, LATENCY_RING)
        start = self._n_lat % LATENCY_RING
        end = start + n
        if end <= LATENCY_RING:
            self._latencies[start:end] = seconds
        else:
            self._latencies[start:] = seconds
            self._latencies[: end - LATENCY_RING] = seconds
        self._n_lat += n

    def rate(self) -> float:
        if self.t_first is None:
            return 0.0
        return self.records / max(time.perf_counter() - self.t_first, 1e-9)

    def latencies_ms(self) -> np.ndarray:
        """The per-record latency samples kept (the last ``LATENCY_RING``), in ms."""
        return self._latencies[: min(self._n_lat, LATENCY_RING)] * 1000

    def latency_percentiles_ms(self) -> tuple[float | None, float | None]:
        lat = self.latencies_ms()
        if not len(lat):
            return None, None
        return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
