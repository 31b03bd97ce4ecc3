"""Consumer-group source: batched consume, explicit-offset commits, rebalance hooks.

A thin wrapper over confluent-kafka's ``Consumer``: it connects lazily, never
auto-commits (offsets are committed only when the caller says the work they
cover is durable), and turns client errors into exceptions instead of log noise.

>>> src = KafkaSource(KafkaConfig.local("127.0.0.1:9092"), group_id="g", topics=["t"])  # doctest: +SKIP
>>> for rec in src.poll_batch(500, timeout=1.0):                                        # doctest: +SKIP
...     handle(rec)
>>> src.commit({("t", 0): 42})    # next offset to read on partition 0             # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition

from tensorstream.kafka.config import KafkaConfig, weak_callback

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition)


@dataclass(slots=True)
class Record:
    """One consumed record (the parts the pipeline uses)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    timestamp_ms: int | None

    @classmethod
    def from_message(cls, m: Message) -> Record:
        ts_type, ts = m.timestamp()
        return cls(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers(),
                   ts if ts_type else None)


class ConsumeError(RuntimeError):
    """A non-retriable consumer error (the client cannot go on by itself)."""


class KafkaSource:
    """A member of a consumer group reading ``topics``.

    ``on_assign`` / ``on_revoke`` receive lists of ``(topic, partition)``.
    ``start_offsets`` (optional) is asked for each newly assigned partition and
    may return the offset to start from (e.g. the offsets stored in a model
    checkpoint) or None to use the group's committed offset.
    """

    def __init__(
        self,
        config: KafkaConfig,
        group_id: str,
        topics: Iterable[str],
        *,
        auto_offset_reset: str = "earliest",
        on_assign: Callable[[list[TP]], None] | None = None,
        on_revoke: Callable[[list[TP]], None] | None = None,
        start_offsets: Callable[[TP], int | None] | None = None,
        **overrides: Any,
    ):
        self.config = config
        self.group_id = group_id
        self.topics = list(topics)
        self._settings = {
            **config.consumer_settings(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": auto_offset_reset,
            # Partition EOF events let bounded readers know they reached the end.
            "enable.partition.eof": True,
            # Notice topics created after subscribing within seconds, not librdkafka's 5 minutes.
            "topic.metadata.refresh.interval.ms": 5000,
            # Client-wide errors (TLS verification, authentication) reach only error_cb, never consume().
            "error_cb": weak_callback(self._on_error),
            **overrides,
        }
        self._client_error: KafkaError | None = None
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._start_offsets = start_offsets
        self._consumer: Consumer | None = None
        self.assigned: set[TP] = set()
        self.at_eof: set[TP] = set()
        self._revoked_pending = False

    # -- connection -------------------------------------------------------
    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(self._settings, logger=log)
            revoked = weak_callback(self._revoked)
            self._consumer.subscribe(self.topics, on_assign=weak_callback(self._assigned), on_revoke=revoked,
                                     on_lost=revoked)
        return self._consumer

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        if self._start_offsets is not None:
            starts = {(p.topic, p.partition): self._start_offsets((p.topic, p.partition)) for p in partitions}
            ends = self._ends_beyond({tp: off for tp, off in starts.items() if off is not None})
            for p in partitions:
                off = starts[(p.topic, p.partition)]
                if off is not None and (p.topic, p.partition) not in ends:
                    p.offset = off
            consumer.assign(partitions)  # offsets set here override the committed ones
        self.assigned.update(tps)
        self._revoked_pending = False
        log.info("assigned %s", tps)
        if self._on_assign:
            self._on_assign(tps)

    def _ends_beyond(self, starts: Mapping[TP, int]) -> dict[TP, int]:
        """The partitions whose requested start lies beyond their end (the topic was recreated
        or truncated), with their end; those start where ``auto.offset.reset`` says instead.

        A correct broker answers such a fetch with OFFSET_OUT_OF_RANGE and the client
        resets by itself; the embedded Tansu broker just returns nothing, forever.
        """
        if not any(off > 0 for off in starts.values()):
            return {}
        from tensorstream.kafka.admin import KafkaAdmin

        try:
            admin = KafkaAdmin(self.config)
            ends: dict[TP, int] = {}
            for topic in {t for t, _ in starts}:
                ends.update(admin.end_offsets(topic, timeout=10))
        except Exception as e:  # cannot tell: trust the requested offsets
            log.debug("could not read the end offsets of %s: %s", sorted(starts), e)
            return {}
        beyond = {tp: ends[tp] for tp, off in starts.items() if tp in ends and off > ends[tp]}
        for (t, p), end in beyond.items():
            log.warning("%s[%d] ends at offset %d, before the position %d to resume from: the topic was recreated "
                        "or truncated; starting from auto.offset.reset (%s) instead", t, p, end, starts[(t, p)],
                        self._settings.get("auto.offset.reset"))
        return beyond

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.info("revoked %s", tps)
        if self._on_revoke:
            self._on_revoke(tps)  # the caller commits what is durable, here, before we let go
        self.assigned.difference_update(tps)
        self.at_eof.difference_update(tps)
        self._revoked_pending = not self.assigned  # a rebalance is on: an assignment follows

    # -- reading ----------------------------------------------------------
    def _on_error(self, err: KafkaError) -> None:
        if err.fatal() or err.code() in _FATAL_CODES:
            self._client_error = err  # raised by poll_batch: retrying will not fix it
        else:
            log.debug("consumer: %s", err.str())  # transient (broker down...): librdkafka retries

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds."""
        msgs = self.consumer.consume(max_records, timeout)
        if self._client_error is not None:
            raise ConsumeError(f"consumer cannot connect to {self.config.bootstrap_servers}: "
                               f"{self._client_error.str()}")
        out: list[Record] = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(Record.from_message(m))
                self.at_eof.discard((m.topic(), m.partition()))
            elif err.code() == KafkaError._PARTITION_EOF:
                self.at_eof.add((m.topic(), m.partition()))
            elif err.fatal() or not err.retriable() and err.code() in _FATAL_CODES:
                raise ConsumeError(f"consumer error: {err.str()}")
            else:
                log.warning("consumer: %s", err.str())
        return out

    @property
    def at_end(self) -> bool:
        """Every assigned partition has been read to its end (False before any assignment)."""
        return bool(self.assigned) and self.at_eof >= self.assigned

    def pause(self, tps: Iterable[TP] | None = None) -> None:
        self.consumer.pause(self._tps(tps))

    def resume(self, tps: Iterable[TP] | None = None) -> None:
        self.consumer.resume(self._tps(tps))

    def seek(self, tp: TP, offset: int) -> None:
        self.consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def _tps(self, tps: Iterable[TP] | None) -> list[TopicPartition]:
        chosen = self.assigned if tps is None else tps
        return [TopicPartition(t, p) for t, p in chosen]

    # -- offsets ----------------------------------------------------------
    def commit(self, offsets: Mapping[TP, int]) -> None:
        """Commit explicit offsets (the NEXT offset to read), synchronously.

        Raises ``KafkaException`` if the broker refuses any of them.
        """
        if not offsets:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        result = self.consumer.commit(offsets=tps, asynchronous=False)
        failed = [tp for tp in (result or []) if tp.error is not None]
        if failed:
            raise KafkaException(failed[0].error)

    def try_commit(self, offsets: Mapping[TP, int]) -> bool:
        """:meth:`commit`, but a refusal (a rebalance, a broker outage) is logged and returns False.

        The offsets stay uncommitted, so those records may be processed again
        (at-least-once), never skipped; the caller keeps them for its next try.
        """
        try:
            self.commit(offsets)
            return True
        except KafkaException as e:
            log.warning("offset commit failed (%s); will retry", e.args[0].str() if e.args else e)
            return False

    def committed(self, tps: Iterable[TP], timeout: float = 10.0) -> dict[TP, int | None]:
        res = self.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout)
        return {(r.topic, r.partition): (None if r.offset == OFFSET_INVALID else r.offset) for r in res}

    def group_metadata(self) -> Any:
        """For ``send_offsets_to_transaction`` (exactly-once mode)."""
        return self.consumer.consumer_group_metadata()

    def close(self, settle_s: float = 10.0) -> None:
        """Leave the group now, so the others rebalance at once.

        Closing in the middle of a rebalance (our partitions revoked, the new
        assignment not yet received) is deferred until that assignment arrives,
        at most ``settle_s`` seconds: the embedded Tansu broker was seen to keep
        such a group from ever completing another join. Records polled meanwhile
        are dropped (never processed: they stay uncommitted).
        """
        if self._consumer is not None:
            if self._revoked_pending and settle_s > 0:
                deadline = time.monotonic() + settle_s
                while self._revoked_pending and time.monotonic() < deadline:
                    self._consumer.poll(0.1)
            self._consumer.close()
            self._consumer = None
        self.assigned.clear()

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_FATAL_CODES = {
    KafkaError._AUTHENTICATION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError._SSL,
}
