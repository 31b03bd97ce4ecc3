"""Wire the parts: topic -> decode -> learner / predictor -> predictions topic.

The runner owns the loop and the commit order, nothing else: decoding is in
``codecs``, features and test-then-train in ``learn``, the model in
``backends``. Order per commit (learned from Quix Streams' checkpoint): flush the
predictions and the dead letters (delivery confirmed) -> commit the source
offsets. A processing error never advances offsets.

>>> from tensorstream.pipeline import Pipeline                        # doctest: +SKIP
>>> result = Pipeline(spec, kafka_config).run(until_end=True)          # doctest: +SKIP
>>> result.metrics["accuracy"]                                         # doctest: +SKIP
0.89
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from tensorstream.backends import make_backend
from tensorstream.checkpoint import StateFileError, load_state, save_state
from tensorstream.codecs import DecodeError, get_codec
from tensorstream.kafka import TP, KafkaAdmin, KafkaConfig, KafkaSink, KafkaSource, Record
from tensorstream.learn import OnlineLearner
from tensorstream.spec import PipelineSpec

log = logging.getLogger(__name__)

#: how many latency samples are kept for percentiles (a ring buffer)
_LATENCY_RING = 100_000


@dataclass
class Progress:
    """A live snapshot, handed to ``on_progress`` about once a second."""

    backend: str
    records: int
    records_per_s: float
    lag: int | None
    metrics: dict[str, float]
    elapsed_s: float


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _dlq_headers(rec: Record, error_type: str, message: str) -> list[tuple[str, bytes]]:
    return [
        *(rec.headers or []),
        ("error.type", error_type.encode()),
        ("error.message", message.encode()[:4096]),
        ("source.topic", rec.topic.encode()),
        ("source.partition", str(rec.partition).encode()),
        ("source.offset", str(rec.offset).encode()),
    ]


class Pipeline:
    """One pipeline spec, running against a broker.

    ``run()`` processes micro-batches until a stop condition: ``max_records``
    processed, ``until_end`` (every assigned partition read to its end),
    ``timeout`` seconds, or ``stop()`` called from another thread / a signal.
    """

    def __init__(self, spec: PipelineSpec, kafka: KafkaConfig, *,
                 on_progress: Callable[[Progress], None] | None = None,
                 commit_interval_s: float = 0.5):
        self.spec = spec
        self.kafka = kafka
        self.on_progress = on_progress
        self.commit_interval_s = commit_interval_s
        self.codec = get_codec(spec.source.codec)
        self.backend = make_backend(spec.backend)
        self.learner = OnlineLearner(spec, self.backend)
        self.model_version = f"{spec.name}-{spec.backend}-live"
        if spec.model.weights:
            self._load_weights(spec.model.weights)
        self.dlq_topic = f"{spec.name}.dlq"
        self._stop = False
        self._latencies = np.zeros(_LATENCY_RING, dtype=np.float64)
        self._n_lat = 0
        self.records = 0
        self.predictions = 0
        self.bad = 0
        self._pending: dict[TP, int] = {}  # next offsets processed but not yet committed
        self._t_first: float | None = None  # first record: rates exclude the group join

    def stop(self) -> None:
        self._stop = True

    def _load_weights(self, url: str) -> None:
        state, meta = load_state(url)
        if meta.get("backend") and meta["backend"] != self.spec.backend:
            raise StateFileError(f"{url} holds a {meta['backend']} model; the spec's backend is {self.spec.backend}")
        self.learner.load_state_dict(state)
        self.model_version = meta.get("version") or f"{self.spec.name}-{self.spec.backend}-{meta.get('n_learned', '0')}"

    def save_state(self, url: str) -> None:
        """Write the learner's whole state (weights, optimizer, features) as safetensors."""
        n = str(self.learner.n_learned)
        save_state(url, self.learner.state_dict(), {
            "backend": self.spec.backend, "spec_hash": self.spec.spec_hash(), "n_learned": n,
            "version": f"{self.spec.name}-{self.spec.backend}-{n}",
        })

    # -- the loop ---------------------------------------------------------
    def run(self, *, max_records: int | None = None, until_end: bool = False, timeout: float | None = None,
            idle_timeout: float | None = None) -> RunResult:
        spec = self.spec
        admin = KafkaAdmin(self.kafka)
        admin.ensure_topic(spec.source.topic)
        if spec.sink is not None:
            admin.ensure_topic(spec.sink.topic)
        self.source = KafkaSource(self.kafka, spec.group_id, [spec.source.topic],
                                  auto_offset_reset=spec.source.auto_offset_reset, on_revoke=self._on_revoke)
        self.sink = KafkaSink(self.kafka)
        t0 = time.perf_counter()
        last_commit = last_progress = t0
        last_data = time.monotonic()
        max_wait = spec.batch.max_wait_ms / 1000
        try:
            while not self._stop:
                batch = self._next_batch(spec.batch.max_size, max_wait)
                now = time.perf_counter()
                if batch:
                    last_data = time.monotonic()
                    self._process(batch)
                if now - last_commit >= self.commit_interval_s:
                    self.commit()
                    last_commit = now
                if self.on_progress and now - last_progress >= 1.0:
                    self.on_progress(self._progress(t0))
                    last_progress = now
                if max_records is not None and self.records >= max_records:
                    break
                if timeout is not None and now - t0 > timeout:
                    break
                if until_end and not batch and self.source.assigned and self.source.at_eof >= self.source.assigned:
                    break
                if idle_timeout is not None and self.source.assigned and time.monotonic() - last_data > idle_timeout:
                    break
            self.commit()
        finally:
            self.source.close()
            self.sink.close()
        if self.on_progress:
            self.on_progress(self._progress(t0))
        return self._result(t0)

    def _next_batch(self, max_size: int, max_wait: float) -> list[Record]:
        """A micro-batch: closes at ``max_size`` records or ``max_wait`` after its first record."""
        batch = self.source.poll_batch(max_size, 0.1)
        if not batch or len(batch) >= max_size or max_wait <= 0:
            return batch
        deadline = time.monotonic() + max_wait
        while len(batch) < max_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            more = self.source.poll_batch(max_size - len(batch), left)
            if not more:
                break
            batch.extend(more)
        return batch

    def _process(self, batch: list[Record]) -> None:
        t_in = time.perf_counter()
        if self._t_first is None:
            self._t_first = t_in
        decoded: list[Any] = []
        keep: list[Record] = []
        for rec in batch:
            try:
                if rec.value is None:
                    raise DecodeError("empty record value (tombstone)")
                decoded.append(self.codec.decode(rec.value))
                keep.append(rec)
            except DecodeError as e:
                self._dead_letter(rec, "decode_error", str(e))
        if decoded:
            train = self.spec.mode in ("train", "train+infer")
            outcome = self.learner.process(decoded, train=True) if train else self.learner.predict(decoded)
            for b in outcome.bad:
                self._dead_letter(keep[b.index], b.error_type, b.message)
            if self.spec.sink is not None:
                self._emit(keep, outcome.predictions)
        self.records += len(batch)
        for rec in batch:
            self._pending[(rec.topic, rec.partition)] = rec.offset + 1
        lat = time.perf_counter() - t_in
        # One latency sample per record: the time from hand-over to the prediction being queued.
        for _ in range(len(batch)):
            self._latencies[self._n_lat % _LATENCY_RING] = lat
            self._n_lat += 1

    def _emit(self, recs: list[Record], predictions: list[dict[str, Any] | None]) -> None:
        topic = self.spec.sink.topic  # type: ignore[union-attr]
        version = self.model_version.encode()
        for rec, pred in zip(recs, predictions, strict=True):
            if pred is None:
                continue
            value = orjson.dumps({
                **pred, "model_version": self.model_version,
                "source": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            }, option=orjson.OPT_SERIALIZE_NUMPY)
            headers = [
                ("model.version", version),
                ("source.topic", rec.topic.encode()),
                ("source.partition", str(rec.partition).encode()),
                ("source.offset", str(rec.offset).encode()),
            ]
            if rec.timestamp_ms:
                headers.append(("event.timestamp.ms", str(rec.timestamp_ms).encode()))
            self.sink.produce(topic, value, key=rec.key, headers=headers, timestamp_ms=rec.timestamp_ms or 0)
            self.predictions += 1
        self.sink.poll(0)

    def _dead_letter(self, rec: Record, error_type: str, message: str) -> None:
        self.bad += 1
        log.debug("dead letter %s[%d]@%d: %s: %s", rec.topic, rec.partition, rec.offset, error_type, message)
        self.sink.produce(self.dlq_topic, rec.value, key=rec.key, headers=_dlq_headers(rec, error_type, message))

    # -- offsets ----------------------------------------------------------
    def commit(self) -> None:
        """Flush outputs (delivery confirmed), then commit the offsets they cover."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self.sink.flush()  # raises DeliveryError: then nothing is committed
        self.source.commit(pending)

    def _on_revoke(self, tps: list[TP]) -> None:
        # Commit what is durable for the partitions we lose, before the group moves them.
        try:
            self.commit()
        except Exception:  # pragma: no cover - logged, the uncommitted window is replayed
            log.exception("commit on revoke failed; the uncommitted window will be re-processed")

    # -- reporting --------------------------------------------------------
    def _lag(self) -> int | None:
        try:
            c = self.source.consumer
            from confluent_kafka import TopicPartition

            total = 0
            for t, p in self.source.assigned:
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), cached=True)
                pos = c.position([TopicPartition(t, p)])[0].offset
                if hi >= 0 and pos >= 0:
                    total += max(0, hi - pos)
            return total
        except Exception:
            return None

    def _rate(self) -> float:
        if self._t_first is None:
            return 0.0
        return self.records / max(time.perf_counter() - self._t_first, 1e-9)

    def _progress(self, t0: float) -> Progress:
        return Progress(self.spec.backend, self.records, self._rate(), self._lag(),
                        self.learner.snapshot(), time.perf_counter() - t0)

    def _result(self, t0: float) -> RunResult:
        el = time.perf_counter() - t0
        lat = self._latencies[: min(self._n_lat, _LATENCY_RING)] * 1000
        p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if len(lat) else (None, None)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return RunResult(self.spec.backend, self.records, self.predictions, self.bad, el, self._rate(), p50, p99, rss, self.learner.snapshot(),
                         self.learner.history, self.model_version)
