"""Records -> numpy arrays for the training loops (:class:`RecordDecoder`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import Message

from tensorstream.codecs import DecodeError, decode_frames, get_codec
from tensorstream.features import FeaturePipeline, LabelEncoder
from tensorstream.kafka import Record

from tensorstream.bridges.options import ArraySig, Decoded, StreamOptions
from tensorstream.bridges.reading import probe

log = logging.getLogger(__name__)

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
        rec = self.codec.decode_value(value)
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
