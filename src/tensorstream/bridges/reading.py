"""Reading assigned partitions, bounded or unbounded (:class:`PartitionReader`)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from tensorstream.kafka import TP

from tensorstream.bridges.options import StreamOptions, _consumer, end_offsets, start_offsets

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- reading


class PartitionReader:
    """Reads an explicit set of partitions (``assign()``, no group join) in chunks of messages.

    Bounded: a partition is done once its record before the captured end offset
    was read (or EOF at or past it); records written later are dropped. The
    stream ends when every partition is done. ``idle_timeout`` seconds without a
    record end an unbounded stream cleanly; in a bounded one they raise
    ``TimeoutError`` (the promised end was not reached).
    """

    def __init__(self, opts: StreamOptions, assignment: Sequence[TP]):
        self.opts = opts
        self.assignment = list(assignment)
        self.consumer: Consumer | None = None
        self.starts: dict[TP, int] = {}
        self.ends: dict[TP, int] | None = None
        self.done: set[TP] = set()

    def open(self) -> PartitionReader:
        self.consumer = _consumer(self.opts)
        until = self.opts.until
        tail = isinstance(self.opts.start, int)
        ends = None
        if until == "end" or tail or (isinstance(until, Mapping) and not set(self.assignment) <= set(until)):
            ends = end_offsets(self.opts.config, self.assignment)
        if isinstance(until, Mapping):
            self.ends = {tp: until.get(tp, ends[tp] if ends else 0) for tp in self.assignment}
        else:
            self.ends = ends if until == "end" else None
        self.starts = start_offsets(self.consumer, self.assignment, self.opts.start, ends=ends)
        if self.ends is not None:
            self.done = {tp for tp in self.assignment if self.starts[tp] >= self.ends[tp]}
        todo = [TopicPartition(t, p, self.starts[(t, p)]) for t, p in self.assignment if (t, p) not in self.done]
        self.consumer.assign(todo)
        log.debug("reader assigned %s (starts %s, ends %s)", self.assignment, self.starts, self.ends)
        return self

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()  # never joined a group: nothing to leave, no rebalance caused
            self.consumer = None

    def __enter__(self) -> PartitionReader:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _finished(self) -> bool:
        return self.ends is not None and len(self.done) == len(self.assignment)

    def _mark_done(self, tp: TP) -> None:
        log.debug("partition %s[%d] done (end offset %s)", tp[0], tp[1], self.ends and self.ends.get(tp))
        self.done.add(tp)
        assert self.consumer is not None
        self.consumer.pause([TopicPartition(*tp)])  # stop fetching what we would drop

    def _events(self, events: Sequence[Message]) -> None:
        for m in events:
            err = m.error()
            if err.code() == KafkaError._PARTITION_EOF:
                tp = (m.topic(), m.partition())
                if self.ends is not None and tp not in self.done and m.offset() >= self.ends[tp]:
                    self._mark_done(tp)
            elif err.fatal() or err.code() in _FATAL_CODES:
                raise KafkaException(err)
            else:
                log.warning("consumer: %s", err.str())

    def _clip(self, msgs: list[Message]) -> list[Message]:
        """Bounded reads: drop records at or past the end offsets, mark partitions that reached them."""
        assert self.ends is not None
        last: dict[TP, int] = {}
        for m in reversed(msgs):  # offsets grow within a partition: the last one per partition decides
            tp = (m.topic(), m.partition())
            if tp not in last:
                last[tp] = m.offset()
                if len(last) == len(self.assignment):
                    break
        over = {tp for tp, off in last.items() if off + 1 >= self.ends[tp] or tp in self.done}
        if not over:
            return msgs  # the common case: nothing near an end
        stale = set(self.done)  # partitions finished before this chunk: anything still arriving is extra
        for tp in over - self.done:
            self._mark_done(tp)
        return [m for m in msgs
                if (m.topic(), m.partition()) not in over
                or ((m.topic(), m.partition()) not in stale and m.offset() < self.ends[(m.topic(), m.partition())])]

    def chunks(self, size: int | None, max_fetch: int = 2000) -> Iterator[list[Message]]:
        """Lists of ``size`` messages (the last may be shorter); ``size=None``: whatever arrived."""
        assert self.consumer is not None, "open() first"
        opts = self.opts
        buf: deque[Message] = deque()
        first_at: float | None = None  # when the oldest buffered message arrived
        last_data = time.monotonic()
        fetch = max(size or 0, max_fetch)
        while not self._finished():
            # What is queued locally, at once; block (up to poll_timeout) only when nothing is:
            # consume(n, t) waits for all n messages or t, which would stall a training step.
            msgs = self.consumer.consume(fetch, 0)
            if not msgs:
                msgs = self.consumer.consume(1, opts.poll_timeout)
            now = time.monotonic()
            events = [m for m in msgs if m.error() is not None]  # EOF markers, errors: rare
            if events:
                msgs = [m for m in msgs if m.error() is None]
            if self.ends is not None and msgs:
                msgs = self._clip(msgs)
            if events:
                # After the records: one poll can hold a partition's last records *and* its EOF
                # marker; marking it done first would drop those records as extra.
                self._events(events)
            got = bool(msgs)
            buf.extend(msgs)
            if got:
                last_data = now
                if first_at is None:
                    first_at = now
            if size is None:
                if buf:
                    yield list(buf)
                    buf.clear()
                    first_at = None
            else:
                while len(buf) >= size:
                    yield [buf.popleft() for _ in range(size)]
                    first_at = now if buf else None
                if buf and opts.max_wait is not None and first_at is not None and now - first_at >= opts.max_wait:
                    yield list(buf)
                    buf.clear()
                    first_at = None
            if opts.idle_timeout is not None and now - last_data >= opts.idle_timeout and not self._finished():
                if self.ends is None:
                    break
                missing = {tp: self.ends[tp] for tp in self.assignment if tp not in self.done}
                raise TimeoutError(f"bounded read stalled: no record for {opts.idle_timeout:.1f}s and partitions "
                                   f"{sorted(missing)} have not reached their end offsets {missing}")
        if buf:
            yield list(buf)


_FATAL_CODES = {
    KafkaError._AUTHENTICATION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError._SSL,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
}


def probe(opts: StreamOptions, timeout: float = 10.0, max_records: int = 32) -> list[Message]:
    """A few records from where a reader would start (to learn shapes before streaming)."""
    tps = opts.partitions()
    c = _consumer(opts)
    try:
        ends = end_offsets(opts.config, tps) if isinstance(opts.start, int) else None
        starts = start_offsets(c, tps, opts.start, ends=ends)
        c.assign([TopicPartition(t, p, starts[(t, p)]) for t, p in tps])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = [m for m in c.consume(max_records, 0.1) if m.error() is None]
            if msgs:
                return msgs
        return []
    finally:
        c.close()
