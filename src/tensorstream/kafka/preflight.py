"""Before the first record: is the broker there, do the topics exist? One sentence if not.

A Kafka client pointed at a dead address retries forever and logs every
attempt; a pipeline would print hundreds of "Connection refused" lines and wait
at its group join. :func:`check_broker` asks once, with a deadline, keeps the
client's own log lines to itself, and turns the outcome into one sentence.

>>> check_broker(KafkaConfig.local("127.0.0.1:1"), timeout=1)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tensorstream.kafka.preflight.BrokerUnreachable: cannot reach a Kafka broker at 127.0.0.1:1 within ...s (Connection refused)...
"""

from __future__ import annotations

import logging
import re
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from tensorstream.kafka.admin import KafkaConnectError, fail_fast_error
from tensorstream.kafka.config import KafkaConfig


#: a connection refused for this long is an answer (nothing listens there); other failures wait the whole timeout
REFUSED_S = 1.5


class BrokerUnreachable(KafkaConnectError):
    """No broker answered at the configured address within the deadline (or TLS/SASL refused us)."""


class _Collect(logging.Handler):
    """Keeps a client's log lines (librdkafka's) instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 50:
            self.messages.append(record.getMessage())


def _reason(messages: list[str]) -> str:
    """The most telling part of librdkafka's last complaint, e.g. "Connection refused"."""
    for m in reversed(messages):
        found = re.search(r"failed: (.+?)(?: \(after \d+ms in state \w+\))?$", m)
        if found:
            return found.group(1)
    for m in reversed(messages):
        if "SSL" in m or "SASL" in m or "resolve" in m.lower():
            return m.split("]: ", 1)[-1]
    return ""


def check_broker(config: KafkaConfig, timeout: float = 5.0) -> set[str]:
    """The topics of the cluster at ``config``; :class:`BrokerUnreachable` within ``timeout`` if none answers."""
    collect = _Collect()
    logger = logging.getLogger(f"tensorstream.preflight.{id(collect)}")
    logger.addHandler(collect)
    logger.propagate = False
    t0 = time.monotonic()
    verdicts: list[str] = []  # TLS / SASL refusals: retrying will not help, so say so at once

    def on_error(err: object) -> None:
        reason = fail_fast_error(err)
        if reason:
            verdicts.append(reason)

    try:
        admin = AdminClient({**config.client_settings(), "logger": logger, "error_cb": on_error})
        try:
            while True:  # short slices: a refused connection is known long before the deadline
                try:
                    return set(admin.list_topics(timeout=min(0.5, timeout)).topics)
                except KafkaException as e:
                    admin.poll(0)  # serve the client's queued log lines and errors (the reason is in them)
                    reason = verdicts[0] if verdicts else (_reason(collect.messages)
                                                           or (e.args[0].str() if e.args else str(e)))
                    waited = time.monotonic() - t0
                    if verdicts:
                        raise BrokerUnreachable(
                            f"cannot connect to {config.bootstrap_servers} (security.protocol="
                            f"{config.security_protocol or 'PLAINTEXT'}): {reason}") from None
                    if waited >= timeout or (reason == "Connection refused" and waited >= REFUSED_S):
                        raise BrokerUnreachable(
                            f"cannot reach a Kafka broker at {config.bootstrap_servers} within {waited:.0f}s "
                            f"({reason}); check --bootstrap-servers / TENSORSTREAM_BOOTSTRAP_SERVERS, or leave "
                            "them unset to use the embedded broker") from None
        finally:
            del admin  # frees the client (and its retries) now
    finally:
        logger.removeHandler(collect)


def missing_topics(existing: set[str], wanted: list[str]) -> list[str]:
    """``wanted`` topics not in ``existing`` (in order).

    >>> missing_topics({"a", "b"}, ["a", "c"])
    ['c']
    """
    return [t for t in wanted if t not in existing]
