"""Data-parallel online training: N ranks, one model, the frameworks' own engines.

Framework-free coordination; the collectives themselves come from the backend
(``backends/torch_ddp.py``: torch.distributed + DDP, ``backends/tensorflow_multiworker.py``:
tf.distribute MultiWorkerMirroredStrategy), which exposes them as numpy in,
numpy out (``all_reduce``: an element-wise sum over the ranks).

- **Who reads what.** Rank r of W consumes the source partitions p with
  ``p % W == r``, explicitly assigned (:class:`AssignedSource`): no consumer-group
  rebalancing between ranks. A rank starts each partition from the offset in the
  checkpoint, else the group's committed offset, else ``auto_offset_reset``.
- **Lock-step.** Every step each rank gathers a micro-batch (waiting at most the
  batch's ``max_wait_ms``, and not at all while the stream is flowing elsewhere),
  then the ranks all-reduce a small int64 vector: record counts, end-of-data,
  stop and deadline flags. A total of 0 means everybody polls again. Otherwise
  each rank test-then-trains its batch: features learn from the union batch
  (:class:`SyncedFeatures`), and the backend's train step weights the gradient
  all-reduce by sample counts. A rank with nothing joins the step with zero rows
  and zero gradients, so a slow or idle partition never stalls the others.
- **Stopping.** The ranks stop together: when every rank reports end-of-data
  (``until_end``), when any rank was asked to stop (SIGTERM), at rank 0's
  deadline, or when the global record count reaches ``max_records``.
- **Checkpoints.** Every rank flushes its outputs, then the ranks all-reduce the
  offsets (int64, one slot per partition: each rank fills the partitions it owns)
  and the counters and metrics; rank 0 writes the checkpoint (the model state is
  identical everywhere) and commits the offsets of *all* partitions. A
  checkpoint from W ranks restores on any number of ranks, one included: the
  offsets cover every partition.

If a rank dies, the others fail at their next collective (at the latest after
``distributed.timeout_s``); restart all ranks and they resume from rank 0's last
checkpoint, the same exactly-once contract as a single trainer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson
from confluent_kafka import OFFSET_STORED, Consumer, TopicPartition

from tensorstream.delivery import DeadLetterError, DeliveryFailed, Persisted, RunAborted
from tensorstream.features.state import from_json_array, json_array
from tensorstream.features.transform import FeaturePipeline, ParsedBatch
from tensorstream.kafka import KafkaAdmin, KafkaConfig, KafkaSink, KafkaSource, Record
from tensorstream.learn.metrics import PrequentialMetrics
from tensorstream.pipeline.loop import PipelineError, close_worker
from tensorstream.spec import PipelineSpec

if TYPE_CHECKING:
    from tensorstream.checkpoint.store import CheckpointInfo
    from tensorstream.pipeline.results import RunResult
    from tensorstream.pipeline.runner import Pipeline

log = logging.getLogger(__name__)

ENV = "TENSORSTREAM_"
#: the backend registered for each engine (tensorstream.backends)
ENGINE_BACKENDS = {"torch": "torch-ddp", "tensorflow": "tensorflow-multiworker"}


class DistributedError(RuntimeError):
    """The ranks disagree (checkpoints, layouts) or the job cannot be set up."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job (resolved from the spec and the environment)."""

    engine: str
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    #: tensorflow: every rank's ``host:port``, in rank order
    workers: tuple[str, ...]
    process_group: str
    timeout_s: float

    @property
    def backend_name(self) -> str:
        return ENGINE_BACKENDS[self.engine]

    def connect_options(self, threads: int | None) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "master_addr": self.master_addr,
                "master_port": self.master_port, "workers": list(self.workers),
                "process_group": self.process_group, "timeout_s": self.timeout_s, "threads": threads}


def _env_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise DistributedError(f"${name} must be an integer, got {env[name]!r}") from None
    return None


