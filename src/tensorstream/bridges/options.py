"""The bridges' options (:class:`StreamOptions`) and partition planning: who reads what, from where."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, TopicPartition

from tensorstream.codecs import get_codec
from tensorstream.kafka import TP, KafkaAdmin, KafkaConfig, Record
from tensorstream.spec import FeatureSpec, LabelSpec

log = logging.getLogger(__name__)

#: columns of an offsets array
OFFSET_COLUMNS = ("topic_index", "partition", "first_offset", "next_offset")

Decoded = Any  # a numpy array, a tuple (x, y), or a dict of arrays; leading axis = records


@dataclass(frozen=True)
class ArraySig:
    """Shape (without the batch axis) and dtype of one decoded array."""

    shape: tuple[int, ...]
    dtype: np.dtype


class BadRecordError(ValueError):
    """A record could not be decoded and neither ``on_bad="skip"`` nor a dead-letter topic was set."""


# --------------------------------------------------------------------------- options


@dataclass
class StreamOptions:
    """Everything a reader needs; plain data, picklable (DataLoader workers get a copy).

    See :class:`tensorstream.torch.KafkaIterableDataset` for the meaning of each field.
    """

    topics: list[str]
    config: KafkaConfig
    group_id: str
    batch_size: int | None = 64
    until: Literal["end"] | None | Mapping[TP, int] = "end"
    idle_timeout: float | None = None
    max_wait: float | None = None
    start: Literal["committed", "earliest"] | int | Mapping[TP, int] = "committed"
    codec: str = "json"
    features: FeatureSpec | None = None
    label: LabelSpec | None = None
    decode: Callable[[list[Record]], Decoded] | None = None
    feature_state: str | Mapping[str, np.ndarray] | None = None
    dead_letter_topic: str | None = None
    on_bad: Literal["raise", "skip"] = "raise"
    poll_timeout: float = 0.1
    consumer_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.topics, str):
            self.topics = [self.topics]
        self.topics = list(self.topics)
        if not self.topics or len(set(self.topics)) != len(self.topics):
            raise ValueError("topics must name at least one topic, each once")
        if isinstance(self.config, str):
            self.config = KafkaConfig(bootstrap_servers=self.config)
        if not self.group_id:
            raise ValueError("group_id is required: it is where training progress (offsets) is committed")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 (or None for single records)")
        if isinstance(self.until, Mapping):
            self.until = _offset_map(self.until, self.topics, "until")
        elif self.until not in ("end", None):
            raise ValueError("until must be 'end' (bounded), None (unbounded) or {(topic, partition): end offset}")
        if isinstance(self.start, Mapping):
            self.start = _offset_map(self.start, self.topics, "start")
            if not self.start:
                raise ValueError("start={...} must name at least one partition")
        elif self.start not in ("committed", "earliest") and not (
                isinstance(self.start, int) and not isinstance(self.start, bool) and self.start < 0):
            raise ValueError("start must be 'committed', 'earliest', a negative int (the last N records of each "
                             "partition) or {(topic, partition): offset}")
        if self.on_bad not in ("raise", "skip"):
            raise ValueError("on_bad must be 'raise' or 'skip'")
        if self.decode is not None and (self.features is not None or self.label is not None):
            raise ValueError("pass either decode= or features=/label=, not both")
        if self.label is not None and self.features is None:
            raise ValueError("label= needs features= (or decode= returning (x, y))")
        if self.decode is None and self.features is None and self.codec != "frame":
            raise ValueError(f"{self.codec!r} records need features= (a FeatureSpec) or decode= (a callable); "
                             "only tensor frames ('frame') decode to arrays by themselves")
        get_codec(self.codec)  # fail now on an unknown codec, not in a worker

    @property
    def bounded(self) -> bool:
        return self.until is not None

    def partitions(self, timeout: float = 10.0) -> list[TP]:
        """The partitions to read: those named by ``start={...}``, else every partition of the topics."""
        if isinstance(self.start, Mapping):
            known = set(list_partitions(self.config, self.topics, timeout))
            missing = [tp for tp in self.start if tp not in known]
            if missing:
                raise ValueError(f"start names partitions that do not exist: {missing}")
            return sorted(self.start)
        return list_partitions(self.config, self.topics, timeout)

    @property
    def stateful_encoding(self) -> bool:
        """True if decoding learns an encoding whose columns could differ between readers."""
        growing_labels = (self.label is not None and self.label.task == "classification"
                          and self.label.classes is None)
        onehot = (self.features is not None and bool(self.features.categorical)
                  and self.features.categorical_encoding == "onehot")
        return self.feature_state is None and (growing_labels or onehot)


def _offset_map(m: Mapping[Any, Any], topics: Sequence[str], what: str) -> dict[TP, int]:
    out: dict[TP, int] = {}
    for key, off in m.items():
        topic, partition = key
        if topic not in topics:
            raise ValueError(f"{what}: topic {topic!r} is not one of {list(topics)}")
        if int(off) < 0:
            raise ValueError(f"{what}: offset {off} of {key} must be >= 0")
        out[(str(topic), int(partition))] = int(off)
    return out


# --------------------------------------------------------------------------- planning


def list_partitions(config: KafkaConfig, topics: Sequence[str], timeout: float = 10.0) -> list[TP]:
    """Every (topic, partition) of ``topics``, in topic order then partition order."""
    known = KafkaAdmin(config).list_topics(timeout)
    missing = [t for t in topics if t not in known]
    if missing:
        raise ValueError(f"topic(s) {missing} do not exist")
    return [(t, p) for t in topics for p in range(known[t])]


def split_partitions(tps: Sequence[TP], index: int, count: int) -> list[TP]:
    """The share of reader ``index`` of ``count``: round-robin, disjoint, covering all.

    >>> split_partitions([("t", 0), ("t", 1), ("t", 2), ("t", 3)], 1, 2)
    [('t', 1), ('t', 3)]
    """
    if not 0 <= index < count:
        raise ValueError(f"reader index {index} outside 0..{count - 1}")
    return list(tps[index::count])


def end_offsets(config: KafkaConfig, tps: Sequence[TP], timeout: float = 10.0) -> dict[TP, int]:
    """The next offset to be written on each partition, now (bounded reads stop there).

    Uses ``KafkaAdmin.end_offsets``, which reads the high watermark from a fetch
    (the embedded broker's ListOffsets undercounts batched topics).
    """
    admin = KafkaAdmin(config)
    ends: dict[TP, int] = {}
    for topic in dict.fromkeys(t for t, _ in tps):
        ends.update(admin.end_offsets(topic, timeout))
    return {tp: ends[tp] for tp in tps}


def _consumer(opts: StreamOptions) -> Consumer:
    return Consumer({
        **opts.config.consumer_settings(),
        "group.id": opts.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        # Only used when a committed offset is out of range (deleted by retention).
        "auto.offset.reset": "earliest",
        **opts.consumer_settings,
    }, logger=log)


def start_offsets(consumer: Consumer, tps: Sequence[TP], start: str | int | Mapping[TP, int],
                  timeout: float = 10.0, ends: Mapping[TP, int] | None = None) -> dict[TP, int]:
    """Where each partition starts: the group's committed offset, else the log start.

    ``start="earliest"``: the log start; ``start=-N``: the last N records
    before ``ends`` (required then: :func:`end_offsets`); a mapping: as given.
    """
    if isinstance(start, Mapping):
        return {tp: start[tp] for tp in tps}
    if isinstance(start, int):
        if ends is None:
            raise ValueError("start=-N needs the end offsets")
        return {tp: max(lo, ends[tp] + start)
                for tp, lo in start_offsets(consumer, tps, "earliest", timeout).items()}
    out: dict[TP, int] = {}
    if start == "committed" and tps:
        for r in consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout):
            if r.error is not None:
                raise KafkaException(r.error)
            if r.offset != OFFSET_INVALID and r.offset >= 0:
                out[(r.topic, r.partition)] = r.offset
    for t, p in tps:
        if (t, p) not in out:
            low, _ = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=timeout)
            out[(t, p)] = low
    return out
