"""Dead letters that always fit, and the stop when too many records are bad.

A bad record (undecodable, wrong shape, out of range...) goes to the
dead-letter topic with the reason in its headers; the pipeline goes on. The
dead letter carries the original value, so a record too large for the
producer (or the broker) would fail to be dead-lettered, and the record would
be in neither the predictions nor the DLQ. So a dead letter over ``max_bytes``
is written with its value truncated (and its original headers dropped when
they alone are too large), with headers saying so:

- ``dlq.truncated: true``, ``dlq.original.size`` (bytes), ``dlq.original.sha256``
  (hex, of the whole original value): enough to find and check the original
  in the source topic at ``source.topic/partition/offset``.

If a dead letter still cannot be delivered, the flush of the unit fails, and
the :class:`~tensorstream.delivery.engine.DeliveryEngine` makes that sticky:
nothing past it is committed and the run stops with a non-zero exit.

>>> class Sink:
...     def __init__(self): self.sent = []
...     def produce(self, topic, value, key=None, headers=None): self.sent.append((topic, value, dict(headers)))
>>> dlq = DeadLetters(Sink(), "p.dlq", max_bytes=2048)
>>> class Rec: topic, partition, offset, key, headers = "in", 0, 7, b"k", None
>>> r = Rec(); r.value = b"x" * 10_000
>>> dlq.send(r, "decode_error", "not JSON")
>>> topic, value, headers = dlq.sink.sent[0]
>>> len(value) < 2048, headers["dlq.truncated"], headers["dlq.original.size"], headers["source.offset"]
(True, b'true', b'10000', b'7')
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, deque
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: librdkafka's default ``message.max.bytes`` (the producer's limit for one record)
PRODUCER_MAX_BYTES = 1_000_000
#: room kept for the record's framing and our own headers when computing what fits
_FRAMING = 512
#: an error message longer than this is cut (it is a header)
_MAX_MESSAGE = 4096


class DeadLetterError(RuntimeError):
    """Too many bad records: the pipeline stops instead of draining a broken upstream into the DLQ."""


class _Sink(Protocol):
    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, headers: Any = None) -> None: ...


def _header_bytes(headers: list[tuple[str, bytes]] | None) -> int:
    return sum(len(k) + len(v or b"") + 8 for k, v in headers or ())


class DeadLetters:
    """Writes dead letters to ``topic`` through ``sink``, each one fitting in ``max_bytes``.

    ``max_bytes`` is the smaller of what the producer accepts
    (``message.max.bytes``) and what the topic accepts; records read from the
    source may be larger than either.
    """

    def __init__(self, sink: _Sink, topic: str, *, max_bytes: int = PRODUCER_MAX_BYTES,
                 on_dead_letter: Any = None) -> None:
        self.sink = sink
        self.topic = topic
        self.max_bytes = max_bytes
        self.count = 0
        self.truncated = 0
        self.by_type: Counter[str] = Counter()
        #: the first reason seen (quoted by stop messages)
        self.first: str | None = None
        self._on_dead_letter = on_dead_letter

    def send(self, rec: Any, error_type: str, message: str) -> None:
        """Dead-letter ``rec`` (anything with topic/partition/offset/key/value/headers)."""
        self.count += 1
        self.by_type[error_type] += 1
        where = f"{rec.topic}[{rec.partition}]@{rec.offset}"
        if self.first is None:
            self.first = f"{where}: {error_type}: {message}"
        log.debug("dead letter %s: %s: %s", where, error_type, message)
        if self._on_dead_letter is not None:
            self._on_dead_letter(error_type)
        value, key, headers = self.fit(rec, error_type, message)
        self.sink.produce(self.topic, value, key=key, headers=headers)

    def fit(self, rec: Any, error_type: str, message: str
            ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """The dead letter of ``rec``: (value, key, headers), within ``max_bytes``."""
        value, key = rec.value, rec.key
        original = list(rec.headers or [])
        ours = [
            ("error.type", error_type.encode()),
            ("error.message", message.encode()[:_MAX_MESSAGE]),
            ("source.topic", rec.topic.encode()),
            ("source.partition", str(rec.partition).encode()),
            ("source.offset", str(rec.offset).encode()),
        ]
        budget = self.max_bytes - _FRAMING
        size = len(value or b"") + len(key or b"") + _header_bytes(original) + _header_bytes(ours)
        if size <= budget:
            return value, key, [*original, *ours]
        notes = [("dlq.truncated", b"true"), ("dlq.original.size", str(len(value or b"")).encode()),
                 ("dlq.original.sha256", hashlib.sha256(value or b"").hexdigest().encode())]
        if key is not None and len(key) > budget // 4:
            notes += [("dlq.key.truncated", b"true"), ("dlq.original.key.size", str(len(key)).encode())]
            key = key[: budget // 4]
        if _header_bytes(original) > budget // 4:
            notes.append(("dlq.headers.dropped", str(len(original)).encode()))
            original = []
        headers = [*original, *ours, *notes]
        room = max(0, budget - len(key or b"") - _header_bytes(headers))
        self.truncated += 1
        return (value or b"")[:room], key, headers


class BadRateGuard:
    """Stops the run when the recent bad-record rate is over ``max_rate`` (a broken upstream).

    >>> g = BadRateGuard(max_rate=0.5, min_records=10, topic="p.dlq")
    >>> g.observe(10, 2)
    >>> try:
    ...     g.observe(10, 9)
    ... except DeadLetterError as e:
    ...     print(str(e)[:53])
    9 of the last 10 records were bad (90% > dead_letter.
    """

    def __init__(self, max_rate: float, min_records: int, topic: str) -> None:
        self.max_rate = max_rate
        self.min_records = min_records
        self.topic = topic
        self._recent: deque[tuple[int, int]] = deque()
        self._total = 0
        self._bad = 0

    def observe(self, n: int, n_bad: int, first_reason: str | None = None) -> None:
        """``n`` records of which ``n_bad`` were bad; raise :class:`DeadLetterError` over the limit."""
        self._recent.append((n, n_bad))
        self._total += n
        self._bad += n_bad
        while self._recent and self._total - self._recent[0][0] >= self.min_records:
            r, b = self._recent.popleft()
            self._total -= r
            self._bad -= b
        if self._total >= self.min_records and self._bad / self._total > self.max_rate:
            reason = f"; first: {first_reason}" if first_reason else ""
            raise DeadLetterError(
                f"{self._bad} of the last {self._total} records were bad ({self._bad / self._total:.0%} > "
                f"dead_letter.max_rate {self.max_rate:.0%}): stopping instead of draining a broken upstream "
                f"into {self.topic}{reason}")
