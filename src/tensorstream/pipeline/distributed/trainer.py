"""One rank of a data-parallel job: explicitly assigned partitions, lock-step steps, rank 0 checkpoints."""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from confluent_kafka import OFFSET_STORED, Consumer, TopicPartition

from tensorstream.delivery import DeadLetterError, DeliveryFailed, Persisted, RunAborted
from tensorstream.features.state import from_json_array, json_array
from tensorstream.kafka import KafkaAdmin, KafkaConfig, KafkaSink, KafkaSource, Record
from tensorstream.learn.metrics import PrequentialMetrics
from tensorstream.pipeline.distributed.collective import Collective, SyncedFeatures, gather_rows
from tensorstream.pipeline.distributed.context import DistContext, DistributedError, owned_partitions
from tensorstream.pipeline.loop import PipelineError, close_worker

if TYPE_CHECKING:
    from tensorstream.checkpoint.store import CheckpointInfo
    from tensorstream.pipeline.results import RunResult
    from tensorstream.pipeline.runner import Pipeline

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the source
class AssignedSource(KafkaSource):
    """A :class:`KafkaSource` on explicitly assigned partitions: no group membership,
    hence no rebalances (the ranks' partition split is fixed). The group id still
    names where offsets are committed."""

    def __init__(self, config: KafkaConfig, group_id: str, topic: str, partitions: Sequence[int], *,
                 auto_offset_reset: str = "earliest", start_offsets: Any = None) -> None:
        super().__init__(config, group_id, [topic], auto_offset_reset=auto_offset_reset, start_offsets=start_offsets)
        self._owned = [(topic, p) for p in partitions]
        self.assigned = set(self._owned)

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            c = Consumer(self._settings, logger=log)
            tps = []
            for tp in self._owned:
                off = self._start_offsets(tp) if self._start_offsets is not None else None
                tps.append(TopicPartition(tp[0], tp[1], OFFSET_STORED if off is None else off))
            if tps:
                c.assign(tps)
            self._consumer = c
            self.assigned = set(self._owned)
            log.info("assigned %s (explicitly)", self._owned)
        return self._consumer

    @property
    def done(self) -> bool:
        """Every owned partition read to its end (true when it owns none)."""
        return not self._owned or self.at_eof >= set(self._owned)


# --------------------------------------------------------------------------- the trainer
# the step vector, all-reduced at the start of every step
_RECORDS, _DONE, _STOP, _DEADLINE, _CKPT_TIME, _LEARNED, _IDLE, _ERROR = range(8)
_STEP_LEN = 8
# the checkpoint's int64 counters (after the per-partition offsets)
_COUNTERS = ("n_learned", "n_seen", "n_bad", "n_unlabelled", "n_scored", "records", "predictions", "dead_letters",
             "pending", "failed")


