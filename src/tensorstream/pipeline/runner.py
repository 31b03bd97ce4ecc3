"""Wire the parts: topic -> decode -> learner / predictor -> predictions topic.

:class:`Pipeline` wires; the parts do the work: decoding is in ``codecs``,
features and test-then-train in ``learn``, the model in ``backends``, durable
state in ``checkpoint``, the loop skeleton in :mod:`~tensorstream.pipeline.loop`,
model versions in :mod:`~tensorstream.pipeline.hotswap`, the delayed-labels
merge in :mod:`~tensorstream.pipeline.labeljoin`, and the commit order in one
:class:`~tensorstream.delivery.DeliveryEngine` (flush the outputs -> persist the
state -> commit the offsets; the only code that commits):

- **Inference** (``mode: infer``): offsets are committed every
  ``commit_interval_s`` once the predictions they cover are delivered
  (at-least-once; the uncommitted window is re-emitted after a crash).
- **Training** (``train``, ``train+infer``): offsets are committed only after a
  checkpoint that includes those records is durable; on restart (and on every
  partition assignment) the consumer starts from the offsets the model has
  reached, those stored in its checkpoint, so the persisted lineage learns
  every record exactly once.

>>> from tensorstream.pipeline import Pipeline                        # doctest: +SKIP
>>> result = Pipeline(spec, kafka_config).run(until_end=True)          # doctest: +SKIP
>>> result.metrics["accuracy"]                                         # doctest: +SKIP
0.89
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from tensorstream.backends import make_backend
from tensorstream.backends.check import check_model
from tensorstream.checkpoint import CheckpointError, CheckpointStore, StateFileError, load_state, save_state
from tensorstream.codecs import DecodeError, get_codec
from tensorstream.delivery import BadRateGuard, DeadLetters, DeliveryEngine, RunControl
from tensorstream.kafka import TP, KafkaAdmin, KafkaConfig, KafkaSink, KafkaSource, Record
from tensorstream.kafka.preflight import check_broker, missing_topics
from tensorstream.learn import OnlineLearner
from tensorstream.observe.metrics import PipelineMetrics
from tensorstream.pipeline.batching import next_batch
from tensorstream.pipeline.distributed import DistributedTrainer
from tensorstream.pipeline.distributed import resolve as resolve_distributed
from tensorstream.pipeline.events import EventWriter
from tensorstream.pipeline.hotswap import ModelVersions, NoModelError
from tensorstream.pipeline.labeljoin import MergedBatcher, decode_labels
from tensorstream.pipeline.loop import PipelineError, StopConditions, run_loop
from tensorstream.pipeline.outputs import PredictionWriter
from tensorstream.pipeline.results import Progress, RunCounters, RunResult, peak_rss_mb
from tensorstream.spec import PipelineSpec

log = logging.getLogger(__name__)

__all__ = ["Pipeline", "PipelineError", "Progress", "RunResult"]


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
                 metrics_host: str = "127.0.0.1", control: RunControl | None = None):
        check_model(spec)  # a user model factory: importable, callable, the right outputs (before anything else)
        self.spec = spec
        self.kafka = kafka
        self.on_progress = on_progress
        self.commit_interval_s = commit_interval_s
        self.control = control or RunControl()
        self.codec = get_codec(spec.source.codec, **spec.source.codec_options())
        sink_codec = None  # predictions as JSON; Avro (Confluent wire format) when the sink asks for it
        if spec.sink is not None and spec.sink.format == "avro-registry":
            from tensorstream.codecs.avro import PREDICTION_SCHEMA

            sink_codec = get_codec("avro-registry", writer_schema=PREDICTION_SCHEMA, **spec.sink.codec_options())
        self.writer = (PredictionWriter(spec.sink.topic, spec.sink.headers, sink_codec)
                       if spec.sink is not None else None)
        # One rank of a data-parallel job when a world size > 1 is set (pipeline/distributed.py):
        # the engine's backend, joined to the job before anything is built or restored.
        dist_ctx = resolve_distributed(spec)
        self.backend = make_backend(dist_ctx.backend_name if dist_ctx else spec.backend)
        self.learner = OnlineLearner(spec, self.backend)
        self.obs = PipelineMetrics(spec.name, spec.backend)  # Prometheus; /metrics served only with a port
        if metrics_port is not None:
            self.obs.serve(metrics_port, metrics_host)
        self.counters = RunCounters()
        self.engine = DeliveryEngine(control=self.control, resume_from_positions=spec.trains,
                                     persist=self._persist if spec.trains else None,
                                     refusals=(KafkaException,), on_commit=self.obs.on_commit)
        self.events = EventWriter(f"{spec.name}.events", spec.name, spec.backend, self.obs)
        self.versions = ModelVersions(spec, kafka, self.learner.load_state_dict, f"{spec.name}-{spec.backend}-live",
                                      self.obs)
        self.dlq_topic = f"{spec.name}.dlq"
        self.labels_codec = get_codec("json") if spec.labels is not None else None
        self.checkpoints = 0
        self.last_checkpoint: str | None = None
        self.store: CheckpointStore | None = None
        self.distributed = DistributedTrainer(self, dist_ctx) if dist_ctx else None
        if spec.model.weights:
            self._load_weights(spec.model.weights)
        if spec.trains:
            self.store = CheckpointStore(spec.checkpoint_url, keep_last=spec.checkpoint.keep_last)
            self._restore()
        self._ckpt_n = self.learner.n_learned
        self._ckpt_t = time.monotonic()
        self._last_commit = time.perf_counter()
        self._in_txn = False
        #: where each partition started in this run (None: auto_offset_reset), for messages
        self.start_positions: dict[TP, int | None] = {}
        self._watch_labels = spec.trains and spec.label is not None and spec.labels is None
        self._warned_labels = False

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand, checkpoint, commit and return."""
        self.control.request_stop("stop()")

    # -- what observers read ------------------------------------------------
    @property
    def records(self) -> int:
        return self.counters.records

    @property
    def predictions(self) -> int:
        return self.counters.predictions

    @property
    def bad(self) -> int:
        return self.counters.bad

    @property
    def model_version(self) -> str:
        return self.versions.model_version

    @property
    def versions_seen(self) -> list[str]:
        return self.versions.versions_seen

    @property
    def rejected_versions(self) -> int:
        return self.versions.rejected

    @property
    def drift_events(self) -> list[dict[str, Any]]:
        return self.events.written

    @property
    def events_topic(self) -> str:
        return self.events.topic

    # -- state ------------------------------------------------------------
    def _load_weights(self, url: str) -> None:
        state, meta = load_state(url)
        if meta.get("backend") and meta["backend"] != self.spec.backend:
            raise StateFileError(f"{url} holds a {meta['backend']} model; the spec's backend is {self.spec.backend}")
        self.learner.load_state_dict(state)
        self.versions.model_version = (meta.get("version")
                                       or f"{self.spec.name}-{self.spec.backend}-{meta.get('n_learned', '0')}")

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
        self.engine.positions = dict(info.offsets)
        self.engine.durable = dict(info.offsets)
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
        t0 = time.perf_counter()
        self.open()
        run_loop(self, StopConditions(max_records, until_end, timeout, idle_timeout), self.on_progress)
        return self.result(t0)

    def open(self, source: KafkaSource | None = None, *, sink: KafkaSink | None = None,
             versions: bool = True) -> None:
        """Create the topics, the consumer (``source`` if given) and the producer; connect the engine.

        ``versions``: open the models topic (announce or watch) as the spec says.
        """
        spec = self.spec
        self.preflight()
        admin = KafkaAdmin(self.kafka)
        for topic in (spec.sink.topic if spec.sink else None, self.events.topic if self.learner.drift.enabled else None):
            if topic is not None:
                admin.ensure_topic(topic)
        self.source = source or KafkaSource(
            self.kafka, spec.group_id, [spec.source.topic, *([spec.labels.topic] if spec.labels else [])],
            auto_offset_reset=spec.source.auto_offset_reset, on_revoke=self._on_revoke, on_assign=self._on_assign,
            start_offsets=self.engine.start_offset if spec.trains else None,
            **_fetch_wait(spec.source.fetch_wait_ms, self.kafka))
        self.sink = sink or KafkaSink(self.kafka, transactional_id=(
            f"tensorstream.{spec.name}.{spec.group_id}" if spec.exactly_once else None))
        self.engine.sink = self.sink
        self.engine.committer = self.source.commit
        if source is None:  # a group member commits only the partitions it holds
            self.engine._owned = lambda: self.source.assigned
        if self.sink.transactional:
            self.engine._transaction = self._commit_transaction
        self.dead_letters = DeadLetters(self.sink, self.dlq_topic, max_bytes=_max_message_bytes(self.kafka),
                                        on_dead_letter=self.obs.on_dead_letter)
        self.bad_rate = BadRateGuard(spec.dead_letter.max_rate, spec.dead_letter.min_records, self.dlq_topic)
        self.batcher = MergedBatcher(self.source, spec.labels) if spec.labels is not None else None
        if not versions:
            return
        try:
            self.versions.open(have_model=self.learner.built)
        except NoModelError as e:
            raise PipelineError(str(e)) from None

    def preflight(self, timeout: float = 5.0) -> None:
        """Before the first record: the broker answers, and the source topics exist (or ``source.create``).

        Raises :class:`PipelineError` with one sentence otherwise (within ``timeout`` seconds).
        """
        spec = self.spec
        existing = check_broker(self.kafka, timeout)  # BrokerUnreachable (a KafkaConnectError): one sentence
        sources = [spec.source.topic, *([spec.labels.topic] if spec.labels is not None else [])]
        missing = missing_topics(existing, sources)
        if missing and not spec.source.create:
            raise PipelineError(
                f"source topic {', '.join(map(repr, missing))} does not exist on {self.kafka.bootstrap_servers}: "
                "check source.topic, produce to it first, or set source.create: true")
        admin = KafkaAdmin(self.kafka)
        for topic in missing:
            admin.ensure_topic(topic)

    # LoopWorker (pipeline/loop.py)
    def before_batch(self) -> None:
        self.versions.maybe_swap()

    def next_batch(self) -> list[Record]:
        """A micro-batch: closes at ``batch.max_size`` records, ``batch.max_wait_ms`` after its first
        record, or at the end of the data (so a fixed-size batching is reproducible)."""
        size, wait = self.spec.batch.max_size, self.spec.batch.max_wait_ms / 1000
        stopped = lambda: self.control.stopping  # noqa: E731
        if self.batcher is not None:
            return self.batcher.next_batch(size, wait, stopped)
        return next_batch(self.source, size, wait, stopped, adaptive=self.spec.batch.adaptive)

    def processed(self) -> int:
        return self.counters.records

    def commit_due(self) -> bool:
        if not self.spec.trains:
            return time.perf_counter() - self._last_commit >= self.commit_interval_s
        cfg = self.spec.checkpoint
        learned = self.learner.n_learned - self._ckpt_n
        if self.events.promotion_pending:  # a new champion: persist it (and announce it) now
            return True
        if learned >= cfg.every_records:
            return True
        owed = learned > 0 or self.engine.positions != self.engine.durable or self.engine.dirty
        return owed and time.monotonic() - self._ckpt_t >= cfg.every_seconds

    def commit(self) -> None:
        """Training: flush -> checkpoint -> commit; inference: flush -> commit (see DeliveryEngine)."""
        force = self.events.promotion_pending
        self.events.promotion_pending = False
        self.engine.commit(force_persist=force)
        self._last_commit = time.perf_counter()
        self._ckpt_t = time.monotonic()

    def checkpoint(self, force: bool = False) -> str | None:
        """Training: flush outputs -> write the checkpoint (fsynced) -> commit the offsets it reflects."""
        outcome = self.engine.commit(force_persist=force)
        return outcome.persisted.id if outcome.persisted is not None else None

    def close_extras(self) -> None:
        self.versions.close()

    def process(self, batch: list[Record]) -> None:
        batch = self.engine.admit(batch, self.source.assigned)
        if not batch:
            return
        t_in = time.perf_counter()
        if self.sink.transactional and not self._in_txn:
            self.sink.begin()
            self._in_txn = True
        self.counters.started()
        bad_before = self.counters.bad
        label_recs: list[Record] = []
        features_batch = batch
        if self.spec.labels is not None:  # one consumer reads both topics: route by topic
            label_recs = [r for r in batch if r.topic == self.spec.labels.topic]
            features_batch = [r for r in batch if r.topic != self.spec.labels.topic]
        decoded: list[Any] = []
        keep: list[Record] = []
        for rec in features_batch:
            try:
                decoded.append(self.codec.decode_value(rec.value))
                keep.append(rec)
            except DecodeError as e:
                self._dead_letter(rec, "decode_error", str(e))
        if decoded:
            self._learn_or_predict(decoded, keep, batch)
            if self._watch_labels:
                self._check_labels(decoded)
        if label_recs:
            self._process_labels(label_recs, batch)
        self.counters.records += len(batch)
        self.engine.advance(batch)
        lat = time.perf_counter() - t_in
        self.obs.on_batch(batch, lat)
        self.counters.note_latency(lat, len(batch))
        self.bad_rate.observe(len(batch), self.counters.bad - bad_before, self.dead_letters.first)

    def _learn_or_predict(self, decoded: list[Any], keep: list[Record], batch: list[Record]) -> None:
        version = self.version_for_batch()
        # Stateful features (features.key: "@key", features.time: "@timestamp") read the
        # Kafka record keys and timestamps of the decoded records.
        rkeys, stamps = [r.key for r in keep], [r.timestamp_ms for r in keep]
        if self.spec.labels is not None:  # predict now, learn when the label comes
            kf = self.spec.labels.key_field
            keys = [r.key if kf is None else (d.get(kf) if isinstance(d, dict) else None)
                    for r, d in zip(keep, decoded, strict=True)]
            outcome = self.learner.process_features(decoded, keys, train=True, record_keys=rkeys, timestamps=stamps)
        elif self.spec.trains:
            outcome = self.learner.process(decoded, train=True, keys=rkeys, timestamps=stamps)
        else:
            outcome = self.learner.predict(decoded, keys=rkeys, timestamps=stamps)
        self.obs.on_learn(outcome.n_learned, outcome.loss)
        self.events.write(self.sink, outcome.events, keep, batch, self.counters.records, self.version_for_batch())
        for b in outcome.bad:
            self._dead_letter(keep[b.index], b.error_type, b.message)
        if self.spec.sink is not None:
            self._emit(keep, outcome, version)

    def _check_labels(self, decoded: list[Any]) -> None:
        """Training on labels in the records, and none seen yet: warn, then stop (a misspelt label.field
        must not run as an untrained model printing metrics of 0)."""
        learner, lab = self.learner, self.spec.label
        assert lab is not None
        if learner.n_learned:
            self._watch_labels = False
            return
        n = learner.n_unlabelled
        fields = sorted(decoded[0])[:12] if isinstance(decoded[0], dict) else []
        have = f" (records have: {', '.join(map(str, fields))})" if fields else ""
        if lab.missing_limit and n >= lab.missing_limit:
            raise PipelineError(
                f"none of the first {n} records has the label field {lab.field!r}{have}: fix label.field "
                "(dotted paths reach nested fields), or set label.missing_limit: 0 if labels come later")
        if n >= min(100, lab.missing_limit or 100) and not self._warned_labels:
            self._warned_labels = True
            log.warning("%d records and none has the label field %r%s; nothing is learned", n, lab.field, have)

    def _process_labels(self, recs: list[Record], batch: list[Record]) -> None:
        """Delayed labels: decode, join to the waiting predictions, learn."""
        assert self.spec.labels is not None and self.spec.label is not None
        lspec = self.spec.labels
        keys, values, keep = decode_labels(recs, self.labels_codec, lspec.field or self.spec.label.field,
                                           lspec.key_field, self._dead_letter)
        if not keep:
            return
        outcome = self.learner.process_labels(keys, values, train=True)
        self.obs.on_learn(outcome.n_learned, outcome.loss)
        for b in outcome.bad:
            self._dead_letter(keep[b.index], b.error_type, b.message)
        self.events.write(self.sink, outcome.events, keep, batch, self.counters.records, self.version_for_batch())

    def version_for_batch(self) -> str:
        """The model version a prediction made now carries."""
        # A training model changes every batch: name it by what it has learned
        # (deterministic, and it says exactly which model made the prediction).
        if self.spec.trains:  # distributed: the records the whole job has learned
            n = self.distributed.n_learned if self.distributed is not None else self.learner.n_learned
            # "+g<k>": the k-th champion promoted from a challenger (drift.policy: challenger)
            gen = self.learner.generation
            return f"{self.spec.name}@{n}" + (f"+g{gen}" if gen else "")
        return self.versions.model_version

    def _emit(self, recs: list[Record], outcome: Any, version: str) -> None:
        """One prediction record per predicted input record (see pipeline/outputs.py)."""
        out = self.writer.build(recs, outcome.rows, outcome.proba, outcome.predicted, outcome.classes, version)
        self.sink.produce_many(self.writer.topic, out)
        self.counters.predictions += len(out)
        self.obs.on_predictions(len(out))
        self.sink.poll(0)

    def _dead_letter(self, rec: Record, error_type: str, message: str) -> None:
        self.counters.bad += 1
        self.dead_letters.send(rec, error_type, message)

    # -- durable state (called by the engine only) --------------------------
    def _persist(self, offsets: dict[TP, int]) -> Any:
        """Write the checkpoint holding the learner state and ``offsets`` (fsynced), then announce it."""
        assert self.store is not None
        t = time.perf_counter()
        info = self.store.save(
            self.learner.state_dict(), offsets=offsets, n_learned=self.learner.n_learned,
            backend=self.spec.backend, spec_hash=self.spec.spec_hash(),
            metrics={k: v for k, v in self.learner.snapshot().items() if v == v and abs(v) != float("inf")},
            parent=self.last_checkpoint)
        self.checkpoints += 1
        self.last_checkpoint = info.id
        self._ckpt_n, self._ckpt_t = self.learner.n_learned, time.monotonic()
        self.obs.checkpoint_written(time.perf_counter() - t, info.id)
        log.info("checkpoint %s: %d records learned, offsets %s (%.1f ms)", info.id, info.n_learned,
                 info.offsets, (time.perf_counter() - t) * 1000)
        ann = self.versions.announce(info)
        if ann is not None:
            self.store.mark_promoted(info.id, ann.version)
        return info

    def _commit_transaction(self, offsets: dict[TP, int]) -> None:
        """exactly_once: the unit's predictions and its offsets commit atomically, or neither."""
        try:
            self.sink.commit_transaction([TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                         self.source.group_metadata())
        except Exception:
            self.sink.abort()
            raise  # nothing committed: a restart re-processes the aborted window
        finally:
            self._in_txn = False

    def _on_assign(self, tps: list[TP]) -> None:
        """Say where each newly assigned partition starts, and why (a checkpoint, the group's commit)."""
        ours = {tp: self.engine.start_offset(tp) for tp in tps}
        fresh = [tp for tp, off in ours.items() if off is None]
        committed: dict[TP, int | None] = {}
        if fresh:
            try:
                committed = self.source.committed(fresh, timeout=5)
            except Exception as e:  # noqa: BLE001 - only a message depends on it
                log.debug("could not read the committed offsets of %s: %s", fresh, e)
        where = {f"{t}[{p}]": (off if off is not None else committed.get((t, p))) for (t, p), off in ours.items()}
        self.start_positions.update({tp: where[f"{tp[0]}[{tp[1]}]"] for tp in tps})
        if self.spec.trains and any(committed.get(tp) is not None for tp in fresh):
            log.warning("group %s already committed offsets %s, but %s holds no checkpoint of them: training "
                        "starts there with a model that never saw the records before (use another state_dir, "
                        "or another source.group_id to start from the beginning)", self.spec.group_id,
                        {k: v for k, v in where.items() if v is not None}, self.spec.checkpoint_url)
        else:
            log.info("group %s starts at %s (%s)", self.spec.group_id, where,
                     "checkpoint" if not fresh else "committed offsets, else auto_offset_reset")

    def _on_revoke(self, tps: list[TP]) -> None:
        # Persist and commit what we have for the partitions we lose, before the
        # group moves them (this runs inside poll, bounded by max.poll.interval.ms).
        self.obs.on_rebalance("revoke", tps)
        if self.batcher is not None:
            self.batcher.drop(tps)
        self.engine.on_revoke(tps)

    # -- reporting --------------------------------------------------------
    def _lag(self) -> int | None:
        if not self.source.assigned:  # also after close(): .consumer would open a new client
            return 0
        try:
            c = self.source.consumer
            total = 0
            for t, p in self.source.assigned:
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), cached=True)
                pos = c.position([TopicPartition(t, p)])[0].offset
                if hi >= 0 and pos >= 0:
                    total += max(0, hi - pos)
            return total
        except Exception:
            return None

    def progress(self, t0: float) -> Progress:
        return Progress(self.spec.backend, self.counters.records, self.counters.rate(), self._lag(),
                        self.learner.snapshot(), time.perf_counter() - t0, self.version_for_batch(),
                        **self.obs.tick(self))

    def result(self, t0: float) -> RunResult:
        c = self.counters
        p50, p99 = c.latency_percentiles_ms()
        return RunResult(self.spec.backend, c.records, c.predictions, c.bad, time.perf_counter() - t0, c.rate(),
                         p50, p99, peak_rss_mb(), self.learner.snapshot(), self.learner.history,
                         self.version_for_batch(), self.checkpoints, self.last_checkpoint, list(self.versions_seen),
                         getattr(getattr(self, "dead_letters", None), "first", None), self.spec.mode)


#: fetch.wait.max.ms when neither the spec nor KafkaConfig.extra sets it
DEFAULT_FETCH_WAIT_MS = 100


def _fetch_wait(spec_ms: int | None, kafka: KafkaConfig) -> dict[str, Any]:
    """Consumer overrides for ``source.fetch_wait_ms`` (see :class:`~tensorstream.spec.SourceSpec`)."""
    if spec_ms is not None:
        return {"fetch.wait.max.ms": spec_ms}
    if "fetch.wait.max.ms" in kafka.extra:
        return {}
    return {"fetch.wait.max.ms": DEFAULT_FETCH_WAIT_MS}


def _max_message_bytes(kafka: KafkaConfig) -> int:
    """The producer's record size limit (``message.max.bytes``), for dead letters that must fit."""
    from tensorstream.delivery.deadletters import PRODUCER_MAX_BYTES

    try:
        return int(kafka.extra.get("message.max.bytes", PRODUCER_MAX_BYTES))
    except (TypeError, ValueError):
        return PRODUCER_MAX_BYTES
