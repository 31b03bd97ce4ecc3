"""The framework-free half of the training-loop bridges.

Both bridges (``tensorstream.torch.KafkaIterableDataset`` and
``tensorstream.tensorflow.kafka_dataset``) are thin shells over this module:

- **partition planning**: the partitions of the topics, split round-robin
  between readers (DataLoader workers); each reader ``assign()``s its share, so
  there is no consumer-group join and no rebalancing between readers;
- **reading**, bounded (``until="end"``: stop at the end offsets captured when
  the reader starts) or unbounded (block for new records; ``idle_timeout`` ends
  the stream cleanly when nothing arrives for that long);
- **decoding**, records -> numpy arrays, through the same codecs and feature
  specs as the pipeline, or a user ``decode`` callable;
- **offset tracking**: every batch carries the offset ranges it covers, and
  :class:`OffsetCommitter` commits exactly the ranges of completed training
  steps (never what was merely read ahead by a prefetching loader).

The offsets of a batch are an ``int64`` array with one row per partition it
covers: ``(topic index, partition, first offset, next offset)``. Ranges of one
partition are contiguous from reader start to reader end (a batch's range
starts where the previous batch's ended, bad records included), so committing
the ``next offset`` of completed batches, in step order, leaves no gap and no
overlap. As an array it survives ``torch``'s collate and pin-memory machinery.

>>> ranges = np.array([[0, 1, 40, 72], [0, 3, 10, 12]])
>>> offsets_to_commit(ranges, ["events"])
{('events', 1): 72, ('events', 3): 12}
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition

from tensorstream.codecs import DecodeError, decode_frames, get_codec
from tensorstream.features import FeaturePipeline, LabelEncoder
from tensorstream.kafka import TP, KafkaAdmin, KafkaConfig, KafkaSink, Record
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


# --------------------------------------------------------------------------- decoding


@dataclass
class DecodedBatch:
    data: Decoded  # leading axis: the good records, in input order
    good: np.ndarray  # int64 indices of the good records in the input chunk
    bad: list[tuple[int, str, str]]  # (index in the chunk, error type, message)


def load_feature_state(state: str | Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(features state, labels state)`` from a state file URL or a state dict.

    Accepts the learner state written by ``tensorstream run --save-state``
    (keys ``features/...``, ``labels/...``) or a bare ``FeaturePipeline.state_dict()``.
    """
    if isinstance(state, str):
        from tensorstream.checkpoint import load_state

        state, _ = load_state(state)
    state = dict(state)
    if "features/config" in state:
        feats = {k[len("features/"):]: v for k, v in state.items() if k.startswith("features/")}
        labels = {k[len("labels/"):]: v for k, v in state.items() if k.startswith("labels/")}
        return feats, labels
    if "config" in state:
        return state, {}
    raise ValueError("feature_state holds no feature state (expected keys 'features/config' or 'config')")