class DistributedTrainer:
    """Runs a :class:`~tensorstream.pipeline.Pipeline` as one rank of a data-parallel job.

    Created by the pipeline when :func:`resolve` finds a world size > 1: it joins
    the job (the backend's ``connect``), makes the feature state learn from every
    rank's batch, and replaces the pipeline's loop with a lock-step one.
    """

    def __init__(self, pipe: Pipeline, ctx: DistContext) -> None:
        self.pipe = pipe
        self.ctx = ctx
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.coll: Collective = pipe.backend  # type: ignore[assignment]
        self.coll.connect(**ctx.connect_options(pipe.spec.model.threads))
        self.features = SyncedFeatures(pipe.learner.features, self.coll)
        pipe.learner.features = self.features  # type: ignore[assignment]
        #: records learned by the whole job (as of the last step); model versions are named by it
        self.n_learned = pipe.learner.n_learned
        self._ckpt_n = self.n_learned
        self._ckpt_t = time.monotonic()
        self._n_partitions = 0
        self.globals: dict[str, Any] = {}
        self._error: BaseException | None = None

    # -- restore -----------------------------------------------------------
    def agree_on_checkpoint(self, found: tuple[dict[str, np.ndarray], CheckpointInfo] | None
                            ) -> tuple[dict[str, np.ndarray], CheckpointInfo] | None:
        """Every rank must resume from the same checkpoint (a shared checkpoint store).

        The checkpoint holds the job's totals (records learned, metrics); they stay
        with rank 0 and the other ranks start their shares from zero, so the sums
        stay right.
        """
        cid = found[1].id if found is not None else ""
        digest = int.from_bytes(hashlib.sha256(cid.encode()).digest()[:8], "little", signed=True) if cid else 0
        seen = gather_rows(self.coll, np.array([digest], dtype=np.int64))[:, 0]
        if len(set(seen.tolist())) != 1:
            raise DistributedError(
                f"rank {self.rank} would resume from checkpoint {cid or '(none)'} but other ranks see another one: "
                f"every rank needs the same checkpoint store (checkpoint.url on shared storage: a shared "
                f"filesystem, s3://, gs://)")
        if found is None:
            if self.rank != 0:  # e.g. model.weights loaded everywhere: its counters count once, on rank 0
                learner = self.pipe.learner
                learner.n_learned = learner.n_seen = learner.n_bad = learner.n_unlabelled = 0
                if learner.metrics is not None:
                    m = learner.metrics
                    learner.metrics = PrequentialMetrics(m.task, m.n_outputs, m.window, m.history_every)
            return None
        state, info = found
        if self.rank != 0:
            state = {k: v for k, v in state.items() if not k.startswith("metrics/")}
            state["learner/n_learned"] = np.zeros(1, dtype=np.int64)
            state["learner/counters"] = np.zeros(3, dtype=np.int64)
        return state, info

    # -- the loop ----------------------------------------------------------
    def run(self, *, max_records: int | None = None, until_end: bool = False, timeout: float | None = None,
            idle_timeout: float | None = None) -> RunResult:
        pipe, spec = self.pipe, self.pipe.spec
        pipe.preflight()  # the broker answers, the source topic exists (or source.create)
        admin = KafkaAdmin(pipe.kafka)
        self._n_partitions = admin.list_topics().get(spec.source.topic, 1)
        owned = owned_partitions(self._n_partitions, self.rank, self.world_size)
        if not owned:
            log.warning("rank %d owns no partition of %s (%d partitions for %d ranks): it only joins the steps",
                        self.rank, spec.source.topic, self._n_partitions, self.world_size)
        source = AssignedSource(pipe.kafka, spec.group_id, spec.source.topic, owned,
                                auto_offset_reset=spec.source.auto_offset_reset,
                                start_offsets=pipe.engine.start_offset)
        source.consumer  # noqa: B018 - assign now, so the fetches start while the ranks meet
        pipe.open(source, sink=KafkaSink(pipe.kafka), versions=self.rank == 0)  # only rank 0 announces versions
        if self.rank != 0:
            pipe.engine.committer = None  # rank 0 commits every partition's offset
        t0 = time.perf_counter()
        last_progress = t0
        last_data = time.monotonic()
        busy = False
        global_records = 0
        failed = False
        self.n_learned = self._ckpt_n = int(self.coll.all_reduce(
            np.array([pipe.learner.n_learned], dtype=np.int64))[0])
        try:
            while True:
                batch = self._gather(busy) if self._error is None else []
                now = time.monotonic()
                vec = np.zeros(_STEP_LEN, dtype=np.int64)
                vec[_RECORDS] = len(batch)
                vec[_DONE] = int(not batch and pipe.source.done)
                vec[_STOP] = int(pipe.control.stopping)
                vec[_LEARNED] = pipe.learner.n_learned
                vec[_ERROR] = int(self._error is not None)
                if self.rank == 0:  # one clock decides the time-based conditions
                    vec[_DEADLINE] = int(timeout is not None and time.perf_counter() - t0 > timeout)
                    vec[_CKPT_TIME] = int(now - self._ckpt_t >= spec.checkpoint.every_seconds)
                    vec[_IDLE] = int(idle_timeout is not None and now - last_data > idle_timeout)
                tot = self.coll.all_reduce(vec)
                if tot[_ERROR]:
                    failed = True
                    break
                self.n_learned = int(tot[_LEARNED])
                learned = self.n_learned - self._ckpt_n
                if learned >= spec.checkpoint.every_records or (learned > 0 and tot[_CKPT_TIME]):
                    self.checkpoint()
                if tot[_RECORDS]:
                    busy = True
                    last_data = now
                    global_records += int(tot[_RECORDS])
                    self._step(batch)
                else:
                    busy = False
                if time.perf_counter() - last_progress >= 1.0:
                    progress = pipe.progress(t0)
                    if pipe.on_progress:
                        pipe.on_progress(progress)
                    last_progress = time.perf_counter()
                if tot[_STOP] or tot[_DEADLINE] or tot[_IDLE]:
                    break
                if max_records is not None and global_records >= max_records:
                    break
                if until_end and not tot[_RECORDS] and tot[_DONE] == self.world_size:
                    break
            if not failed:  # stopped together; did a rank fail in the last step?
                failed = bool(self.coll.all_reduce(np.array([int(self._error is not None)], dtype=np.int64))[0])
            if not failed:
                self.checkpoint(final=True)
                failed = self._error is not None  # the last flush failed somewhere: nothing was persisted
        finally:
            close_worker(pipe)
        if failed:
            self.coll.close()
            if self._error is not None:
                raise self._error
            raise PipelineError("another rank stopped with an error (see its log); nothing past the last "
                                "checkpoint was committed")
        self.coll.close()
        if pipe.on_progress:
            pipe.on_progress(pipe.progress(t0))
        return self._result(t0)

    def _gather(self, busy: bool) -> list[Record]:
        """This rank's micro-batch, within the batch's ``max_wait_ms`` (the step timeout).

        A rank with a backlog waits for its records (up to ``max_wait_ms``), so its
        share of the step is full. A rank that is caught up (its partitions at their
        end) does not wait while the stream flows elsewhere (the last step had
        records): it joins the step with what it has, possibly nothing. Polls are
        short slices, so reaching the end of a partition ends the wait at once.
        """
        pipe, src = self.pipe, self.pipe.source
        max_size, max_wait = pipe.spec.batch.max_size, pipe.spec.batch.max_wait_ms / 1000
        if not src.assigned:
            if not busy:
                time.sleep(0.05)
            return []
        deadline = time.monotonic() + max_wait
        batch: list[Record] = []
        while True:
            if src.done:  # caught up: take what is there; idle everywhere: one short wait, not a spin
                wait = 0.0 if busy or batch else 0.1
            else:
                wait = min(max(deadline - time.monotonic(), 0.0), 0.05)
            more = src.poll_batch(max_size - len(batch), wait)
            batch.extend(more)
            if (len(batch) >= max_size or pipe.control.stopping or time.monotonic() >= deadline
                    or (not more and src.done)):
                return batch

    def _step(self, batch: list[Record]) -> None:
        """Test-then-train this rank's share of the step, then make sure it joined every
        collective of the step (feature sync, model build, gradient all-reduce)."""
        learner = self.pipe.learner
        syncs, steps = self.features.syncs, self.coll.train_steps
        if batch:
            try:
                self.pipe.process(batch)
            except DeadLetterError as e:  # raised after the step's work: finish the step, then stop everybody
                self.pipe.engine.fail(e)
                self._error = PipelineError(str(e))
        if self.features.syncs == syncs:
            self.features.sync(None)
        if not learner.built and self.features.numeric_fields is not None and learner.spec.label is not None:
            learner._ensure_built()  # collective: every rank builds in the same step
        if learner.built and self.coll.train_steps == steps:
            self.coll.empty_step()

    # -- checkpoints -------------------------------------------------------
    def _gather_totals(self, failed: int = 0) -> dict[str, Any]:
        """The job's offsets, counters and metrics (two all-reduces; every rank gets them)."""
        pipe, learner = self.pipe, self.pipe.learner
        topic, n_parts = pipe.spec.source.topic, self._n_partitions
        mine = set(owned_partitions(n_parts, self.rank, self.world_size))
        metrics = learner.metrics
        n_out = metrics.n_outputs if metrics is not None and metrics.task == "classification" else 0
        ints = np.zeros(n_parts + len(_COUNTERS) + n_out * (n_out + 1), dtype=np.int64)
        for (t, p), off in pipe.engine.positions.items():
            if t == topic and p in mine:
                ints[p] = off + 1  # 0 = this partition has no position
        ints[n_parts:n_parts + len(_COUNTERS)] = [
            learner.n_learned, learner.n_seen, learner.n_bad, learner.n_unlabelled,
            metrics.n_scored if metrics is not None else 0, pipe.records,
            pipe.predictions, pipe.bad, int(pipe.engine.positions != pipe.engine.durable), failed]
        floats = np.zeros(0)
        mstate = metrics.state_dict() if metrics is not None else None
        if mstate is not None:
            conf = ints[n_parts + len(_COUNTERS):].reshape(n_out, n_out + 1) if n_out else None
            for t, p, c in np.asarray(mstate["confusion"]).tolist():
                if conf is not None:
                    conf[t, p if p >= 0 else n_out] += c
            means = np.asarray(mstate["means"], dtype=np.float64)
            floats = np.stack([means[:, 0], means[:, 0] * means[:, 1]], axis=1).reshape(-1)
        ints = self.coll.all_reduce(ints)
        if len(floats):
            floats = self.coll.all_reduce(floats)
        offsets = {(topic, p): int(v) - 1 for p, v in enumerate(ints[:n_parts].tolist()) if v > 0}
        for tp, off in pipe.engine.durable.items():  # partitions nobody read since the restore
            offsets.setdefault(tp, off)
        counters = dict(zip(_COUNTERS, ints[n_parts:n_parts + len(_COUNTERS)].tolist(), strict=True))
        out: dict[str, Any] = {"offsets": offsets, "counters": counters, "metrics_state": None, "metrics": {}}
        if mstate is not None and metrics is not None:
            g = dict(mstate)
            if n_out:
                conf = ints[n_parts + len(_COUNTERS):].reshape(n_out, n_out + 1)
                rows = [[t, p if p < n_out else -1, int(conf[t, p])] for t in range(n_out) for p in range(n_out + 1)
                        if conf[t, p]]
                g["confusion"] = np.array(rows, dtype=np.int64).reshape(-1, 3)
            sums = floats.reshape(-1, 2)
            g["means"] = np.stack([sums[:, 0], np.divide(sums[:, 1], sums[:, 0], out=np.zeros(len(sums)),
                                                         where=sums[:, 0] > 0)], axis=1)
            meta = from_json_array(mstate["meta"])
            meta["n_scored"] = counters["n_scored"]
            g["meta"] = json_array(meta)
            merged = PrequentialMetrics(metrics.task, metrics.n_outputs, metrics.window, metrics.history_every)
            merged.load_state_dict(g)
            out["metrics_state"] = g
            out["metrics"] = merged.snapshot()
        return out

    def checkpoint(self, final: bool = False) -> str | None:
        """Flush -> gather -> rank 0 writes the checkpoint and commits every partition's offset.

        Collective: every rank calls it in the same step (and joins the gather even
        when its own flush failed, so nobody waits for it; then nobody persists).
        Returns the checkpoint id on rank 0.
        """
        engine = self.pipe.engine
        t = time.perf_counter()
        failed = 0
        try:
            engine.flush()  # before the gather: rank 0 must not claim records whose outputs are undelivered
        except (DeliveryFailed, RunAborted) as e:
            failed = 1
            self._error = self._error or PipelineError(f"rank {self.rank}: {e}")
        g = self._gather_totals(failed)
        self.globals = g
        c = g["counters"]
        if c["failed"]:  # a rank's outputs are not all delivered: nothing of this unit becomes durable
            if self._error is None:
                self._error = PipelineError("another rank could not deliver its outputs; nothing past the last "
                                            "checkpoint was committed")
            return None
        self.n_learned = c["n_learned"]
        wanted = c["pending"] > 0 or c["n_learned"] != self._ckpt_n
        cid = None
        if wanted and self.rank == 0:
            outcome = engine.persist_and_commit(persist=lambda _offsets: Persisted(self._save(g, t), g["offsets"]))
            cid = outcome.persisted.id
        elif wanted:
            engine.persist_and_commit(persist=lambda _offsets: None)  # rank 0 made them durable and commits them
        if wanted:
            self._ckpt_n = c["n_learned"]
            self._ckpt_t = time.monotonic()
        if final:
            self.coll.all_reduce(np.zeros(1, dtype=np.int64))  # nobody leaves before rank 0 has written
        return cid

    def _save(self, g: dict[str, Any], t: float) -> CheckpointInfo:
        """Rank 0: the job's checkpoint (the model state is the same on every rank; counters are the job's)."""
        pipe, learner, c = self.pipe, self.pipe.learner, g["counters"]
        assert pipe.store is not None
        state = learner.state_dict()
        if g["metrics_state"] is not None:
            state.update({f"metrics/{k}": v for k, v in g["metrics_state"].items()})
        state["learner/n_learned"] = np.array([c["n_learned"]], dtype=np.int64)
        state["learner/counters"] = np.array([c["n_seen"], c["n_bad"], c["n_unlabelled"]], dtype=np.int64)
        metrics = {k: v for k, v in g["metrics"].items() if math.isfinite(v)}
        metrics.update(n_seen=float(c["n_seen"]), n_learned=float(c["n_learned"]))
        info = pipe.store.save(
            state, offsets=g["offsets"], n_learned=c["n_learned"], backend=pipe.spec.backend,
            spec_hash=pipe.spec.spec_hash(), metrics=metrics, parent=pipe.last_checkpoint,
            extra={"distributed": {"engine": self.ctx.engine, "world_size": self.world_size}})
        pipe.checkpoints += 1
        pipe.last_checkpoint = info.id
        log.info("checkpoint %s (rank 0 of %d): %d records learned, offsets %s (%.1f ms)", info.id,
                 self.world_size, info.n_learned, info.offsets, (time.perf_counter() - t) * 1000)
        ann = pipe.versions.announce(info)
        if ann is not None:
            pipe.store.mark_promoted(info.id, ann.version)
        return info

    def _result(self, t0: float) -> RunResult:
        """The job's result (the same on every rank): totals and merged metrics."""
        from tensorstream.pipeline.results import RunResult

        pipe = self.pipe
        local = pipe.result(t0)
        c = self.globals.get("counters", {})
        metrics = dict(self.globals.get("metrics") or local.metrics)
        metrics.update(n_seen=float(c.get("n_seen", 0)), n_learned=float(c.get("n_learned", 0)),
                       n_bad=float(c.get("n_bad", 0)), n_unlabelled=float(c.get("n_unlabelled", 0)))
        records = int(c.get("records", local.records))
        seconds = time.perf_counter() - (pipe.counters.t_first or t0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return RunResult(pipe.spec.backend, records, int(c.get("predictions", local.predictions)),
                         int(c.get("dead_letters", local.bad)), local.seconds, records / max(seconds, 1e-9),
                         local.latency_p50_ms, local.latency_p99_ms, rss, metrics, local.history,
                         f"{pipe.spec.name}@{self.n_learned}", local.checkpoints, local.last_checkpoint,
                         list(local.versions_seen))
