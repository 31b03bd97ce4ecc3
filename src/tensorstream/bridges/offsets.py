"""Offsets of handed-out batches and their commits (:class:`OffsetCommitter`, :class:`BatchLedger`)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from tensorstream.delivery import DeliveryEngine
from tensorstream.kafka import TP, KafkaConfig

log = logging.getLogger(__name__)


class _Coverage:
    """Turns read messages into contiguous offset ranges, advanced only when a batch is handed out."""

    def __init__(self, topics: Sequence[str], starts: Mapping[TP, int]):
        self.topic_index = {t: i for i, t in enumerate(topics)}
        self.cursor = dict(starts)  # first offset not yet handed out, per partition
        self.read: dict[TP, int] = {}  # next offset after what was read but not yet handed out

    def add(self, messages: Sequence[Message]) -> None:
        # Offsets only grow within a partition: the last message of each partition is enough.
        # Scan from the end and stop once every partition of this reader has been seen.
        seen: set[TP] = set()
        everyone = len(self.cursor)
        for m in reversed(messages):
            tp = (m.topic(), m.partition())
            if tp not in seen:
                seen.add(tp)
                self.read[tp] = m.offset() + 1
                if len(seen) == everyone:
                    break

    def add_one(self, m: Message) -> None:
        self.read[(m.topic(), m.partition())] = m.offset() + 1

    def take(self) -> np.ndarray:
        rows = [(self.topic_index[t], p, self.cursor.get((t, p), nxt), nxt) for (t, p), nxt in self.read.items()]
        for tp, nxt in self.read.items():
            self.cursor[tp] = nxt
        self.read.clear()
        return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


# --------------------------------------------------------------------------- offsets


def offsets_to_commit(offsets: Any, topics: Sequence[str]) -> dict[TP, int]:
    """The next offset per partition covered by ``offsets`` (any array-like ``[..., 4]``)."""
    arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 4)
    out: dict[TP, int] = {}
    for ti, p, _first, nxt in arr.tolist():
        tp = (topics[ti], p)
        if nxt > out.get(tp, -1):
            out[tp] = nxt
    return out


class OffsetCommitter:
    """Commits the offsets of completed training steps to the consumer group.

    ``mark(offsets)`` after the optimizer step that used a batch; ``commit()``
    sends everything marked (synchronously; raises if the broker refuses).
    It never joins the group (a commit needs no membership), so creating one is
    instant, and it works from the main process while DataLoader workers read.
    The commits go through a :class:`~tensorstream.delivery.DeliveryEngine`, as
    every loop's do (serialised: a late commit never moves offsets back).

    Mark batches in the order the loader yielded them (every training loop
    does): offsets only move forward, and a gap is logged as a likely bug.
    """

    def __init__(self, config: KafkaConfig | str, group_id: str, topics: Sequence[str]):
        self.config = KafkaConfig(bootstrap_servers=config) if isinstance(config, str) else config
        self.group_id = group_id
        self.topics = list(topics)
        self._consumer: Consumer | None = None
        self.engine = DeliveryEngine(committer=self._commit_to_group, refusals=(KafkaException,))

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer({**self.config.consumer_settings(), "group.id": self.group_id,
                                       "enable.auto.commit": False}, logger=log)
        return self._consumer

    @property
    def committed(self) -> dict[TP, int]:
        """What was committed so far, per partition."""
        return dict(self.engine.committed)

    def mark(self, offsets: Any) -> None:
        """Record that the step which used the batch with these offsets has completed."""
        arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 4)
        known = self.engine.positions
        marks: dict[TP, int] = {}
        for ti, p, first, nxt in arr.tolist():
            tp = (self.topics[ti], p)
            last = marks.get(tp, known.get(tp))
            if last is not None and first > last:
                log.warning("offsets of %s[%d] jump from %d to %d: was a batch marked out of order, "
                            "or skipped?", tp[0], p, last, first)
            if last is None or nxt > last:
                marks[tp] = nxt
        self.engine.advance_to(marks)

    @property
    def pending(self) -> dict[TP, int]:
        """Marked offsets not yet committed."""
        return {tp: o for tp, o in dict(self.engine.positions).items() if self.engine.committed.get(tp) != o}

    def commit(self, offsets: Any = None) -> dict[TP, int]:
        """Mark ``offsets`` (if given), then commit every marked offset not yet committed."""
        if offsets is not None:
            self.mark(offsets)
        outcome = self.engine.commit(raise_refusal=True)
        return dict(outcome.offsets or {}) if outcome.committed else {}

    def _commit_to_group(self, todo: dict[TP, int]) -> None:
        result = self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()],
                                      asynchronous=False)
        failed = [r for r in (result or []) if r.error is not None]
        if failed:
            raise KafkaException(failed[0].error)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> OffsetCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Run(deque):
    """The offsets of one pass's handed-out batches not yet credited to a step."""

    finished = False  # the pass handed out its last batch


class BatchLedger:
    """Offsets of handed-out batches, in order, for loops that report *steps*, not batches.

    Keras' ``fit`` tells a callback how many optimizer steps completed, not which
    batches they used. Batches are consumed in the order they were produced, so
    step k used the k-th batch of the stream. Each pass over the data (a new
    iterator, a new "run") starts counting again; steps are credited to the
    latest run, because a loop consumes from one iterator at a time and a new
    one is only created after the previous one's steps were reported.

    Thread-safe: the producer side runs in the data pipeline's thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self.runs = 0

    def start_run(self) -> _Run:
        run = _Run()
        with self._lock:
            self._run = run
            self.runs += 1
        return run

    @staticmethod
    def push(run: _Run, offsets: np.ndarray) -> None:
        run.append(offsets)  # before the batch is handed out, so it is there when its step completes

    @staticmethod
    def finish(run: _Run) -> None:
        run.finished = True

    @property
    def pending(self) -> int:
        """Batches of the current run handed out (or prefetched) whose steps were not reported."""
        run = self._run
        return 0 if run is None else len(run)

    def complete(self, steps: int) -> list[np.ndarray]:
        """The offsets of the next ``steps`` batches of the current run (their steps completed).

        A step count beyond the batches of a *finished* pass is clamped: the
        last, failed fetch of an exhausted iterator still bumps Keras'
        ``optimizer.iterations`` (and a partial final ``steps_per_execution``
        reports a full one), though no batch was trained.
        """
        if steps <= 0:
            return []
        with self._lock:
            run = self._run
            have = 0 if run is None else len(run)
            if have < steps:
                if run is not None and run.finished:
                    steps = have
                else:
                    raise RuntimeError(
                        f"{steps} step(s) completed but only {have} batch(es) were handed out: the dataset was "
                        "rebatched, filtered or unbatched after kafka_dataset(), so steps no longer map to batches")
            assert run is not None or steps == 0
            return [run.popleft() for _ in range(steps)] if run is not None else []
