"""Admin helpers: create topics if missing, describe them, read end offsets."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tensorstream.kafka.config import KafkaConfig, weak_callback


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    #: per partition: (low watermark, high watermark = next offset to be written)
    watermarks: dict[int, tuple[int, int]]

    @property
    def records(self) -> int:
        return sum(hi - lo for lo, hi in self.watermarks.values())


#: client errors that retrying will not fix (a CA that does not verify the broker,
#: refused credentials): raised at once instead of after a metadata timeout
_FAIL_FAST = frozenset({KafkaError._SSL, KafkaError._AUTHENTICATION})


class KafkaConnectError(RuntimeError):
    """The client cannot connect for a reason retries will not fix (TLS verification, authentication)."""


def fail_fast_error(err: KafkaError) -> str | None:
    """The reason, if ``err`` (from a client's error_cb) is a verdict on our settings rather than a
    dropped connection: TLS verification, authentication, a fatal error, a TLS alert from the server
    (e.g. "certificate required" under mutual TLS arrives as a transport error)."""
    tls_alert = err.code() == KafkaError._TRANSPORT and "SSL alert" in err.str()
    return err.str() if err.code() in _FAIL_FAST or err.fatal() or tls_alert else None


class KafkaAdmin:
    def __init__(self, config: KafkaConfig):
        self.config = config
        self._admin: AdminClient | None = None
        self._setup_error: KafkaError | None = None

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({**self.config.client_settings(), "error_cb": weak_callback(self._on_error)})
        return self._admin

    def _on_error(self, err: KafkaError) -> None:
        if fail_fast_error(err):
            self._setup_error = err

    def _raise_setup_error(self) -> None:
        self.admin.poll(0)  # serves error_cb
        err = self._setup_error
        if err is not None:
            raise KafkaConnectError(f"cannot connect to {self.config.bootstrap_servers} "
                                    f"(security.protocol={self.config.security_protocol or 'PLAINTEXT'}): "
                                    f"{err.str()}")

    def list_topics(self, timeout: float = 10.0) -> dict[str, int]:
        # Growing slices instead of one long wait: between them, error_cb reports a TLS or
        # SASL failure within a fraction of a second (librdkafka itself retries silently).
        deadline = time.monotonic() + timeout
        step = 0.25
        while True:
            try:
                md = self.admin.list_topics(timeout=max(0.01, min(step, deadline - time.monotonic())))
                break
            except KafkaException:
                self._raise_setup_error()
                if time.monotonic() >= deadline:
                    raise
                step *= 2
                time.sleep(0.02)  # never a busy loop, should an error come back at once
        return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}

    def ensure_topic(self, name: str, partitions: int = 1, config: dict[str, str] | None = None,
                     timeout: float = 15.0) -> bool:
        """Create ``name`` with ``partitions`` partitions if it does not exist.

        Returns True if created. An existing topic with fewer partitions than
        asked is an error (silently using fewer would cap parallelism).
        """
        existing = self.list_topics(timeout).get(name)
        if existing is not None:
            if existing < partitions:
                raise ValueError(f"topic {name!r} exists with {existing} partitions, fewer than the {partitions} asked")
            return False
        fut = self.admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=-1,
                                                 config=config or {})])[name]
        try:
            fut.result(timeout)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            return False
        self._wait_visible(name, timeout)
        return True

    def _wait_visible(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name in self.list_topics(timeout):
                return
            time.sleep(0.05)
        raise TimeoutError(f"topic {name!r} was created but is not visible after {timeout:.0f}s")

    def delete_topic(self, name: str, timeout: float = 15.0) -> None:
        self.admin.delete_topics([name])[name].result(timeout)

    def describe(self, name: str, timeout: float = 10.0) -> TopicInfo:
        """Partitions and watermarks of a topic (KeyError if it does not exist)."""
        n = self.list_topics(timeout).get(name)
        if n is None:
            raise KeyError(f"topic {name!r} does not exist")
        c = Consumer({**self.config.client_settings(), "group.id": f"tensorstream.admin.{uuid.uuid4().hex}"})
        try:
            marks = {p: c.get_watermark_offsets(TopicPartition(name, p), timeout=timeout) for p in range(n)}
        finally:
            c.close()
        return TopicInfo(name, n, marks)

    def end_offsets(self, name: str, timeout: float = 10.0) -> dict[tuple[str, int], int]:
        """The next offset to be written on each partition (bounded reads stop there).

        Read from the high watermark that a *fetch* reports, not from
        ListOffsets: the embedded Tansu broker answers ListOffsets with the base
        offset of the last record batch + 1, which undercounts batched topics.
        We start one record before the listed end and read to partition EOF;
        on a correct broker that reads at most one record per partition.
        """
        info = self.describe(name, timeout)
        c = Consumer({**self.config.client_settings(), "group.id": f"tensorstream.admin.{uuid.uuid4().hex}",
                      "enable.partition.eof": True, "enable.auto.commit": False})
        try:
            todo = {p for p, (lo, hi) in info.watermarks.items() if hi > lo}
            c.assign([TopicPartition(name, p, max(lo, hi - 1)) for p, (lo, hi) in info.watermarks.items()
                      if p in todo])
            deadline = time.monotonic() + timeout
            while todo and time.monotonic() < deadline:
                for m in c.consume(1000, 0.2):
                    if m.error() is not None and m.error().code() == KafkaError._PARTITION_EOF:
                        todo.discard(m.partition())
            if todo:
                raise TimeoutError(f"could not read the end of {name!r} partitions {sorted(todo)} in {timeout:.0f}s")
            ends = {}
            for p, (lo, hi) in info.watermarks.items():
                fetched = c.get_watermark_offsets(TopicPartition(name, p), cached=True)
                ends[(name, p)] = max(hi, fetched[1]) if fetched and hi > lo else hi
            return ends
        finally:
            c.close()