class RecordDecoder:
    """Chunks of messages -> numpy arrays (features + labels, frames, or a user callable).

    With ``feature_state`` the feature statistics, vocabularies and classes are
    loaded and **frozen** (nothing learns while reading); without it they are
    learned from the records this decoder sees (per reader, see the docs).
    """

    def __init__(self, opts: StreamOptions):
        self.opts = opts
        self.codec = get_codec(opts.codec)
        self.features: FeaturePipeline | None = None
        self.labels: LabelEncoder | None = None
        self.update = opts.feature_state is None
        if opts.features is not None:
            self.features = FeaturePipeline(opts.features, label_field=opts.label.field if opts.label else None)
            if opts.label is not None:
                self.labels = LabelEncoder(opts.label)
            if opts.feature_state is not None:
                feats, labels = load_feature_state(opts.feature_state)
                self.features.load_state_dict(feats)
                if self.labels is not None and labels:
                    self.labels.load_state_dict(labels)

    @property
    def layout_known(self) -> bool:
        """True when the shapes of what we produce are known without seeing a record."""
        return self.features is not None and self.features.numeric_fields is not None

    def signature(self) -> Any:
        """An :class:`ArraySig` per output (same structure as the data); only when ``layout_known``."""
        assert self.features is not None and self.features.n_features is not None
        x = ArraySig((self.features.n_features,), np.dtype(np.float32))
        if self.labels is None:
            return x
        return x, ArraySig((), np.dtype(np.float32 if self.labels.task == "regression" else np.int64))

    def fix_layout(self, messages: Sequence[Message]) -> bool:
        """Fix the feature layout from the first usable record, changing no statistics."""
        assert self.features is not None
        for m in messages:
            try:
                rec = self._decode_value(m.value())
            except DecodeError:
                continue
            self.features.parse([rec])
            if self.features.numeric_fields is not None:
                return True
        return False

    def _decode_value(self, value: bytes | None) -> Any:
        if value is None:
            raise DecodeError("empty record value (tombstone)")
        rec = self.codec.decode(value)
        if self.labels is not None and isinstance(rec, dict):
            y = rec.get(self.labels.field)
            if isinstance(y, np.ndarray) and y.ndim == 0:
                rec[self.labels.field] = y.item()  # frames carry scalars as 0-d arrays
        return rec

    def __call__(self, messages: Sequence[Message]) -> DecodedBatch:
        if self.opts.decode is not None:
            data = self.opts.decode([Record.from_message(m) for m in messages])
            return DecodedBatch(data, np.arange(len(messages), dtype=np.int64), [])
        if self.features is None:
            return self._frames(messages)
        return self._features(messages)

    def _decode_values(self, messages: Sequence[Message]
                       ) -> tuple[list[Any], list[int], list[tuple[int, str, str]]]:
        """``(records, their indices in the chunk, bad)``: one batch call when every value decodes."""
        values = [m.value() for m in messages]
        if self.codec.name == "json" and None not in values:
            try:
                return self.codec.decode_batch(values), list(range(len(values))), []
            except DecodeError:
                pass  # find the bad ones one by one below
        records: list[Any] = []
        index: list[int] = []
        bad: list[tuple[int, str, str]] = []
        for i, v in enumerate(values):
            try:
                records.append(self._decode_value(v))
                index.append(i)
            except DecodeError as e:
                bad.append((i, "decode_error", str(e)))
        return records, index, bad

    def _features(self, messages: Sequence[Message]) -> DecodedBatch:
        assert self.features is not None
        records, index, bad = self._decode_values(messages)
        parsed = self.features.parse(records)  # column by column (features.columns)
        bad.extend((index[b.index], b.error_type, b.message) for b in parsed.bad)
        keep = None
        y = None
        if self.labels is not None:
            labelled = [records[i] for i in parsed.good_idx]
            y, lgood, lbad = self.labels.encode_batch(labelled, update=self.update)
            bad.extend((index[int(parsed.good_idx[b.index])], b.error_type, b.message) for b in lbad)
            keep = np.zeros(len(parsed), dtype=bool)
            keep[lgood] = True
        x = self.features.transform_parsed(parsed, keep=keep, update=self.update)
        good_idx = parsed.good_idx if keep is None else parsed.good_idx[keep]
        good = np.asarray([index[i] for i in good_idx], dtype=np.int64)
        bad.sort()
        return DecodedBatch(x if y is None else (x, y), good, bad)

    def _frames(self, messages: Sequence[Message]) -> DecodedBatch:
        values = [m.value() for m in messages]
        try:
            data = decode_frames(values)
            good = np.arange(len(values), dtype=np.int64)
            bad: list[tuple[int, str, str]] = []
        except (DecodeError, TypeError):
            data, good, bad = self._frames_one_by_one(values)
        if isinstance(data, dict) and "x" in data and set(data) <= {"x", "y"}:
            data = (data["x"], data["y"]) if "y" in data else data["x"]
        return DecodedBatch(data, good, bad)

    @staticmethod
    def _frames_one_by_one(values: Sequence[bytes | None]) -> tuple[Decoded, np.ndarray, list[tuple[int, str, str]]]:
        # Slow path, only when a chunk holds a bad frame: keep the frames shaped like the first good one.
        good: list[int] = []
        bad: list[tuple[int, str, str]] = []
        ref = None
        for i, v in enumerate(values):
            if v is None:
                bad.append((i, "decode_error", "empty record value (tombstone)"))
                continue
            try:
                one = decode_frames([v])
            except DecodeError as e:
                bad.append((i, "decode_error", str(e)))
                continue
            sig = _structure_signature(one)
            if ref is None:
                ref = sig
            if sig != ref:
                bad.append((i, "wrong_shape", f"frame layout {sig} differs from the first frame's {ref}"))
                continue
            good.append(i)
        if not good:
            return None, np.zeros(0, dtype=np.int64), bad
        return decode_frames([values[i] for i in good]), np.asarray(good, dtype=np.int64), bad