def resolve(spec: PipelineSpec, env: Mapping[str, str] | None = None) -> DistContext | None:
    """This process' place in a distributed job, or None to train in one process.

    ``TENSORSTREAM_<FIELD>`` variables override the spec's ``distributed`` fields;
    then come the launchers' conventions (torchrun's ``RANK``/``WORLD_SIZE``/
    ``MASTER_ADDR``/``MASTER_PORT``, tf.distribute's ``TF_CONFIG``).

    >>> from tensorstream.spec import PipelineSpec
    >>> spec = PipelineSpec.model_validate({"source": {"topic": "t"}, "mode": "train",
    ...     "features": {"numeric": ["*"]}, "label": {"field": "y", "classes": [0, 1]}})
    >>> resolve(spec, {}) is None          # one process unless a world size > 1 is given
    True
    >>> ctx = resolve(spec, {"TENSORSTREAM_WORLD_SIZE": "2", "TENSORSTREAM_RANK": "1"})
    >>> ctx.engine, ctx.rank, ctx.world_size, ctx.backend_name, ctx.workers
    ('torch', 1, 2, 'torch-ddp', ('127.0.0.1:29500', '127.0.0.1:29501'))
    """
    env = os.environ if env is None else env
    d = spec.distributed
    engine = d.engine or spec.backend
    if engine == "none":
        return None
    tf_config: dict[str, Any] = {}
    if engine == "tensorflow" and env.get("TF_CONFIG", "").strip():
        try:
            tf_config = orjson.loads(env["TF_CONFIG"])
        except orjson.JSONDecodeError as e:
            raise DistributedError(f"$TF_CONFIG is not JSON: {e}") from None
    env_workers = [w.strip() for w in env.get(ENV + "WORKERS", "").split(",") if w.strip()]
    tf_workers = list(tf_config.get("cluster", {}).get("worker", []))
    workers = env_workers or d.workers or tf_workers or None
    world = _env_int(env, ENV + "WORLD_SIZE")
    if world is None:
        world = d.world_size or _env_int(env, "WORLD_SIZE") or (len(workers) if workers else None) or 1
    if world <= 1:
        return None
    rank = _env_int(env, ENV + "RANK")
    if rank is None:
        rank = d.rank if d.rank is not None else _env_int(env, "RANK")
    if rank is None and tf_config.get("task", {}).get("type") == "worker":
        rank = int(tf_config["task"]["index"])
    rank = rank or 0
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank} is outside world size {world}")
    addr = env.get(ENV + "MASTER_ADDR") or d.master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    port = _env_int(env, ENV + "MASTER_PORT") or d.master_port or _env_int(env, "MASTER_PORT") or 29500
    if workers is None:
        workers = [f"{addr}:{port + i}" for i in range(world)]
    if len(workers) != world:
        raise DistributedError(f"{len(workers)} worker addresses for world size {world}")
    if spec.backend != engine:
        raise DistributedError(f"distributed engine {engine!r} cannot train a {spec.backend} model")
    _check_supported(spec)
    return DistContext(engine, rank, world, addr, port, tuple(workers), d.process_group, d.timeout_s)


def _check_supported(spec: PipelineSpec) -> None:
    """What data-parallel training cannot do (yet): refuse it before anything starts."""
    if not spec.trains:
        raise DistributedError("distributed training needs mode 'train' or 'train+infer'")
    if spec.label is not None and spec.label.task == "classification" and not spec.label.classes:
        # Each rank would number newly seen classes in its own order: output slots would disagree.
        raise DistributedError("distributed training needs a fixed class set: list label.classes")
    if getattr(spec, "labels", None) is not None:
        raise DistributedError("distributed training reads labels from the record; a 'labels' topic is not "
                               "supported with world_size > 1")
    drift = getattr(spec, "drift", None)
    if drift is not None and getattr(drift, "policy", "none") != "none":
        # A policy acts on one rank's error stream: the ranks would change their models differently.
        raise DistributedError("drift.policy must be 'none' with world_size > 1 (detection alone is fine)")


