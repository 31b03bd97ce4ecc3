"""Model versions announced on ``<pipeline>.models``, signed with HMAC-SHA256.

A trainer (or an operator through the CLI) *announces* a version: where its
state file lives (an fsspec URL), the sha256 of that file, metrics, and whether
this is a promotion or a rollback. Inference workers *watch* the topic and swap
in each new version after checking the announcement's signature and, when they
download the file, its sha256. Every announcement of a pipeline has the same
key (the pipeline name), so one partition holds them all in order.

The effective (current) version is always the newest valid announcement: a
rollback is itself an announcement that names an older version again. The
registry keeps a *lineage* stack to know what "previous" means: a promotion
pushes, a rollback pops back to the version it names.

>>> reg = ModelRegistry(cfg, "fraud", key=b"0123456789abcdef0123")       # doctest: +SKIP
>>> reg.publish("v1", "s3://ckpt/fraud/v1.safetensors", metrics={"acc": 0.91})  # doctest: +SKIP
>>> watcher = ModelWatcher(cfg, "fraud", key=b"0123456789abcdef0123")     # doctest: +SKIP
>>> ann = watcher.poll()          # between batches: None when nothing is new  # doctest: +SKIP
>>> data = watcher.fetch_verified(ann)   # bytes whose sha256 matched   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from pydantic import ValidationError

from tensorstream.checkpoint.announce import (  # re-exported: one place for the names of model versions
    ENV_KEY, MIN_KEY_BYTES, REJECT_REASONS, SIGNATURE_PREFIX, Key, ModelAnnouncement, ModelIntegrityError,
    ModelVersionError, SigningKeyError, canonical_bytes, fetch_verified, file_sha256, models_topic, resolve_key,
    sign_fields, verify_fields,
)
from tensorstream.kafka import ConsumeError, KafkaAdmin, KafkaConfig, KafkaSink

log = logging.getLogger(__name__)

__all__ = ["ENV_KEY", "MIN_KEY_BYTES", "REJECT_REASONS", "SIGNATURE_PREFIX", "Key", "ModelAnnouncement",
           "ModelIntegrityError", "ModelRegistry", "ModelVersionError", "ModelWatcher", "SigningKeyError",
           "canonical_bytes", "fetch_verified", "file_sha256", "models_topic", "resolve_key", "sign_fields",
           "verify_fields"]

# -- reading the topic -----------------------------------------------------------
class _Log:
    """Folds raw records into verified announcements, the lineage stack and reject counts."""

    def __init__(self, pipeline: str, key: bytes | None, rejected: Counter[str] | None = None):
        self.pipeline = pipeline
        self._key = key
        self.rejected: Counter[str] = rejected if rejected is not None else Counter()
        self.announcements: list[ModelAnnouncement] = []
        self.lineage: list[ModelAnnouncement] = []
        self._seen: set[str] = set()

    @property
    def current(self) -> ModelAnnouncement | None:
        return self.lineage[-1] if self.lineage else None

    def _reject(self, reason: str, where: str, detail: str) -> None:  # returns None for feed()
        self.rejected[reason] += 1
        log.warning("rejected model announcement at %s: %s (%s)", where, reason, detail)

    def feed(self, value: bytes | None, where: str = "?") -> ModelAnnouncement | None:
        if not value:
            return self._reject("malformed", where, "empty record")
        try:
            raw = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            return self._reject("malformed", where, f"not JSON: {e}")
        if not isinstance(raw, dict):
            return self._reject("malformed", where, "not a JSON object")
        if self._key is not None and not verify_fields(raw, self._key):
            detail = "unsigned" if not raw.get("signature") else "signature does not match the fields"
            return self._reject("bad_signature", where, detail)
        try:
            ann = ModelAnnouncement.model_validate(raw)
        except ValidationError as e:
            return self._reject("malformed", where, f"{e.error_count()} invalid field(s): {e.errors()[0]['loc']}")
        if ann.pipeline != self.pipeline:
            return self._reject("wrong_pipeline", where, f"for pipeline {ann.pipeline!r}")
        if self._key is not None:
            # Every genuine publish signs a fresh created_at, so an identical signature
            # is a copy of an old record re-produced to roll workers back unasked.
            if ann.signature in self._seen:
                return self._reject("replayed", where, f"copy of an earlier announcement of {ann.version!r}")
            self._seen.add(ann.signature)
        self.announcements.append(ann)
        self._apply(ann)
        return ann

    def _apply(self, ann: ModelAnnouncement) -> None:
        if ann.action == "rollback":
            for i in range(len(self.lineage) - 1, -1, -1):
                if self.lineage[i].version == ann.version:
                    del self.lineage[i:]
                    break
        self.lineage.append(ann)


def _assign_consumer(config: KafkaConfig, topic: str, partitions: int, timeout: float) -> Consumer:
    # KafkaSource always subscribes (joins a group); the models topic is read by
    # every worker in full, so we assign() instead. librdkafka insists on a
    # group.id, but with assign() and no commits no group is ever joined.
    c = Consumer({
        **config.consumer_settings(),
        "group.id": f"tensorstream.models.{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,  # tells readers they reached the end
        "fetch.wait.max.ms": 100,  # new versions show up fast; the topic is tiny
    }, logger=log)
    # Learn the partition leaders first: assigned before that, librdkafka retries
    # the start-offset lookup on a 500 ms timer, which every reader would pay.
    c.list_topics(topic, timeout=timeout)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    return c


def _is_data(m: Message) -> bool:
    """True for a record; False for partition EOF and transient errors (logged); raises on fatal ones."""
    err = m.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        if err.fatal():
            raise ConsumeError(f"models topic consumer: {err.str()}")
        log.warning("models topic consumer: %s", err.str())
    return False


class _TopicClient:
    def __init__(self, kafka_config: KafkaConfig, pipeline: str, key: Key, allow_unsigned: bool,
                 create_topic: bool, timeout: float):
        self.kafka_config = kafka_config
        self.pipeline = pipeline
        self.topic = models_topic(pipeline)
        self._key = resolve_key(key, allow_unsigned=allow_unsigned)
        if self._key is None:
            log.warning("model announcements for %r are NOT signed or verified (allow_unsigned): "
                        "local experiments only", pipeline)
        self.timeout = timeout
        self._create_topic = create_topic
        self._partitions: int | None = None
        self.rejected: Counter[str] = Counter()

    def _topic_partitions(self) -> int:
        if self._partitions is None:
            admin = KafkaAdmin(self.kafka_config)
            if self._create_topic:
                # Never compacted (that would keep only the last record per key and lose
                # the lineage) and never expired (a new worker must find the current version).
                admin.ensure_topic(self.topic, 1, {"cleanup.policy": "delete", "retention.ms": "-1"},
                                   timeout=self.timeout)
            n = admin.list_topics(self.timeout).get(self.topic)
            if n is None:
                raise ModelVersionError(f"models topic {self.topic!r} does not exist")
            self._partitions = n
        return self._partitions

    @property
    def signed(self) -> bool:
        """False only in ``allow_unsigned`` mode without a key."""
        return self._key is not None

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(pipeline={self.pipeline!r}, topic={self.topic!r}, signed={self.signed})"


class ModelRegistry(_TopicClient):
    """Publish and read the model versions of one pipeline.

    ``key``: the HMAC key (str/bytes/SecretStr); None reads it from the
    environment. Assumes one writer at a time for promote/rollback (they read,
    then announce; two concurrent rollbacks would both pop the same version).
    """

    def __init__(self, kafka_config: KafkaConfig, pipeline: str, key: Key = None, *,
                 allow_unsigned: bool = False, create_topic: bool = True, timeout: float = 15.0):
        super().__init__(kafka_config, pipeline, key, allow_unsigned, create_topic, timeout)
        self._sink: KafkaSink | None = None

    # -- writing ----------------------------------------------------------
    def publish(self, version: str, url: str, sha256: str | None = None, *,
                metrics: Mapping[str, float] | None = None, backend: str = "", spec_hash: str = "",
                action: Literal["promote", "rollback"] = "promote",
                created_at: datetime | None = None) -> ModelAnnouncement:
        """Sign and announce a version; returns once the broker confirmed delivery.

        ``sha256=None`` hashes the file at ``url`` now. Raises ``DeliveryError``
        if the record was not delivered.
        """
        fields: dict[str, Any] = dict(pipeline=self.pipeline, version=version, url=url,
                                      sha256=sha256 or file_sha256(url), metrics=dict(metrics or {}),
                                      backend=backend, spec_hash=spec_hash, action=action)
        if created_at is not None:
            fields["created_at"] = created_at
        ann = ModelAnnouncement.build(self._key, **fields)
        self._topic_partitions()
        if self._sink is None:
            self._sink = KafkaSink(self.kafka_config)
            self._sink.producer.list_topics(self.topic, timeout=self.timeout)  # leader known: no 500 ms retry
        self._sink.produce(self.topic, ann.to_bytes(), key=self.pipeline.encode(),
                           headers=[("content-type", b"application/json")])
        self._sink.flush(self.timeout)
        log.info("announced %s version %s (%s) on %s", self.pipeline, ann.version, ann.action, self.topic)
        return ann

    def promote(self, version: str, url: str | None = None, sha256: str | None = None,
                **fields: Any) -> ModelAnnouncement:
        """Make ``version`` current.

        With ``url``: a new version (``fields`` as for ``publish``). Without:
        re-announce the newest announcement of an already known version. If it
        is current already, nothing is published and the current one is returned.
        """
        if url is not None:
            return self.publish(version, url, sha256, action="promote", **fields)
        state = self._read()
        known = self._find(state, version)
        cur = state.current
        if cur is not None and cur.version == version and cur.sha256 == known.sha256:
            return cur
        return self._reannounce(known, "promote")

    def rollback(self) -> ModelAnnouncement:
        """Re-announce the version promoted before the current one, with action "rollback"."""
        lineage = self.lineage()
        if len(lineage) < 2:
            raise ModelVersionError(f"nothing to roll back to: {self.pipeline} has "
                                    f"{'no version' if not lineage else 'only ' + repr(lineage[0].version)} "
                                    "in its lineage")
        return self._reannounce(lineage[-2], "rollback")

    def _reannounce(self, old: ModelAnnouncement, action: Literal["promote", "rollback"]) -> ModelAnnouncement:
        return self.publish(old.version, old.url, old.sha256, metrics=old.metrics, backend=old.backend,
                            spec_hash=old.spec_hash, action=action)

    # -- reading ----------------------------------------------------------
    def _read(self) -> _Log:
        """Read the whole topic from the beginning (every call: other writers may have announced)."""
        n = self._topic_partitions()
        state = _Log(self.pipeline, self._key)
        c = _assign_consumer(self.kafka_config, self.topic, n, self.timeout)
        try:
            todo = set(range(n))
            deadline = time.monotonic() + self.timeout
            while todo:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not read {self.topic!r} to its end within {self.timeout:.0f}s "
                                       f"(partitions {sorted(todo)} unfinished)")
                for m in c.consume(500, 0.2):
                    if _is_data(m):
                        state.feed(m.value(), f"{m.topic()}[{m.partition()}]@{m.offset()}")
                    elif m.error().code() == KafkaError._PARTITION_EOF:
                        todo.discard(m.partition())
        finally:
            c.close()
        self.rejected = state.rejected
        return state

    def history(self) -> list[ModelAnnouncement]:
        """Every valid announcement, oldest first (read from the beginning of the topic).

        Invalid ones are skipped and counted in ``self.rejected`` (reason -> count).
        """
        return list(self._read().announcements)

    def lineage(self) -> list[ModelAnnouncement]:
        """The promotion stack after rollbacks: the last one is current, the one before it
        is what ``rollback()`` goes back to."""
        return list(self._read().lineage)

    def current(self) -> ModelAnnouncement | None:
        """The effective version: the newest valid announcement (promote or rollback)."""
        return self._read().current

    def serving(self) -> tuple[ModelAnnouncement | None, dict[str, str]]:
        """What a watching worker serves: the newest version of the lineage whose weights verify
        (the file is readable and has the signed sha256), and why each newer one is unusable.

        Downloads the state files, newest first, until one verifies.
        """
        problems: dict[str, str] = {}
        for ann in reversed(self._read().lineage):
            try:
                fetch_verified(ann)
            except Exception as e:  # noqa: BLE001 - any reason makes it unusable; the message says which
                problems[ann.version] = f"{type(e).__name__}: {e}"
                continue
            return ann, problems
        return None, problems

    def find(self, version: str) -> ModelAnnouncement:
        """The newest valid announcement of ``version`` (``ModelVersionError`` if none)."""
        return self._find(self._read(), version)

    def _find(self, state: _Log, version: str) -> ModelAnnouncement:
        for ann in reversed(state.announcements):
            if ann.version == version:
                return ann
        raise ModelVersionError(f"no valid announcement of version {version!r} on {self.topic!r}")

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close(self.timeout)
            self._sink = None

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelWatcher(_TopicClient):
    """Follow the models topic from an inference loop.

    It reads from the beginning (assign, no group), so a new worker learns the
    current version on its first polls (or at once with ``catch_up()``).
    ``rejected`` counts refused announcements and files by reason.
    """

    def __init__(self, kafka_config: KafkaConfig, pipeline: str, key: Key = None, *,
                 allow_unsigned: bool = False, create_topic: bool = True, timeout: float = 15.0,
                 max_records: int = 500):
        super().__init__(kafka_config, pipeline, key, allow_unsigned, create_topic, timeout)
        self.max_records = max_records
        self._consumer: Consumer | None = None
        self._state = _Log(pipeline, self._key, self.rejected)
        #: partitions read to their end (librdkafka reports each arrival at the end once)
        self._at_end: set[int] = set()

    @property
    def current(self) -> ModelAnnouncement | None:
        """The newest valid announcement seen so far."""
        return self._state.current

    @property
    def lineage(self) -> list[ModelAnnouncement]:
        """The promotion stack seen so far (the last one is current); for falling back."""
        return list(self._state.lineage)

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = _assign_consumer(self.kafka_config, self.topic, self._topic_partitions(),
                                              self.timeout)
        return self._consumer

    def _take(self, msgs: Iterable[Message]) -> ModelAnnouncement | None:
        newest = None
        for m in msgs:
            if _is_data(m):
                self._at_end.discard(m.partition())
                newest = self._state.feed(m.value(), f"{m.topic()}[{m.partition()}]@{m.offset()}") or newest
            elif m.error().code() == KafkaError._PARTITION_EOF:
                self._at_end.add(m.partition())
        return newest

    def poll(self) -> ModelAnnouncement | None:
        """The newest valid announcement that arrived since the last poll, else None.

        Never blocks: one ``consume(timeout=0)`` (about a microsecond when idle).
        """
        return self._take(self.consumer.consume(self.max_records, 0))

    def catch_up(self, timeout: float | None = None) -> ModelAnnouncement | None:
        """Block until the topic has been read to its end; return the current version (or None).

        For a worker's start: serve the current version from the first batch on.
        Announcements read here are not returned again by ``poll()``.
        """
        n = self._topic_partitions()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        consumer = self.consumer
        while len(self._at_end) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self.topic!r} to its end in time")
            self._take(consumer.consume(self.max_records, 0.1))
        return self.current

    def fetch_verified(self, announcement: ModelAnnouncement) -> bytes:
        """Download the state file and check its sha256 (``ModelIntegrityError``, counted
        as "hash_mismatch", if it does not match)."""
        try:
            return fetch_verified(announcement)
        except ModelIntegrityError:
            self.rejected["hash_mismatch"] += 1
            raise

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> ModelWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
