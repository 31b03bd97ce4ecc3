"""Wire the parts: topic -> decode -> learner / predictor -> predictions topic.

The runner owns the loop and the commit order, nothing else: decoding is in
``codecs``, features and test-then-train in ``learn``, the model in
``backends``, durable state in ``checkpoint``. The order (learned from Quix
Streams' checkpoint) is always: flush the outputs (delivery confirmed) ->
persist the state -> commit the source offsets. A processing error never
advances offsets.

- **Inference** (``mode: infer``): offsets are committed every
  ``commit_interval_s`` once the predictions they cover are delivered
  (at-least-once; the uncommitted window is re-emitted after a crash).
- **Training** (``train``, ``train+infer``): offsets are committed only after a
  checkpoint that includes those records is durable; on restart the learner
  loads the newest good checkpoint and the consumer seeks to the offsets stored
  *in it*, so the persisted lineage learns every record exactly once.

>>> from tensorstream.pipeline import Pipeline                        # doctest: +SKIP
>>> result = Pipeline(spec, kafka_config).run(until_end=True)          # doctest: +SKIP
>>> result.metrics["accuracy"]                                         # doctest: +SKIP
0.89
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from safetensors.numpy import load as st_load

from tensorstream.backends import make_backend
from tensorstream.checkpoint import CheckpointError, CheckpointStore, StateFileError, load_state, save_state
from tensorstream.checkpoint.versions import ModelRegistry, ModelVersionError, ModelWatcher, resolve_key
from tensorstream.codecs import DecodeError, get_codec
from tensorstream.kafka import (
    TP,
    KafkaAdmin,
    KafkaConfig,
    KafkaSink,
    KafkaSource,
    Record,
)
from tensorstream.learn import OnlineLearner
from tensorstream.pipeline.batching import IDLE_POLL_S, next_batch
from tensorstream.observe.metrics import PipelineMetrics
from tensorstream.pipeline.distributed import DistributedTrainer
from tensorstream.pipeline.distributed import resolve as resolve_distributed
from tensorstream.spec import PipelineSpec

log = logging.getLogger(__name__)

#: how many latency samples are kept for percentiles (a ring buffer)
_LATENCY_RING = 100_000


class PipelineError(RuntimeError):
    """The pipeline stopped on purpose (e.g. too many bad records): nothing past it was committed."""


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
    ``timeout`` seconds, or ``stop()`` called from another thread / a signal
    handler; then it checkpoints (training), commits and closes.
    """

    def __init__(self, spec: PipelineSpec, kafka: KafkaConfig, *,
                 on_progress: Callable[[Progress], None] | None = None,
                 commit_interval_s: float = 0.5, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1"):
        self.spec = spec
        self.kafka = kafka
        self.on_progress = on_progress
        self.commit_interval_s = commit_interval_s
        self.codec = get_codec(spec.source.codec, **spec.source.codec_options())
        self.sink_codec = None  # predictions as JSON; Avro (Confluent wire format) when the sink asks for it
        if spec.sink is not None and spec.sink.format == "avro-registry":
            from tensorstream.codecs.avro import PREDICTION_SCHEMA

            self.sink_codec = get_codec("avro-registry", writer_schema=PREDICTION_SCHEMA, **spec.sink.codec_options())
        # One rank of a data-parallel job when a world size > 1 is set (pipeline/distributed.py):
        # the engine's backend, joined to the job before anything is built or restored.
        dist_ctx = resolve_distributed(spec)
        self.backend = make_backend(dist_ctx.backend_name if dist_ctx else spec.backend)
        self.learner = OnlineLearner(spec, self.backend)
        self.distributed = DistributedTrainer(self, dist_ctx) if dist_ctx else None
        self.obs = PipelineMetrics(spec.name, spec.backend)  # Prometheus; /metrics served only with a port
        if metrics_port is not None:
            self.obs.serve(metrics_port, metrics_host)
        self.dlq_topic = f"{spec.name}.dlq"
        # Drift / champion-challenger events (JSON, keyed by pipeline name): see docs/drift.md.
        self.events_topic = f"{spec.name}.events"
        self.drift_events: list[dict[str, Any]] = []  # the events this run wrote there
        self._promotion_pending = False  # a challenger won: checkpoint (and announce) it next
        # Delayed labels: a second topic, joined by key in the learner (learn/delayed.py).
        self.labels_codec = get_codec("json") if spec.labels is not None else None
        # Records read but not yet released to the join, per side, and the released queue.
        self._held: dict[TP, deque[Record]] = {}
        self._held_next: dict[TP, int] = {}
        self._ready: deque[Record] = deque()
        self._paused: set[TP] = set()
        self._stop = False
        self._latencies = np.zeros(_LATENCY_RING, dtype=np.float64)
        self._n_lat = 0
        self.records = 0
        self.predictions = 0
        self.bad = 0
        self._recent_bad: deque[tuple[int, int]] = deque()  # (records, bad) per batch, for the DLQ rate
        self._positions: dict[TP, int] = {}  # next offset after the last processed record, per partition
        self._pending: dict[TP, int] = {}  # processed, not yet committed
        self._t_first: float | None = None  # first record: rates exclude the group join
        self.checkpoints = 0
        self.versions_seen: list[str] = []
        self.rejected_versions = 0
        self._watcher: ModelWatcher | None = None
        self._registry: ModelRegistry | None = None
        self.model_version = f"{spec.name}-{spec.backend}-live"
        self.store: CheckpointStore | None = None
        self.last_checkpoint: str | None = None
        self._ckpt_offsets: dict[TP, int] = {}
        if spec.model.weights:
            self._load_weights(spec.model.weights)
        if spec.trains:
            self.store = CheckpointStore(spec.checkpoint_url, keep_last=spec.checkpoint.keep_last)
            self._restore()
        self._ckpt_n = self.learner.n_learned
        self._ckpt_t = time.monotonic()

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand, checkpoint, commit and return."""
        self._stop = True

    # -- state ------------------------------------------------------------
    def _load_weights(self, url: str) -> None:
        state, meta = load_state(url)
        if meta.get("backend") and meta["backend"] != self.spec.backend:
            raise StateFileError(f"{url} holds a {meta['backend']} model; the spec's backend is {self.spec.backend}")
        self.learner.load_state_dict(state)
        self.model_version = meta.get("version") or f"{self.spec.name}-{self.spec.backend}-{meta.get('n_learned', '0')}"

    def _restore(self) -> None:
        assert self.store is not None
        found = self.store.latest()
        if self.distributed is not None:  # every rank resumes from the same checkpoint
            found = self.distributed.agree_on_checkpoint(found)
        if found is None:
            return
        state, info = found
        if info.spec_hash != self.spec.spec_hash():
            raise CheckpointError(
                f"checkpoint {info.id} in {self.spec.checkpoint_url} was written for another model/feature spec "
                f"(hash {info.spec_hash}, this spec {self.spec.spec_hash()}); use another state_dir or pipeline name")
        self.learner.load_state_dict(state)
        self._ckpt_offsets = dict(info.offsets)
        self._positions = dict(info.offsets)
        self.last_checkpoint = info.id
        log.info("restored checkpoint %s: %d records learned; resuming from %s", info.id, info.n_learned,
                 info.offsets)

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
        if self.distributed is not None:  # partitions split by rank, steps in lock-step, rank 0 checkpoints
            return self.distributed.run(max_records=max_records, until_end=until_end, timeout=timeout,
                                        idle_timeout=idle_timeout)
        spec = self.spec
        admin = KafkaAdmin(self.kafka)
        admin.ensure_topic(spec.source.topic)
        if spec.sink is not None:
            admin.ensure_topic(spec.sink.topic)
        if spec.labels is not None:
            admin.ensure_topic(spec.labels.topic)
        if self.learner.drift.enabled:
            admin.ensure_topic(self.events_topic)
        self.source = KafkaSource(self.kafka, spec.group_id,
                                  [spec.source.topic, *([spec.labels.topic] if spec.labels is not None else [])],
                                  auto_offset_reset=spec.source.auto_offset_reset, on_revoke=self._on_revoke,
                                  start_offsets=self._ckpt_offsets.get if spec.trains else None,
                                  **_fetch_wait(spec.source.fetch_wait_ms, self.kafka))
        self.sink = KafkaSink(self.kafka, transactional_id=(
            f"tensorstream.{spec.name}.{spec.group_id}" if spec.exactly_once else None))
        self._in_txn = False
        self._open_versions()
        t0 = time.perf_counter()
        last_commit = last_progress = t0
        last_data = time.monotonic()
        max_wait = spec.batch.max_wait_ms / 1000
        try:
            while not self._stop:
                self._maybe_swap()
                batch = self._next_batch(spec.batch.max_size, max_wait)
                now = time.perf_counter()
                if batch:
                    last_data = time.monotonic()
                    self._process(batch)
                if spec.trains and self._checkpoint_due():
                    self.checkpoint()
                elif now - last_commit >= self.commit_interval_s:
                    if spec.trains:
                        # Training commits offsets only with a durable checkpoint; meanwhile
                        # just push the predictions out (latency), committing nothing.
                        self.sink.poll(0)
                    else:
                        self.commit()
                    last_commit = now
                if now - last_progress >= 1.0:
                    progress = self._progress(t0)  # also refreshes the metrics' gauges (lag, prequential)
                    if self.on_progress:
                        self.on_progress(progress)
                    last_progress = now
                if max_records is not None and self.records >= max_records:
                    break
                if timeout is not None and now - t0 > timeout:
                    break
                if until_end and not batch and self.source.at_end:
                    break
                if idle_timeout is not None and self.source.assigned and time.monotonic() - last_data > idle_timeout:
                    break
            # Graceful end (stop(), SIGTERM, a stop condition): persist, then commit.
            if spec.trains:
                self.checkpoint(force=False)
            else:
                self.commit()
        finally:
            self.source.close()
            self.sink.close()
            for c in (self._watcher, self._registry):
                if c is not None:
                    c.close()
        progress = self._progress(t0)  # the final gauges too
        if self.on_progress:
            self.on_progress(progress)
        return self._result(t0)

    def _next_batch(self, max_size: int, max_wait: float) -> list[Record]:
        """A micro-batch: closes at ``max_size`` records, ``max_wait`` after its first
        record, or at the end of the data (so a fixed-size batching is reproducible)."""
        if self.spec.labels is not None:
            return self._next_merged(max_size, max_wait)
        return next_batch(self.source, max_size, max_wait, lambda: self._stop)

    def _process(self, batch: list[Record]) -> None:
        if len(self.source.assigned) < len({(r.topic, r.partition) for r in batch} | self.source.assigned):
            # A rebalance took partitions away while this batch was being gathered: their new
            # owner starts from our last commit, so leave those records to it (no duplicates).
            batch = [r for r in batch if (r.topic, r.partition) in self.source.assigned]
            if not batch:
                return
        t_in = time.perf_counter()
        if self.sink.transactional and not self._in_txn:
            self.sink.begin()
            self._in_txn = True
        if self._t_first is None:
            self._t_first = t_in
        decoded: list[Any] = []
        keep: list[Record] = []
        n_bad = 0
        label_recs: list[Record] = []
        features_batch = batch
        if self.spec.labels is not None:  # one consumer reads both topics: route by topic
            label_recs = [r for r in batch if r.topic == self.spec.labels.topic]
            features_batch = [r for r in batch if r.topic != self.spec.labels.topic]
        for rec in features_batch:
            try:
                if rec.value is None:
                    raise DecodeError("empty record value (tombstone)")
                decoded.append(self.codec.decode(rec.value))
                keep.append(rec)
            except DecodeError as e:
                self._dead_letter(rec, "decode_error", str(e))
                n_bad += 1
        if decoded:
            version = self._version_for_batch()
            if self.spec.labels is not None:  # predict now, learn when the label comes
                kf = self.spec.labels.key_field
                keys = [r.key if kf is None else (d.get(kf) if isinstance(d, dict) else None)
                        for r, d in zip(keep, decoded, strict=True)]
                outcome = self.learner.process_features(decoded, keys, train=True)
            elif self.spec.trains:
                outcome = self.learner.process(decoded, train=True)
            else:
                outcome = self.learner.predict(decoded)
            self.obs.on_learn(outcome.n_learned, outcome.loss)
            self._write_events(outcome.events, keep, batch)
            for b in outcome.bad:
                self._dead_letter(keep[b.index], b.error_type, b.message)
            n_bad += len(outcome.bad)
            if self.spec.sink is not None:
                self._emit(keep, outcome.predictions, version)
        if label_recs:
            n_bad += self._process_labels(label_recs, batch)
        self.records += len(batch)
        # a partition's records come in offset order: its last one in the batch sets the position
        ends = {(rec.topic, rec.partition): rec.offset + 1 for rec in batch}
        self._positions.update(ends)
        self._pending.update(ends)
        lat = time.perf_counter() - t_in
        self.obs.on_batch(batch, lat)
        self._note_latency(lat, len(batch))
        self._check_dead_letter_rate(len(batch), n_bad)

    def _note_latency(self, seconds: float, n: int) -> None:
        """One latency sample per record (hand-over to prediction queued), into the ring buffer."""
        n = min(n, _LATENCY_RING)
        start = self._n_lat % _LATENCY_RING
        end = start + n
        if end <= _LATENCY_RING:
            self._latencies[start:end] = seconds
        else:
            self._latencies[start:] = seconds
            self._latencies[: end - _LATENCY_RING] = seconds
        self._n_lat += n

    def _version_for_batch(self) -> str:
        # A training model changes every batch: name it by what it has learned
        # (deterministic, and it says exactly which model made the prediction).
        if self.spec.trains:  # distributed: the records the whole job has learned
            n = self.distributed.n_learned if self.distributed is not None else self.learner.n_learned
            # "+g<k>": the k-th champion promoted from a challenger (drift.policy: challenger)
            gen = self.learner.generation
            return f"{self.spec.name}@{n}" + (f"+g{gen}" if gen else "")
        return self.model_version

    def _emit(self, recs: list[Record], predictions: list[dict[str, Any] | None], version: str) -> None:
        topic = self.spec.sink.topic  # type: ignore[union-attr]
        encode = (self.sink_codec.encode if self.sink_codec is not None
                  else lambda out: orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY))
        version_header = ("model.version", version.encode())
        per_tp: dict[TP, tuple[tuple[str, bytes], tuple[str, bytes]]] = {}  # headers shared by a partition's records
        out: list[tuple[bytes, bytes | None, list[tuple[str, bytes]], int]] = []
        for rec, pred in zip(recs, predictions, strict=True):
            if pred is None:
                continue
            value = encode({**pred, "model_version": version,
                            "source": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}})
            tp_headers = per_tp.get((rec.topic, rec.partition))
            if tp_headers is None:
                tp_headers = per_tp[(rec.topic, rec.partition)] = (
                    ("source.topic", rec.topic.encode()), ("source.partition", str(rec.partition).encode()))
            headers = [version_header, *tp_headers, ("source.offset", str(rec.offset).encode())]
            if rec.timestamp_ms:
                headers.append(("event.timestamp.ms", str(rec.timestamp_ms).encode()))
            out.append((value, rec.key, headers, rec.timestamp_ms or 0))
        self.sink.produce_many(topic, out)
        self.predictions += len(out)
        self.obs.on_predictions(len(out))
        self.sink.poll(0)

    def _next_merged(self, max_size: int, max_wait: float) -> list[Record]:
        """Delayed labels: a micro-batch of features and labels records in record-time order.

        From a backlog, one fetch can bring thousands of records of one topic
        before the other's; the join's state is bounded, so predictions would
        expire before their labels are read (or labels overflow before their
        features). As Kafka Streams does for joins, records are held per
        partition and released oldest first across partitions (by record
        timestamp; features first on a tie) while every partition has one to
        compare; a partition with nothing more to read (at its end) holds
        nothing back, so a live stream is not delayed. A partition holding
        ``labels.window`` records is paused until half of them are released.
        Held records are not processed, so their offsets are neither
        checkpointed nor committed (records produced within the same
        millisecond have no order to go by).
        """
        deadline = time.monotonic() + max_wait
        while len(self._ready) < max_size and not self._stop:
            got = self.source.poll_batch(max_size, 0)  # what is fetched already; else wait for one record
            if not got:
                wait = min(0.05, max(0.0, deadline - time.monotonic())) if self._ready else IDLE_POLL_S
                got = self.source.poll_batch(1, wait)
            self._ready.extend(self._release(got))
            if not got or time.monotonic() >= deadline:
                break
        return [self._ready.popleft() for _ in range(min(max_size, len(self._ready)))]

    def _release(self, recs: list[Record]) -> list[Record]:
        """Hold ``recs`` per partition; release, oldest first, what no partition can still precede."""
        assert self.spec.labels is not None
        held = self._held
        for rec in recs:
            tp = (rec.topic, rec.partition)
            if rec.offset < self._held_next.get(tp, -1):
                continue  # fetched again (after a rebalance): already held
            self._held_next[tp] = rec.offset + 1
            held.setdefault(tp, deque()).append(rec)
        labels_topic = self.spec.labels.topic
        out: list[Record] = []
        while True:
            heads = []
            for tp in self.source.assigned:
                q = held.get(tp)
                if q:  # features before labels on a tie: a label never waits for its own record's twin
                    heads.append(((q[0].timestamp_ms or 0), tp[0] == labels_topic, tp))
                elif tp not in self.source.at_eof:
                    heads = []  # an empty partition that may still hold older records: wait for it
                    break
            if not heads:
                break
            out.append(held[min(heads)[2]].popleft())
        cap = self.spec.labels.window
        for tp, q in held.items():
            if len(q) >= cap and tp not in self._paused and tp in self.source.assigned:
                self.source.pause([tp])  # librdkafka drops what it fetched for it; resume re-fetches
                self._paused.add(tp)
            elif len(q) <= cap // 2 and tp in self._paused:
                self.source.resume([tp])
                self._paused.discard(tp)
        return out

    def _drop_held(self, tps: list[TP]) -> None:
        """Revoked partitions: their held records are the new owner's (it reads from the commit)."""
        gone = set(tps)
        for tp in gone:
            self._held.pop(tp, None)
            self._held_next.pop(tp, None)
            self._paused.discard(tp)
        self._ready = deque(r for r in self._ready if (r.topic, r.partition) not in gone)

    def _process_labels(self, recs: list[Record], batch: list[Record]) -> int:
        """Delayed labels: decode, join to the waiting predictions, learn; returns the bad count."""
        assert self.spec.labels is not None and self.spec.label is not None and self.labels_codec is not None
        lspec = self.spec.labels
        field_name = lspec.field or self.spec.label.field
        keys: list[Any] = []
        values: list[Any] = []
        keep: list[Record] = []
        n_bad = 0
        for rec in recs:
            try:
                if rec.value is None:
                    raise DecodeError("empty record value (tombstone)")
                d = self.labels_codec.decode(rec.value)
                if not isinstance(d, dict) or field_name not in d:
                    self._dead_letter(rec, "missing_field", f"a label record needs the field {field_name!r}")
                    n_bad += 1
                    continue
            except DecodeError as e:
                self._dead_letter(rec, "decode_error", str(e))
                n_bad += 1
                continue
            keys.append(rec.key if lspec.key_field is None else d.get(lspec.key_field))
            values.append(d[field_name])
            keep.append(rec)
        if not keep:
            return n_bad
        outcome = self.learner.process_labels(keys, values, train=True)
        self.obs.on_learn(outcome.n_learned, outcome.loss)
        for b in outcome.bad:
            self._dead_letter(keep[b.index], b.error_type, b.message)
        self._write_events(outcome.events, keep, batch)
        return n_bad + len(outcome.bad)

    def _write_events(self, events: list[dict[str, Any]], recs: list[Record], batch: list[Record]) -> None:
        """Drift / challenger events -> ``<pipeline>.events``, stamped with the record that revealed them."""
        if not events:
            return
        pos = {id(r): i for i, r in enumerate(batch)}
        for ev in events:
            body = {k: v for k, v in ev.items() if k != "index"}
            rec = recs[ev["index"]] if 0 <= ev.get("index", -1) < len(recs) else None
            body.update(pipeline=self.spec.name, backend=self.spec.backend,
                        records=self.records + (pos.get(id(rec), len(batch) - 1) + 1 if rec else len(batch)),
                        model_version=self._version_for_batch())
            if rec is not None:
                body["source"] = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
            self.drift_events.append(body)
            self.sink.produce(self.events_topic, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                              key=self.spec.name.encode(),
                              headers=[("event.type", str(body["type"]).encode())])
            src = body.get("source", {})
            if body["type"] == "drift":
                log.warning("drift detected (%s) at %s[%s]@%s: %s %.4f -> %.4f", body["detector"], src.get("topic"),
                            src.get("partition"), src.get("offset"), body["metric"], body["before"], body["after"])
                hook = getattr(self.obs, "drift_detected", None)
                if hook is not None:
                    hook(body["detector"], records=body["records"],
                         detail=f"{body['metric']} {body['before']:.3f} -> {body['after']:.3f}")
            elif body["type"] == "promotion":
                self._promotion_pending = True
                hook = getattr(self.obs, "model_version_changed", None)
                if hook is not None:
                    hook(body["model_version"], reason="challenger", records=body["records"])

    def _dead_letter(self, rec: Record, error_type: str, message: str) -> None:
        self.bad += 1
        log.debug("dead letter %s[%d]@%d: %s: %s", rec.topic, rec.partition, rec.offset, error_type, message)
        self.obs.on_dead_letter(error_type)
        self.sink.produce(self.dlq_topic, rec.value, key=rec.key, headers=_dlq_headers(rec, error_type, message))

    def _check_dead_letter_rate(self, n: int, n_bad: int) -> None:
        """Stop loudly when the recent bad-record rate is over the limit (a broken upstream)."""
        cfg = self.spec.dead_letter
        self._recent_bad.append((n, n_bad))
        total = sum(r for r, _ in self._recent_bad)
        while self._recent_bad and total - self._recent_bad[0][0] >= cfg.min_records:
            total -= self._recent_bad.popleft()[0]
        if total >= cfg.min_records:
            bad = sum(b for _, b in self._recent_bad)
            if bad / total > cfg.max_rate:
                raise PipelineError(
                    f"{bad} of the last {total} records were bad ({bad / total:.0%} > dead_letter.max_rate "
                    f"{cfg.max_rate:.0%}): stopping instead of draining a broken upstream into {self.dlq_topic}. "
                    "Nothing past the last commit was committed; inspect the DLQ (error.type / error.message headers).")

    # -- offsets, checkpoints ---------------------------------------------
    def _flush(self) -> None:
        """Wait until every prediction and dead letter is delivered.

        While the broker is unreachable, records stay queued (librdkafka retries
        them): keep waiting, log now and then, and never commit meanwhile.
        A record that *failed* delivery raises: offsets then stay where they were.
        """
        self.sink.flush_patiently(lambda: self._stop)

    def _commit_offsets(self, offsets: dict[TP, int]) -> bool:
        t = time.perf_counter()
        if not self.source.try_commit(offsets):
            return False
        self.obs.on_commit(time.perf_counter() - t)
        return True

    def commit(self) -> None:
        """Inference: flush outputs (delivery confirmed), then commit the offsets they cover."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        if self.sink.transactional:
            self._commit_transaction(pending)
            return
        self._flush()
        if not self._commit_offsets(pending):
            for tp, off in pending.items():
                self._pending.setdefault(tp, off)

    def _commit_transaction(self, pending: dict[TP, int]) -> None:
        """exactly_once: the batch's predictions and its offsets commit atomically, or neither."""
        from confluent_kafka import TopicPartition

        try:
            self.sink.commit_transaction([TopicPartition(t, p, o) for (t, p), o in pending.items()],
                                         self.source.group_metadata())
        except Exception:
            self.sink.abort()
            raise  # nothing committed: a restart re-processes the aborted window
        finally:
            self._in_txn = False

    def _checkpoint_due(self) -> bool:
        cfg = self.spec.checkpoint
        learned = self.learner.n_learned - self._ckpt_n
        if self._promotion_pending:  # a new champion: persist it (and announce it) now
            return True
        return learned >= cfg.every_records or (learned > 0 and time.monotonic() - self._ckpt_t >= cfg.every_seconds)

    def checkpoint(self, force: bool = False) -> str | None:
        """Training: flush outputs -> write the checkpoint (fsynced) -> commit the offsets it reflects."""
        assert self.store is not None
        force = force or self._promotion_pending
        self._promotion_pending = False
        if not force and not self._pending and self.learner.n_learned == self._ckpt_n:
            return None
        t = time.perf_counter()
        self._flush()
        info = self.store.save(
            self.learner.state_dict(), offsets=dict(self._positions), n_learned=self.learner.n_learned,
            backend=self.spec.backend, spec_hash=self.spec.spec_hash(),
            metrics={k: v for k, v in self.learner.snapshot().items() if np.isfinite(v)},
            parent=self.last_checkpoint)
        self.checkpoints += 1
        self.last_checkpoint = info.id
        self._ckpt_n, self._ckpt_t = self.learner.n_learned, time.monotonic()
        self.obs.checkpoint_written(time.perf_counter() - t, info.id)
        log.info("checkpoint %s: %d records learned, offsets %s (%.1f ms)", info.id, info.n_learned,
                 info.offsets, (time.perf_counter() - t) * 1000)
        if self._pending and self._commit_offsets(dict(self._positions)):
            self._pending = {}
        if self._registry is not None:
            self._announce(info)
        return info.id

    def _on_revoke(self, tps: list[TP]) -> None:
        self.obs.on_rebalance("revoke", tps)
        if self.spec.labels is not None:
            self._drop_held(tps)
        # Persist and commit what we have for the partitions we lose, before the
        # group moves them (this runs inside poll, bounded by max.poll.interval.ms).
        try:
            if self.spec.trains:
                self.checkpoint()
            else:
                self.commit()
        except Exception:  # pragma: no cover - logged, the uncommitted window is replayed
            log.exception("commit on revoke failed; the uncommitted window will be re-processed")

    # -- model versions ---------------------------------------------------
    def _open_versions(self) -> None:
        v = self.spec.versions
        needs_watch = not self.spec.trains and v.watch
        needs_publish = self.spec.trains and v.promote == "every_checkpoint"
        if not (needs_watch or needs_publish):
            return
        key = resolve_key(_env_key(v.key_env), allow_unsigned=v.allow_unsigned)
        if needs_publish:
            self._registry = ModelRegistry(self.kafka, self.spec.name, key, allow_unsigned=v.allow_unsigned)
        if needs_watch:
            self._watcher = ModelWatcher(self.kafka, self.spec.name, key, allow_unsigned=v.allow_unsigned)
            current = self._watcher.catch_up(timeout=30)
            if current is not None and current.version != self.model_version:
                self._swap(current)
            elif current is None and not self.learner.built:
                raise PipelineError(f"no model: {self.spec.name}.models announces no version and model.weights "
                                    "is not set")

    def _announce(self, info: Any) -> None:
        assert self._registry is not None and self.store is not None
        try:
            ann = self._registry.publish(info.id, info.state_url, metrics=info.metrics, backend=self.spec.backend,
                                         spec_hash=self.spec.spec_hash())
            self.store.mark_promoted(info.id, ann.version)
            self.obs.model_version_changed(ann.version, reason="promote")
        except (ModelVersionError, CheckpointError) as e:  # the checkpoint stands; the announcement can be redone
            log.error("could not announce checkpoint %s as a model version: %s", info.id, e)

    def _maybe_swap(self) -> None:
        """Between batches: take a newly announced version (verified) without stopping."""
        if self._watcher is None:
            return
        ann = self._watcher.poll()
        if ann is not None and ann.version != self.model_version:
            self._swap(ann)

    def _swap(self, ann: Any) -> None:
        assert self._watcher is not None
        try:
            data = self._watcher.fetch_verified(ann)  # sha256 checked against the signed announcement
            state = st_load(data)  # the verified bytes themselves: no second read of the URL
            self.learner.load_state_dict(state)
        except Exception as e:  # a bad version never replaces a good one
            self.rejected_versions += 1
            log.error("rejected model version %s: %s", ann.version, e)
            return
        log.info("hot-swapped model version %s -> %s", self.model_version, ann.version)
        self.model_version = ann.version
        self.versions_seen.append(ann.version)
        self.obs.model_version_changed(ann.version, reason="swap")

    # -- reporting --------------------------------------------------------
    def _lag(self) -> int | None:
        if not self.source.assigned:  # also after close(): .consumer would open a new client
            return 0
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
                        self.learner.snapshot(), time.perf_counter() - t0, self._version_for_batch(),
                        **self.obs.tick(self))

    def _result(self, t0: float) -> RunResult:
        el = time.perf_counter() - t0
        lat = self._latencies[: min(self._n_lat, _LATENCY_RING)] * 1000
        p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if len(lat) else (None, None)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return RunResult(self.spec.backend, self.records, self.predictions, self.bad, el, self._rate(), p50, p99,
                         rss, self.learner.snapshot(), self.learner.history, self._version_for_batch(),
                         self.checkpoints, self.last_checkpoint, list(self.versions_seen))


#: fetch.wait.max.ms when neither the spec nor KafkaConfig.extra sets it
DEFAULT_FETCH_WAIT_MS = 100


def _fetch_wait(spec_ms: int | None, kafka: KafkaConfig) -> dict[str, Any]:
    """Consumer overrides for ``source.fetch_wait_ms`` (see :class:`~tensorstream.spec.SourceSpec`)."""
    if spec_ms is not None:
        return {"fetch.wait.max.ms": spec_ms}
    if "fetch.wait.max.ms" in kafka.extra:
        return {}
    return {"fetch.wait.max.ms": DEFAULT_FETCH_WAIT_MS}


def _env_key(var: str) -> bytes | None:
    """The HMAC key from ``$var`` or the file named by ``$var_FILE`` (None: resolve_key's default)."""
    if var in os.environ:
        return os.environ[var].encode()
    if var + "_FILE" in os.environ:
        with open(os.environ[var + "_FILE"], "rb") as f:
            return f.read().strip()
    return None