def owned_partitions(n_partitions: int, rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` consumes: ``p % world_size == rank``.

    >>> owned_partitions(5, 0, 2), owned_partitions(5, 1, 2), owned_partitions(1, 1, 2)
    ([0, 2, 4], [1, 3], [])
    """
    return [p for p in range(n_partitions) if p % world_size == rank]


# --------------------------------------------------------------------------- collectives
class Collective(Protocol):
    """What a distributed backend adds to :class:`~tensorstream.backends.base.Backend`."""

    rank: int
    world_size: int
    train_steps: int

    def connect(self, **options: Any) -> None: ...
    def all_reduce(self, a: np.ndarray) -> np.ndarray: ...
    def empty_step(self) -> None: ...
    def close(self) -> None: ...


def gather_rows(coll: Collective, row: np.ndarray) -> np.ndarray:
    """Every rank's ``row`` as ``[world_size, len(row)]``: an all-gather built from one
    all-reduce (each rank fills its own row of zeros; adding zeros is exact)."""
    row = np.asarray(row).reshape(-1)
    buf = np.zeros((coll.world_size, row.shape[0]), dtype=row.dtype)
    buf[coll.rank] = row
    return coll.all_reduce(buf.reshape(-1)).reshape(buf.shape)


def allgather_bytes(coll: Collective, data: bytes, capacity: int = 0) -> list[bytes]:
    """Every rank's ``data`` (any length), in rank order, via all-reduces of int64.

    The payloads are packed as little-endian int64 words into disjoint segments of
    one buffer. With ``capacity`` (bytes per rank), one all-reduce of a fixed-size
    buffer carries every payload up to that size (and the lengths); only when
    some payload is longer does a second round follow, sized to fit (padded to a
    power of two, so that graph engines see few shapes).
    """
    if capacity > 0:
        words = (capacity + 7) // 8
        row = np.zeros(1 + words, dtype=np.int64)
        row[0] = len(data)
        if len(data) <= words * 8:
            padded = data + b"\0" * (-len(data) % 8)
            row[1:1 + len(padded) // 8] = np.frombuffer(padded, dtype="<i8")
        rows = gather_rows(coll, row)
        lengths = rows[:, 0].tolist()
        if max(lengths) <= words * 8:
            return [rows[r, 1:].astype("<i8").tobytes()[:n] for r, n in enumerate(lengths)]
    else:
        lengths = gather_rows(coll, np.array([len(data)], dtype=np.int64))[:, 0].tolist()
    if not any(lengths):
        return [b""] * coll.world_size
    words = [(n + 7) // 8 for n in lengths]
    starts = np.concatenate([[0], np.cumsum(words)]).astype(int).tolist()
    buf = np.zeros(1 << max(starts[-1] - 1, 0).bit_length(), dtype=np.int64)
    if data:
        padded = data + b"\0" * (words[coll.rank] * 8 - len(data))
        buf[starts[coll.rank]:starts[coll.rank + 1]] = np.frombuffer(padded, dtype="<i8")
    out = coll.all_reduce(buf).astype("<i8")
    return [out[starts[r]:starts[r + 1]].tobytes()[:lengths[r]] for r in range(coll.world_size)]


# --------------------------------------------------------------------------- features
class SyncedFeatures:
    """A :class:`FeaturePipeline` whose state learns from every rank's batch.

    Single-rank training updates the running scaler and the one-hot vocabularies
    with the batch, then transforms it. Here each rank sends what its batch would
    teach (the layout once, new category keys in first-seen order, the batch's
    count/mean/M2), every rank folds all of it in rank order, then transforms its
    own rows without updating: the state is the same on every rank and equals
    learning from the union batch (rank 0's rows first). Everything else is the
    wrapped pipeline's.
    """

    def __init__(self, inner: FeaturePipeline, coll: Collective) -> None:
        self._inner = inner
        self._coll = coll
        #: syncs taken (one per step on every rank)
        self.syncs = 0
        #: bytes per rank that one all-reduce carries; grows (on every rank alike) when a payload did not fit
        self.capacity = 1024
        self._layout_everywhere = False
        s = inner.spec
        self._onehot = s.categorical if s.categorical_encoding == "onehot" else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def inner(self) -> FeaturePipeline:
        return self._inner

    def transform_parsed(self, parsed: ParsedBatch, keep: np.ndarray | None = None,
                         update: bool = True) -> np.ndarray:
        if keep is not None:
            parsed = parsed.select(keep)
        self.sync(parsed if update else None)
        return self._inner.transform_parsed(parsed, None, update=False)

    def _static(self) -> bool:
        """Nothing left to learn from batches: no collective needed."""
        return self._layout_everywhere and not self._onehot and not (
            self._inner.spec.standardize and self._inner.numeric_width)

    def sync(self, parsed: ParsedBatch | None) -> None:
        """Exchange and fold this step's feature updates (collective: every rank, every step)."""
        self.syncs += 1
        if self._static():
            return
        state = self._inner.state_dict()
        payload: dict[str, Any] = {}
        stats = np.zeros(0)
        if "layout" in state and not self._layout_everywhere:
            payload["layout"] = from_json_array(state["layout"])
        if parsed is not None and len(parsed):
            vocab = from_json_array(state["vocab"]) if "vocab" in state else {}
            new: dict[str, list[str]] = {}
            for j, name in enumerate(self._inner.spec.categorical):
                if name not in self._onehot:
                    continue
                known = set(vocab.get(name, []))
                keys = [k for k in dict.fromkeys(row[j] for row in parsed.categories) if k not in known]
                if keys:
                    new[name] = keys
            if new:
                payload["vocab"] = new
            if self._inner.spec.standardize and parsed.numeric.shape[1]:
                x = parsed.numeric
                mean = x.mean(axis=0)
                stats = np.concatenate([[len(x)], mean, ((x - mean) ** 2).sum(axis=0)]).astype("<f8")
        # JSON (layout, new keys) + NUL + the batch's statistics as raw float64 (exact, compact)
        data = orjson.dumps(payload) + b"\0" + stats.tobytes() if payload or len(stats) else b""
        parts = allgather_bytes(self._coll, data, self.capacity)
        longest = max(len(p) for p in parts)
        if longest > self.capacity:
            self.capacity = 1 << longest.bit_length()
        self._fold(state, [_unpack(p) for p in parts])

    def _fold(self, state: dict[str, np.ndarray], parts: list[dict[str, Any]]) -> None:
        changed = False
        layouts = [p["layout"] for p in parts if "layout" in p]
        if layouts:
            if any(lay != layouts[0] for lay in layouts):
                raise DistributedError(f"the ranks inferred different feature layouts {layouts}: list "
                                       "features.numeric explicitly")
            if "layout" not in state:
                width = sum(int(w) for _, w in layouts[0]["fields"])
                state["layout"] = json_array(layouts[0])
                for k in ("count", "mean", "m2"):
                    state[f"scaler/{k}"] = np.zeros(width, dtype=np.float64)
                changed = True
            self._layout_everywhere = True
        vocab = from_json_array(state["vocab"]) if "vocab" in state else None
        cap = self._inner.spec.max_categories
        for p in parts:
            for name, keys in p.get("vocab", {}).items():
                assert vocab is not None
                have = vocab.setdefault(name, [])
                seen = set(have)
                for k in keys:
                    if len(have) >= cap:
                        break  # later keys share the overflow slot, as on one rank
                    if k not in seen:
                        have.append(k)
                        seen.add(k)
                        changed = True
            if "stats" in p:
                n_b, mean_b, m2_b = p["stats"]
                count, mean, m2 = (np.asarray(state[f"scaler/{k}"], dtype=np.float64) for k in ("count", "mean", "m2"))
                n = count + n_b  # Chan et al.'s merge, as RunningStandardizer.update does it
                delta = mean_b - mean
                state["scaler/mean"] = mean + delta * (n_b / n)
                state["scaler/m2"] = m2 + m2_b + delta**2 * (count * n_b / n)
                state["scaler/count"] = n
                changed = True
        if vocab is not None:
            state["vocab"] = json_array(vocab)
        if changed:
            self._inner.load_state_dict(state)


def _unpack(part: bytes) -> dict[str, Any]:
    """One rank's sync payload: ``{"layout"?, "vocab"?, "stats"?: (n, mean, m2)}``."""
    if not part:
        return {}
    head, _, tail = part.partition(b"\0")
    out: dict[str, Any] = orjson.loads(head)
    if tail:
        v = np.frombuffer(tail, dtype="<f8")
        d = (len(v) - 1) // 2
        out["stats"] = (float(v[0]), v[1:1 + d], v[1 + d:])
    return out


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
        pipe, engine = self.pipe, self.pipe.engine
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


# --------------------------------------------------------------------------- local launcher
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (for a local job)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def launch_ranks(n: int, run_args: Sequence[str], *, rank0_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", grace_s: float = 10.0) -> int:
    """``tensorstream run RUN_ARGS`` as ranks 0..n-1 of one local job; wait for them.

    Sets ``TENSORSTREAM_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/``WORKERS``
    (free loopback ports). SIGINT/SIGTERM are forwarded (the ranks stop together and
    checkpoint). When a rank fails, the others cannot finish their collectives: they
    get SIGTERM, then SIGKILL after ``grace_s``. Returns the first non-zero exit code.
    """
    ports = free_ports(n + 1, host)
    base = {**os.environ, **(env or {}), ENV + "WORLD_SIZE": str(n), ENV + "MASTER_ADDR": host,
            ENV + "MASTER_PORT": str(ports[0]), ENV + "WORKERS": ",".join(f"{host}:{p}" for p in ports[1:])}
    procs = [subprocess.Popen([sys.executable, "-m", "tensorstream", "run", *run_args, *(rank0_args if i == 0 else ())],
                              env={**base, ENV + "RANK": str(i)}) for i in range(n)]
    log.info("started %d ranks: %s", n, [p.pid for p in procs])

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    prev = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                break
            time.sleep(0.2)
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c), 0)
