"""Prometheus metrics of one pipeline, on its own registry.

:class:`PipelineMetrics` owns one :class:`~prometheus_client.CollectorRegistry`
per pipeline (tests run many pipelines in one process; a global registry would
refuse the second one) and, only when asked (``serve(port)``), an HTTP server
that answers ``GET /metrics`` in the Prometheus text format.

Two kinds of calls:

- **hot path** (every batch): ``on_batch``, ``on_learn``, ``on_predictions``,
  ``on_dead_letter``: counter increments and histogram observes, nothing else
  (about a microsecond each);
- **once a second** (the runner's progress tick): :meth:`tick` sets the gauges
  (consumer lag per partition, prequential metrics, model version) and returns
  the fields the live views need.

Hooks for the other parts: :meth:`drift_detected`, :meth:`checkpoint_written`
(or ``with metrics.checkpoint_timer():``) and :meth:`model_version_changed`.

Consumer lag is computed from the high watermarks librdkafka already caches from
fetch responses (``get_watermark_offsets(cached=True)``) minus the consumer's
position: no extra request, no ``statistics.interval.ms`` JSON to parse every
interval on the poll thread, and the same number the runner's ``Progress.lag``
reports (on the embedded broker the fetch-reported watermark is also the right
one, see the README's known limits).

>>> m = PipelineMetrics("demo", "torch")
>>> m.on_predictions(3); m.on_dead_letter("decode_error")
>>> m.value("tensorstream_predictions_total"), m.value("tensorstream_dead_letters_total", error_type="decode_error")
(3.0, 1.0)
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)

LABELS = ("pipeline", "backend")

#: seconds: from half a millisecond (one small batch) to minutes (a replayed backlog)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096 records
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: every metric this module defines: (name as scraped, type, extra labels, help)
METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("tensorstream_records_in_total", "counter", (), "Records consumed from the source topic."),
    ("tensorstream_predictions_total", "counter", (), "Predictions produced to the sink topic."),
    ("tensorstream_records_learned_total", "counter", (), "Records learned (test-then-train)."),
    ("tensorstream_dead_letters_total", "counter", ("error_type",), "Records sent to the dead-letter topic."),
    ("tensorstream_consumer_lag_records", "gauge", ("topic", "partition"),
     "High watermark minus the consumer's position, per assigned partition."),
    ("tensorstream_assigned_partitions", "gauge", (), "Partitions currently assigned to this worker."),
    ("tensorstream_batch_size_records", "histogram", (), "Records per micro-batch."),
    ("tensorstream_batch_latency_seconds", "histogram", (), "Time to process one micro-batch (decode to "
                                                             "predictions queued)."),
    ("tensorstream_end_to_end_latency_seconds", "histogram", (), "Record timestamp to its prediction being queued."),
    ("tensorstream_train_loss", "gauge", (), "Loss of the last train step."),
    ("tensorstream_prequential_metric", "gauge", ("metric", "scope"),
     "Prequential (test-then-train) metric; scope=overall or window."),
    ("tensorstream_model_info", "info", ("version",), "The model version serving now."),
    ("tensorstream_model_version_changes_total", "counter", ("reason",), "Model versions taken (hot-swap, "
                                                                         "promotion)."),
    ("tensorstream_drift_events_total", "counter", ("detector",), "Concept-drift detections."),
    ("tensorstream_checkpoints_total", "counter", (), "Checkpoints written."),
    ("tensorstream_checkpoint_duration_seconds", "histogram", (), "Time to write one checkpoint (durable)."),
    ("tensorstream_commits_total", "counter", (), "Offset commits (each after the outputs it covers were delivered)."),
    ("tensorstream_commit_duration_seconds", "histogram", (), "One synchronous offset commit."),
    ("tensorstream_rebalances_total", "counter", ("kind",),
     "Partition revocations (kind=revoke): rebalances, and the member leaving at shutdown."),
)

#: recent events (drift, model versions, checkpoints) kept for the live views
EVENT_RING = 500
#: recent batches kept for the live latency percentiles
_LAT_RING = 2048


class BatchHistogram:
    """A Prometheus histogram fed a whole batch of observations at once.

    prometheus_client's ``Histogram`` observes one value per call (a lock and a
    bucket scan each): one call per record cost ~4 % of an inference pipeline.
    This keeps the bucket counts in numpy and is scraped through a custom
    collector, prometheus_client's documented extension point; the exposition
    is the same as a ``Histogram``'s (``_bucket{le=...}``, ``_sum``, ``_count``).

    >>> reg = CollectorRegistry()
    >>> h = BatchHistogram("demo_seconds", "Demo.", ("pipeline",), ("p",), (0.1, 1.0), reg)
    >>> h.observe_many(np.array([0.05, 0.5, 5.0]))
    >>> reg.get_sample_value("demo_seconds_bucket", {"pipeline": "p", "le": "1.0"})
    2.0
    >>> reg.get_sample_value("demo_seconds_count", {"pipeline": "p"})
    3.0
    """

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], labelvalues: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.doc = name, doc
        self._labelnames, self._labelvalues = list(labelnames), list(labelvalues)
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._bound_list = self._bounds.tolist()
        self._les = [floatToGoString(b) for b in self._bounds]
        self._counts = np.zeros(len(self._bounds) + 1, dtype=np.int64)  # last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_one(self, value: float) -> None:
        """One observation (cheaper than ``observe_many`` of one: no arrays)."""
        i = bisect.bisect_left(self._bound_list, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def observe_many(self, values: np.ndarray) -> None:
        if not len(values):
            return
        # bucket i counts values <= bound i (Prometheus "le"): the first bound >= the value
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def _family(self, with_samples: bool) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self._labelnames)
        if with_samples:
            with self._lock:
                cum, total = np.cumsum(self._counts), self._sum
            buckets = [(le, float(c)) for le, c in zip(self._les, cum[:-1], strict=True)]
            fam.add_metric(self._labelvalues, buckets=[*buckets, ("+Inf", float(cum[-1]))], sum_value=total)
        return fam

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield self._family(False)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        yield self._family(True)


class PipelineMetrics:
    """The metrics of one pipeline (labels ``pipeline``, ``backend``) on a private registry."""

    def __init__(self, pipeline: str, backend: str, *, registry: CollectorRegistry | None = None,
                 process_metrics: bool = True) -> None:
        self.pipeline = pipeline
        self.backend = backend
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_metrics:
            # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux /proc, read at scrape time)
            ProcessCollector(registry=self.registry)
        r, lv = self.registry, (pipeline, backend)
        self._families: dict[str, Any] = {}

        def fam(cls: type, name: str, extra: tuple[str, ...] = (), **kw: Any) -> Any:
            doc = next(h for n, _, _, h in METRICS if n.removesuffix("_total").removesuffix("_info") == name)
            m = cls(name, doc, (*LABELS, *extra), registry=r, **kw)
            self._families[name] = m
            return m

        self.records_in = fam(Counter, "tensorstream_records_in").labels(*lv)
        self.predictions = fam(Counter, "tensorstream_predictions").labels(*lv)
        self.learned = fam(Counter, "tensorstream_records_learned").labels(*lv)
        self._dlq = fam(Counter, "tensorstream_dead_letters", ("error_type",))
        self._lag = fam(Gauge, "tensorstream_consumer_lag_records", ("topic", "partition"))
        self.assigned = fam(Gauge, "tensorstream_assigned_partitions").labels(*lv)
        self.batch_size = fam(Histogram, "tensorstream_batch_size_records", buckets=BATCH_BUCKETS).labels(*lv)
        self.batch_latency = fam(Histogram, "tensorstream_batch_latency_seconds", buckets=LATENCY_BUCKETS).labels(*lv)
        e2e = "tensorstream_end_to_end_latency_seconds"
        self.e2e_latency = BatchHistogram(e2e, next(h for n, _, _, h in METRICS if n == e2e), LABELS, lv,
                                          LATENCY_BUCKETS, r)
        self._families[e2e] = self.e2e_latency
        self.train_loss = fam(Gauge, "tensorstream_train_loss").labels(*lv)
        self._preq = fam(Gauge, "tensorstream_prequential_metric", ("metric", "scope"))
        self._model = fam(Info, "tensorstream_model").labels(*lv)
        self._version_changes = fam(Counter, "tensorstream_model_version_changes", ("reason",))
        self._drift = fam(Counter, "tensorstream_drift_events", ("detector",))
        self.checkpoints = fam(Counter, "tensorstream_checkpoints").labels(*lv)
        self.checkpoint_duration = fam(Histogram, "tensorstream_checkpoint_duration_seconds",
                                       buckets=CHECKPOINT_BUCKETS).labels(*lv)
        self.commits = fam(Counter, "tensorstream_commits").labels(*lv)
        self.commit_duration = fam(Histogram, "tensorstream_commit_duration_seconds",
                                   buckets=LATENCY_BUCKETS).labels(*lv)
        self._rebalances = fam(Counter, "tensorstream_rebalances", ("kind",))
        self.train_loss.set(float("nan"))

        self._children: dict[tuple[str, str], Any] = {}  # labelled children, looked up once
        self._lag_tps: set[tuple[str, int]] = set()
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENT_RING)
        self._events_lock = threading.Lock()
        self.n_in = 0  # plain counts for the live views (the registry is for scrapes)
        self.last_loss: float | None = None
        self._lat = np.zeros((_LAT_RING, 2))  # (batch seconds, records) of recent batches
        self._n_batches = 0
        self._version: str | None = None
        self._seen_checkpoints = 0
        self._seen_swaps = 0
        self._server: Any = None
        self.url: str | None = None

    # -- hot path: counters and histograms only -----------------------------
    def on_batch(self, batch: Sequence[Any], seconds: float) -> None:
        """A micro-batch was processed (``batch``: records with ``timestamp_ms``)."""
        n = len(batch)
        self.n_in += n
        self.records_in.inc(n)
        self.batch_size.observe(n)
        self.batch_latency.observe(seconds)
        self._lat[self._n_batches % _LAT_RING] = (seconds, n)
        self._n_batches += 1
        now_ms = time.time() * 1000.0
        if n <= 4:  # small batches (low load, batch 1): numpy's per-call cost would dominate
            for rec in batch:
                if rec.timestamp_ms:  # records without a timestamp are not counted
                    self.e2e_latency.observe_one(max(0.0, now_ms - rec.timestamp_ms) / 1000.0)
            return
        ts = np.fromiter((rec.timestamp_ms or 0 for rec in batch), dtype=np.float64, count=n)
        ts = ts[ts > 0]  # records without a timestamp are not counted
        self.e2e_latency.observe_many(np.maximum(0.0, now_ms - ts) / 1000.0)

    def on_learn(self, n_learned: int, loss: float | None) -> None:
        if n_learned:
            self.learned.inc(n_learned)
        if loss is not None:
            self.last_loss = loss
            self.train_loss.set(loss)

    def on_predictions(self, n: int) -> None:
        if n:
            self.predictions.inc(n)

    def on_dead_letter(self, error_type: str) -> None:
        self._child(self._dlq, "dlq", error_type).inc()

    def on_commit(self, seconds: float) -> None:
        self.commits.inc()
        self.commit_duration.observe(seconds)

    def on_rebalance(self, kind: str = "revoke", partitions: Sequence[Any] = ()) -> None:
        # A counter only, no chart marker: closing the consumer revokes too (the group sees a member leave).
        self._child(self._rebalances, "rebalance", kind).inc()

    def _child(self, family: Any, ns: str, value: str) -> Any:
        key = (ns, value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(self.pipeline, self.backend, value)
        return child

    # -- hooks for other parts ---------------------------------------------
    def event(self, kind: str, label: str = "", *, records: int | None = None, **extra: Any) -> dict[str, Any]:
        """Record a marker for the live views (``kind``: drift, model_version, checkpoint)."""
        ev = {"kind": kind, "label": label, "records": self.n_in if records is None else int(records),
              "t": time.time(), **extra}
        with self._events_lock:
            self._events.append(ev)
        return ev

    def drift_detected(self, detector: str = "drift", *, records: int | None = None, detail: str = "") -> None:
        """A drift detector fired: counts ``tensorstream_drift_events_total`` and marks the charts."""
        self._child(self._drift, "drift", detector).inc()
        self.event("drift", detail or detector, records=records, detector=detector)

    def checkpoint_written(self, seconds: float, checkpoint_id: str | None = None) -> None:
        """A checkpoint is durable: its duration goes to ``tensorstream_checkpoint_duration_seconds``."""
        self.checkpoints.inc()
        self.checkpoint_duration.observe(seconds)
        self._seen_checkpoints += 1
        self.event("checkpoint", checkpoint_id or "")

    @contextmanager
    def checkpoint_timer(self, checkpoint_id: str | None = None) -> Iterator[None]:
        """``with metrics.checkpoint_timer(): store.save(...)`` (not counted when it raises)."""
        t = time.perf_counter()
        yield
        self.checkpoint_written(time.perf_counter() - t, checkpoint_id)

    def model_version_changed(self, version: str, *, reason: str = "swap", records: int | None = None) -> None:
        """A new model version serves from now on (``reason``: swap, promote, load)."""
        if version == self._version:
            return
        self._model.info({"version": version})
        if self._version is not None:
            self._child(self._version_changes, "version", reason).inc()
            self.event("model_version", version, records=records, reason=reason)
        self._version = version

    # -- once a second ------------------------------------------------------
    def tick(self, pipe: Any) -> dict[str, Any]:
        """Refresh the gauges from a running :class:`~tensorstream.pipeline.Pipeline`; return the
        extra :class:`~tensorstream.pipeline.Progress` fields (history tail, events, latency, loss)."""
        learner = pipe.learner
        snap = learner.snapshot()
        metrics = getattr(learner, "metrics", None)
        if metrics is not None:
            for name in metrics.names:
                for scope, key in (("overall", name), ("window", f"{name}_window")):
                    if key in snap:
                        self._child2(self._preq, name, scope).set(snap[key])
        self._sync_pipeline(pipe)
        self._update_lag(getattr(pipe, "source", None))
        p50, p99 = self.recent_latency_ms()
        history = metrics.history[-200:] if metrics is not None else []
        return {"pipeline": self.pipeline, "history": [tuple(h) for h in history], "events": self.recent_events(),
                "latency_p50_ms": p50, "latency_p99_ms": p99, "loss": self.last_loss}

    def _child2(self, family: Any, a: str, b: str) -> Any:
        key = ("2", f"{id(family)}/{a}/{b}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(self.pipeline, self.backend, a, b)
        return child

    def _sync_pipeline(self, pipe: Any) -> None:
        """Pick up what the pipeline counts itself (checkpoints, hot-swaps) when no hook reported it."""
        version = getattr(pipe, "model_version", None)
        swaps = len(getattr(pipe, "versions_seen", ()) or ())
        if version and (self._version is None or swaps > self._seen_swaps):
            self.model_version_changed(version, reason="swap" if self._version is not None else "load")
        self._seen_swaps = swaps
        n_ckpt = int(getattr(pipe, "checkpoints", 0) or 0)
        if n_ckpt > self._seen_checkpoints:  # written without the hook: count it, no duration known
            self.checkpoints.inc(n_ckpt - self._seen_checkpoints)
            self.event("checkpoint", getattr(pipe, "last_checkpoint", None) or "")
            self._seen_checkpoints = n_ckpt

    def _update_lag(self, source: Any) -> None:
        tps = set(getattr(source, "assigned", ()) or ()) if source is not None else set()
        self.assigned.set(len(tps))
        for t, p in self._lag_tps - tps:  # revoked: drop the series instead of freezing it
            try:
                self._lag.remove(self.pipeline, self.backend, t, str(p))
            except KeyError:
                pass
        self._lag_tps = tps
        if not tps:
            return
        for (t, p), lag in partition_lags(source).items():
            self._lag.labels(self.pipeline, self.backend, t, str(p)).set(lag)

    # -- reading ------------------------------------------------------------
    def recent_events(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._events_lock:
            return list(self._events)[-limit:]

    def recent_latency_ms(self) -> tuple[float | None, float | None]:
        """Per-record latency p50 / p99 over the last batches (each batch weighs its records)."""
        k = min(self._n_batches, _LAT_RING)
        if not k:
            return None, None
        lat, w = self._lat[:k, 0], self._lat[:k, 1]
        order = np.argsort(lat)
        cum = np.cumsum(w[order])
        total = cum[-1]
        if total <= 0:
            return None, None
        p50 = lat[order][np.searchsorted(cum, 0.5 * total)] * 1000
        p99 = lat[order][min(np.searchsorted(cum, 0.99 * total), k - 1)] * 1000
        return float(p50), float(p99)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value (``pipeline``/``backend`` filled in), e.g. for tests."""
        return self.registry.get_sample_value(name, {"pipeline": self.pipeline, "backend": self.backend, **labels})

    # -- HTTP ---------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> str:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) from a daemon thread; returns the URL."""
        from prometheus_client import start_http_server

        if self._server is not None:
            return self.url or ""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{shown}:{server.server_port}/metrics"
        log.info("metrics of %s/%s at %s", self.pipeline, self.backend, self.url)
        return self.url

    def close(self) -> None:
        """Stop the HTTP server, if one runs."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def partition_lags(source: Any) -> dict[tuple[str, int], int]:
    """``{(topic, partition): lag}`` for the source's assigned partitions (cached watermarks, no request)."""
    from confluent_kafka import TopicPartition

    out: dict[tuple[str, int], int] = {}
    tps = sorted(getattr(source, "assigned", ()) or ())
    if not tps:  # also: a closed source (touching .consumer would open a new one)
        return out
    try:
        c = source.consumer
        positions = c.position([TopicPartition(t, p) for t, p in tps])
        for (t, p), pos in zip(tps, positions, strict=True):
            _lo, hi = c.get_watermark_offsets(TopicPartition(t, p), cached=True)
            if hi >= 0 and pos.offset >= 0:  # no position yet (nothing fetched): unknown, not zero
                out[(t, p)] = max(0, hi - pos.offset)
    except Exception:  # the client is closing or the group is rebalancing: skip this tick
        log.debug("lag unavailable", exc_info=True)
    return out
