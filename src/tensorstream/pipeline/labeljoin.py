"""Delayed labels: the features topic and a labels topic, read by one consumer, merged in time order.

The join itself (predictions waiting for their labels, bounded, checkpointed)
is the learner's (``learn/delayed.py``); this module feeds it: it orders the
records of both topics into micro-batches (:class:`MergedBatcher`) and turns
label records into ``(key, value)`` pairs (:func:`decode_labels`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tensorstream.codecs import DecodeError
from tensorstream.kafka import TP, KafkaSource, Record
from tensorstream.pipeline.batching import IDLE_POLL_S
from tensorstream.spec import DelayedLabelsSpec


class MergedBatcher:
    """Micro-batches of features and labels records in record-time order.

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

    def __init__(self, source: KafkaSource, labels: DelayedLabelsSpec) -> None:
        self.source = source
        self.labels_topic = labels.topic
        self.window = labels.window
        self._held: dict[TP, deque[Record]] = {}
        self._held_next: dict[TP, int] = {}
        self._ready: deque[Record] = deque()
        self._paused: set[TP] = set()

    def next_batch(self, max_size: int, max_wait: float, stopped: Callable[[], bool]) -> list[Record]:
        deadline = time.monotonic() + max_wait
        while len(self._ready) < max_size and not stopped():
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
        held = self._held
        for rec in recs:
            tp = (rec.topic, rec.partition)
            if rec.offset < self._held_next.get(tp, -1):
                continue  # fetched again (after a rebalance): already held
            self._held_next[tp] = rec.offset + 1
            held.setdefault(tp, deque()).append(rec)
        out: list[Record] = []
        while True:
            heads = []
            for tp in self.source.assigned:
                q = held.get(tp)
                if q:  # features before labels on a tie: a label never waits for its own record's twin
                    heads.append(((q[0].timestamp_ms or 0), tp[0] == self.labels_topic, tp))
                elif tp not in self.source.at_eof:
                    heads = []  # an empty partition that may still hold older records: wait for it
                    break
            if not heads:
                break
            out.append(held[min(heads)[2]].popleft())
        cap = self.window
        for tp, q in held.items():
            if len(q) >= cap and tp not in self._paused and tp in self.source.assigned:
                self.source.pause([tp])  # librdkafka drops what it fetched for it; resume re-fetches
                self._paused.add(tp)
            elif len(q) <= cap // 2 and tp in self._paused:
                self.source.resume([tp])
                self._paused.discard(tp)
        return out

    def drop(self, tps: list[TP]) -> None:
        """Revoked partitions: their held records are the new owner's (it reads from the commit)."""
        gone = set(tps)
        for tp in gone:
            self._held.pop(tp, None)
            self._held_next.pop(tp, None)
            self._paused.discard(tp)
        self._ready = deque(r for r in self._ready if (r.topic, r.partition) not in gone)


def decode_labels(recs: list[Record], codec: Any, field_name: str, key_field: str | None,
                  dead_letter: Callable[[Record, str, str], None]) -> tuple[list[Any], list[Any], list[Record]]:
    """Label records -> ``(keys, values, records)``; undecodable ones are dead-lettered."""
    keys: list[Any] = []
    values: list[Any] = []
    keep: list[Record] = []
    for rec in recs:
        try:
            d = codec.decode_value(rec.value)
        except DecodeError as e:
            dead_letter(rec, "decode_error", str(e))
            continue
        if not isinstance(d, dict) or field_name not in d:
            dead_letter(rec, "missing_field", f"a label record needs the field {field_name!r}")
            continue
        keys.append(rec.key if key_field is None else d.get(key_field))
        values.append(d[field_name])
        keep.append(rec)
    return keys, values, keep