def raw_messages(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    """A ``decode=`` that keeps the bytes: ``(values, keys)``, object arrays of ``bytes``.

    What tensorflow-io's Kafka datasets yielded (``(message, key)``, tf.string),
    for code that decodes with TensorFlow ops after the dataset. A missing key
    or value (tombstone) becomes ``b""``.

    >>> values, keys = raw_messages([Record("t", 0, 0, b"k", b"v", None, None)])
    >>> values.tolist(), keys.tolist()
    ([b'v'], [b'k'])
    """
    values = np.empty(len(records), dtype=object)
    keys = np.empty(len(records), dtype=object)
    for i, r in enumerate(records):
        values[i] = r.value or b""
        keys[i] = r.key or b""
    return values, keys


def _structure_signature(data: Decoded) -> Any:
    if isinstance(data, dict):
        return tuple(sorted((k, _structure_signature(v)) for k, v in data.items()))
    if isinstance(data, (tuple, list)):
        return tuple(_structure_signature(v) for v in data)
    a = np.asarray(data)
    return (a.shape[1:], a.dtype.str)


def map_structure(fn: Callable[[np.ndarray], Any], data: Decoded) -> Any:
    """Apply ``fn`` to every array of a decoded structure (tuple, list, dict or array)."""
    if isinstance(data, dict):
        return {k: map_structure(fn, v) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(map_structure(fn, v) for v in data)
    if isinstance(data, list):
        return [map_structure(fn, v) for v in data]
    return fn(np.asarray(data))


def structure_len(data: Decoded) -> int:
    if isinstance(data, dict):
        return structure_len(next(iter(data.values())))
    if isinstance(data, (tuple, list)):
        return structure_len(data[0])
    return len(data)


def signature_of(data: Decoded) -> Any:
    """An :class:`ArraySig` per array of a decoded batch (shape without the batch axis)."""
    return map_structure(lambda a: ArraySig(tuple(a.shape[1:]), a.dtype), data)


# --------------------------------------------------------------------------- the stream


def _dlq_headers(m: Message, error_type: str, message: str) -> list[tuple[str, bytes]]:
    return [
        *(m.headers() or []),
        ("error.type", error_type.encode()),
        ("error.message", message.encode()[:4096]),
        ("source.topic", m.topic().encode()),
        ("source.partition", str(m.partition()).encode()),
        ("source.offset", str(m.offset()).encode()),
    ]


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


def iterate_stream(opts: StreamOptions, decoder: RecordDecoder, reader_index: int = 0, reader_count: int = 1,
                   assignment: Sequence[TP] | None = None) -> Iterator[tuple[Decoded, np.ndarray]]:
    """``(decoded arrays, offsets)`` for reader ``reader_index`` of ``reader_count``.

    Batches (``opts.batch_size``) or single records (``batch_size=None``; arrays
    without the batch axis and a one-row offsets array). Bad records are
    dead-lettered (flushed before the batch covering them is handed out),
    skipped, or raise :class:`BadRecordError`, per ``opts``.
    """
    if reader_count > 1 and opts.stateful_encoding:
        raise ValueError(
            "with several readers (DataLoader workers), a growing class set or one-hot vocabulary would be "
            "numbered differently in each worker; fix label.classes, use categorical_encoding='hash', "
            "or pass feature_state= (frozen) from a fitted pipeline")
    if assignment is None:
        assignment = split_partitions(opts.partitions(), reader_index, reader_count)
    if not assignment:
        log.warning("reader %d of %d has no partition to read (more readers than partitions)",
                    reader_index, reader_count)
        return
    sink = KafkaSink(opts.config) if opts.dead_letter_topic else None
    reader = PartitionReader(opts, assignment).open()
    try:
        cover = _Coverage(opts.topics, reader.starts)
        for chunk in reader.chunks(opts.batch_size):
            out = decoder(chunk)
            if out.bad:
                _handle_bad(opts, sink, chunk, out.bad)
                if sink is not None:
                    sink.flush()  # dead letters durable before any offset covering them can be committed
            if opts.batch_size is not None:
                cover.add(chunk)
                if len(out.good):
                    yield out.data, cover.take()
                continue
            # single records: each good record covers the bad ones before it on its partition
            gi = 0
            good = out.good
            for i, m in enumerate(chunk):
                cover.add_one(m)
                if gi < len(good) and good[gi] == i:
                    yield map_structure(lambda a, gi=gi: a[gi], out.data), cover.take()
                    gi += 1
    finally:
        reader.close()
        if sink is not None:
            sink.close()


def _handle_bad(opts: StreamOptions, sink: KafkaSink | None, chunk: Sequence[Message],
                bad: Sequence[tuple[int, str, str]]) -> None:
    if sink is not None:
        for i, error_type, message in bad:
            m = chunk[i]
            sink.produce(opts.dead_letter_topic, m.value(), key=m.key(),  # type: ignore[arg-type]
                         headers=_dlq_headers(m, error_type, message))
        return
    i, error_type, message = bad[0]
    m = chunk[i]
    where = f"{m.topic()}[{m.partition()}]@{m.offset()}"
    if opts.on_bad == "raise":
        raise BadRecordError(f"{len(bad)} bad record(s) in a batch; first: {where}: {error_type}: {message} "
                             "(pass on_bad='skip' or dead_letter_topic= to go on)")
    log.warning("skipped %d bad record(s); first: %s: %s: %s", len(bad), where, error_type, message)


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


def stream_signature(opts: StreamOptions, decoder: RecordDecoder, timeout: float = 10.0) -> Any:
    """The :class:`ArraySig` structure of what the stream yields, reading a few records if needed.

    Known without reading when a frozen ``feature_state`` fixed the layout;
    otherwise the first records where a reader would start fix it (feature
    statistics are not touched: the layout is all they decide).
    """
    if decoder.layout_known:
        return decoder.signature()
    msgs = probe(opts, timeout)
    if not msgs:
        raise ValueError(f"cannot tell the shapes of {opts.topics}: no record arrived within {timeout:.0f}s; "
                         "pass output_signature= (or feature_state=), or produce a record first")
    if decoder.features is not None:
        if not decoder.fix_layout(msgs):
            raise ValueError(f"none of the first {len(msgs)} records of {opts.topics} fits the feature spec")
        return decoder.signature()
    out = decoder(msgs)
    if not len(out.good):
        raise ValueError(f"none of the first {len(msgs)} records of {opts.topics} decodes: {out.bad[:1]}")
    return signature_of(out.data)


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

    Mark batches in the order the loader yielded them (every training loop
    does): offsets only move forward, and a gap is logged as a likely bug.
    """

    def __init__(self, config: KafkaConfig | str, group_id: str, topics: Sequence[str]):
        self.config = KafkaConfig(bootstrap_servers=config) if isinstance(config, str) else config
        self.group_id = group_id
        self.topics = list(topics)
        self._consumer: Consumer | None = None
        self._marked: dict[TP, int] = {}
        self.committed: dict[TP, int] = {}
        self._lock = threading.Lock()  # guards the marks
        self._commit_lock = threading.Lock()  # one commit at a time: a late one must not move offsets back

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer({**self.config.consumer_settings(), "group.id": self.group_id,
                                       "enable.auto.commit": False}, logger=log)
        return self._consumer

    def mark(self, offsets: Any) -> None:
        """Record that the step which used the batch with these offsets has completed."""
        arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 4)
        with self._lock:
            for ti, p, first, nxt in arr.tolist():
                tp = (self.topics[ti], p)
                known = self._marked.get(tp)
                if known is not None and first > known:
                    log.warning("offsets of %s[%d] jump from %d to %d: was a batch marked out of order, "
                                "or skipped?", tp[0], p, known, first)
                if known is None or nxt > known:
                    self._marked[tp] = nxt

    @property
    def pending(self) -> dict[TP, int]:
        """Marked offsets not yet committed."""
        with self._lock:
            return {tp: o for tp, o in self._marked.items() if self.committed.get(tp) != o}

    def commit(self, offsets: Any = None) -> dict[TP, int]:
        """Mark ``offsets`` (if given), then commit every marked offset not yet committed."""
        if offsets is not None:
            self.mark(offsets)
        with self._commit_lock:
            todo = self.pending
            if not todo:
                return {}
            result = self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()],
                                          asynchronous=False)
            failed = [r for r in (result or []) if r.error is not None]
            if failed:
                raise KafkaException(failed[0].error)
            with self._lock:
                self.committed.update(todo)
            return todo

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
