"""Records -> one float32 feature matrix, with streaming state.

A :class:`FeaturePipeline` turns a batch of records (dicts from JSON, dicts of
numpy arrays, or bare arrays from tensor frames) into ``X`` float32 ``[n, d]``:

- numeric fields (scalars, or 1-D arrays flattened in place), standardised with
  running statistics (:class:`~tensorstream.features.scaler.RunningStandardizer`);
- categorical fields, one-hot over a growing vocabulary (``max_categories`` slots
  plus one overflow slot per field) or hashed into ``hash_buckets`` columns with
  a stable hash (CRC-32 of the value's string form: the same column on every
  machine and every run, unlike Python's salted ``hash``).

Column order: numeric fields in layout order, then one block per categorical
field in spec order. The layout (which numeric fields, how wide) is fixed by the
first record seen and is part of the state, so a restored pipeline produces the
same columns.

Records that cannot be used are reported, never raised: each comes back as a
:class:`~tensorstream.features.records.BadRecord` naming the field.

Field names may be dotted paths into nested mappings (``user.age``; a key that
exists literally wins, see :class:`~tensorstream.features.columns.FieldPath`).
A batch is read column by column (:mod:`tensorstream.features.columns`); only
the rows that fail that fast path go through the per-record checks, which
name the problem.

>>> from tensorstream.spec import FeatureSpec
>>> fp = FeaturePipeline(FeatureSpec(numeric=["*"], categorical=["color"], max_categories=2),
...                      label_field="y")
>>> X, good, bad = fp.transform_batch([
...     {"a": 1.0, "b": 0, "color": "red", "y": True},
...     {"a": 3.0, "b": 0, "color": "blue", "y": False},
...     {"a": "oops", "b": 0, "color": "red", "y": True},
... ], update=True)
>>> fp.numeric_fields, fp.n_features
(['a', 'b'], 5)
>>> X.tolist()
[[-1.0, 0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0, 0.0]]
>>> good.tolist(), [(b.index, b.error_type, b.field) for b in bad]
([0, 1], [(2, 'wrong_type', 'a')])

A third colour, seen once the two slots are taken, lands in the overflow slot:

>>> fp.transform_batch([{"a": 2.0, "b": 0, "color": "green"}], update=True)[0][:, 2:].tolist()
[[0.0, 0.0, 1.0]]
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorstream.features.columns import MISSING, FieldPath, all_dicts, array_rows, category_columns, numeric_columns
from tensorstream.features.records import (
    BadRecord,
    FieldError,
    category_key,
    check_range,
    describe,
    is_number,
    is_numeric_array,
    number,
)
from tensorstream.features.keyed import KeyedFeatures, KeyedRows
from tensorstream.features.keyed.stage import late_rows
from tensorstream.features.scaler import RunningStandardizer
from tensorstream.features.state import from_json_array, json_array, prefixed, unprefixed
from tensorstream.spec import FeatureSpec
from tensorstream.spec.keyed import KEYED_FIELDS

#: the name of the single "field" of a layout made from bare array records
ARRAY_RECORD = "<array>"


def stable_bucket(key: str, buckets: int) -> int:
    """The hash column of a categorical string: CRC-32, identical across processes.

    >>> stable_bucket("red", 32), stable_bucket("red", 32) == stable_bucket("red", 32)
    (15, True)
    """
    return zlib.crc32(key.encode("utf-8")) % buckets


@dataclass
class ParsedBatch:
    """A batch after validation, before any state changes (see ``FeaturePipeline.parse``)."""

    numeric: np.ndarray  # float64 [n_good, d_numeric], raw values
    categories: Sequence[Sequence[str]]  # per good row: one category key per categorical field
    good_idx: np.ndarray  # int64 [n_good], index of each row in the input batch
    bad: list[BadRecord] = field(default_factory=list)
    keyed: KeyedRows | None = None  # the stateful features' inputs of each good row

    def __len__(self) -> int:
        return len(self.good_idx)

    def select(self, keep: np.ndarray) -> ParsedBatch:
        """Only the rows where the boolean mask ``keep`` [n_good] is true."""
        keep = np.asarray(keep, dtype=bool)
        rows = np.flatnonzero(keep)
        return ParsedBatch(
            self.numeric[keep],
            [self.categories[i] for i in rows],
            self.good_idx[keep],
            list(self.bad),
            None if self.keyed is None else self.keyed.take(keep),
        )


class FeaturePipeline:
    """Streaming record -> feature-vector transform whose state is checkpointable.

    Parameters
    ----------
    spec
        The ``features`` section of the pipeline spec.
    label_field
        Excluded from ``numeric: ["*"]`` (the label must never become a feature).

    ``numeric: ["*"]`` takes every numeric field (int/float/bool scalar, or numeric
    numpy array) with a string name, except the label and the fields listed as
    categorical, in sorted name order, fixed at the first record. Explicit fields
    may hold scalars or 1-D arrays (lists from JSON, arrays from tensor frames);
    each field's width is fixed by the first record. A record that is itself an
    array is used directly as the numeric vector.
    """

    def __init__(self, spec: FeatureSpec, label_field: str | None = None, *, label_width: int = 1,
                 regression: bool = False, keyed_store: Any = None) -> None:
        self.spec = spec
        self.label_field = label_field
        self._wildcard = "*" in spec.numeric
        if self._wildcard and len(spec.numeric) != 1:
            raise ValueError("features.numeric: '*' cannot be combined with named fields")
        if label_field is not None and label_field in (set(spec.numeric) | set(spec.categorical)):
            raise ValueError(f"the label field '{label_field}' cannot also be a feature")
        # (name, width) per numeric field, or [(ARRAY_RECORD, width)] for array records
        self._layout: list[tuple[str, int]] | None = None
        self._array_records = False
        self._scaler: RunningStandardizer | None = None
        self._vocab: dict[str, dict[str, int]] = {f: {} for f in spec.categorical}
        self._cat_paths = [FieldPath(f) for f in spec.categorical]
        self._num_paths: list[FieldPath] = []
        if not self._wildcard and not spec.numeric:
            self._set_layout([], array_records=False)  # categorical only: nothing to learn
        #: the stateful features (features/keyed/): their columns follow the categorical ones
        self.keyed = KeyedFeatures(spec, label_width, regression, keyed_store) if spec.stateful else None

    # ------------------------------------------------------------------ layout

    @property
    def numeric_fields(self) -> list[str] | None:
        """The numeric fields, in column order (None until the layout is fixed)."""
        return None if self._layout is None else [name for name, _ in self._layout]

    @property
    def numeric_width(self) -> int | None:
        return None if self._layout is None else sum(w for _, w in self._layout)

    @property
    def categorical_width(self) -> int:
        s = self.spec
        per_field = s.max_categories + 1 if s.categorical_encoding == "onehot" else s.hash_buckets
        return per_field * len(s.categorical) + (self.keyed.width if self.keyed is not None else 0)

    @property
    def n_features(self) -> int | None:
        """Width of ``X``.

        Exact once the first record fixed the layout. Before that: None for
        ``numeric: ["*"]``, and for named fields the width assuming they hold
        scalars (an array-valued field widens the layout on the first record).
        """
        if self._layout is not None:
            return sum(w for _, w in self._layout) + self.categorical_width
        if self._wildcard:
            return None
        return len(self.spec.numeric) + self.categorical_width

    def _set_layout(self, layout: list[tuple[str, int]], array_records: bool) -> None:
        self._layout = layout
        self._array_records = array_records
        self._scaler = RunningStandardizer(sum(w for _, w in layout))
        self._num_paths = [FieldPath(name) for name, _ in layout]
        self._scalar_layout = not array_records and all(w == 1 for _, w in layout)

    def _infer_layout(self, record: Any) -> None:
        layout, array_records = infer_layout(record, self.spec, self.label_field)
        self._set_layout(layout, array_records)

    # ------------------------------------------------------------- transforms

    def parse(self, records: Sequence[Any], keys: Sequence[Any] | None = None,
              timestamps: Sequence[Any] | None = None) -> ParsedBatch:
        """Validate and extract raw values; changes no state except fixing the layout.

        ``keys`` / ``timestamps``: the Kafka record keys and timestamps (ms), for the
        stateful features (``features.key: "@key"``, ``features.time: "@timestamp"``).
        """
        parsed = self._parse(records)
        if self.keyed is None:
            return parsed
        kr, ok, kbad = self.keyed.parse(records, keys, timestamps)
        first_bad = {b.index for b in parsed.bad}
        drop = ~ok[parsed.good_idx]
        parsed = parsed.select(~drop) if drop.any() else parsed
        parsed.bad = sorted(parsed.bad + [b for b in kbad if b.index not in first_bad], key=lambda b: b.index)
        parsed.keyed = kr.take(parsed.good_idx)
        return parsed

    def late_rows(self, parsed: ParsedBatch, keep: np.ndarray | None = None) -> tuple[np.ndarray, list[BadRecord]]:
        """With ``state.late: dead_letter``: ``(late mask over parsed rows, their bad records)``."""
        return late_rows(self.keyed, parsed.keyed, parsed.good_idx, keep)

    def _parse(self, records: Sequence[Any]) -> ParsedBatch:
        n = len(records)
        if self._layout is None:  # the first batch: the first usable record fixes the layout, record by record
            return self._parse_rows(records, range(n))
        fast = self._parse_columns(records)
        if fast is None:
            return self._parse_rows(records, range(n))
        numeric, cats, ok = fast
        if ok.all():
            return ParsedBatch(numeric, cats, np.arange(n, dtype=np.int64), [])
        # The rows the fast path could not take: exactly what the per-record path says about them.
        slow = self._parse_rows(records, np.flatnonzero(~ok).tolist())
        good = np.flatnonzero(ok)
        order = np.argsort(np.concatenate([good, slow.good_idx]), kind="stable")
        rows = [cats[i] for i in good.tolist()] + list(slow.categories)
        return ParsedBatch(np.concatenate([numeric[ok], slow.numeric])[order], [rows[i] for i in order.tolist()],
                           np.concatenate([good, slow.good_idx])[order].astype(np.int64), slow.bad)

    def _parse_columns(self, records: Sequence[Any]) -> tuple[np.ndarray, list[tuple[str, ...]], np.ndarray] | None:
        """The columnar fast path: ``(numeric, category rows, ok)``, or None where it does not apply."""
        assert self._layout is not None
        if self._array_records:
            arrays = array_rows(records, self._layout[0][1])
            if arrays is None:
                return None
            return arrays[0], [()] * len(records), arrays[1]
        if not self._scalar_layout or not all_dicts(records):
            return None
        numeric, ok = numeric_columns(records, self._num_paths)
        cats: list[tuple[str, ...]] = [()] * len(records)
        if self._cat_paths:
            columns, cat_ok = category_columns(records, self._cat_paths)
            ok &= cat_ok
            cats = list(zip(*columns, strict=True))
        return numeric, cats, ok

    def _parse_rows(self, records: Sequence[Any], which: Sequence[int]) -> ParsedBatch:
        """The per-record path over the rows ``which`` (indices into ``records``)."""
        rows: list[np.ndarray] = []
        cats: list[list[str]] = []
        good: list[int] = []
        bad: list[BadRecord] = []
        for i in which:
            record = records[i]
            try:
                if self._layout is None:
                    self._infer_layout(record)
                row, keys = self._numeric_row(record), self._category_row(record)
            except FieldError as err:
                bad.append(err.bad(i))
                continue
            rows.append(row)
            cats.append(keys)
            good.append(i)
        width = self.numeric_width or 0
        numeric = np.stack(rows) if rows else np.zeros((0, width), dtype=np.float64)
        return ParsedBatch(numeric, cats, np.asarray(good, dtype=np.int64), bad)

    def transform_parsed(
        self, parsed: ParsedBatch, keep: np.ndarray | None = None, update: bool = True, sequential: bool = False,
        labels: np.ndarray | None = None, keyed_update: bool | None = None,
    ) -> np.ndarray:
        """Parsed rows (``keep``-masked) -> ``X`` float32; with ``update``, learn first.

        The running statistics (and vocabularies) are updated with the batch
        *before* transforming it. That is unsupervised (no label is involved), so
        it leaks nothing into the test-then-train score, and it means the very
        first batch is already on a sensible scale. With ``sequential`` each row
        is standardised with the statistics of the rows up to and including it,
        as if the batch came one record at a time (per-record learning, where
        the batch size must not change what is learned).

        Stateful columns (``self.keyed``) come last: ``labels`` (float per kept row,
        NaN: none) feed the label history after each row's features are taken;
        ``keyed_update`` (default ``update``) lets the per-key state take the rows.
        """
        if keep is not None:
            parsed = parsed.select(keep)
        n = len(parsed)
        X = np.zeros((n, self.n_features or 0), dtype=np.float32)
        if n == 0:
            return X
        if self.keyed is not None and parsed.keyed is not None:
            width = self.keyed.width
            X[:, X.shape[1] - width:] = self.keyed.transform(
                parsed.keyed, labels, update if keyed_update is None else keyed_update, sequential, scale=update)
        assert self._scaler is not None and self._layout is not None
        d = self._scaler.n_features
        if d:
            if not self.spec.standardize:
                X[:, :d] = parsed.numeric
            elif update and sequential:
                mean, std = self._scaler.running(parsed.numeric)
                X[:, :d] = (parsed.numeric - mean[1:]) / std[1:]
            else:
                if update:
                    self._scaler.update(parsed.numeric)
                X[:, :d] = self._scaler.transform(parsed.numeric)
        s = self.spec
        if not s.categorical:
            return X
        rows = np.arange(n)
        columns = list(zip(*parsed.categories, strict=True))
        for j, name in enumerate(s.categorical):
            col = columns[j]
            if s.categorical_encoding == "hash":
                buckets = {k: stable_bucket(k, s.hash_buckets) for k in dict.fromkeys(col)}
                X[rows, d + j * s.hash_buckets + np.fromiter(map(buckets.__getitem__, col), np.int64, n)] = 1.0
                continue
            vocab = self._vocab[name]
            if update:  # new keys take slots in order of first appearance, as record by record
                for key in dict.fromkeys(col):
                    if key not in vocab and len(vocab) < s.max_categories:
                        vocab[key] = len(vocab)
            # a key without a slot: the overflow slot once the vocabulary is full (seen after it
            # filled), else nothing (unseen at inference): all zeros
            other = s.max_categories if len(vocab) >= s.max_categories else -1
            slots = np.fromiter((vocab.get(k, other) for k in col), np.int64, n)
            hit = slots >= 0
            X[rows[hit], d + j * (s.max_categories + 1) + slots[hit]] = 1.0
        return X

    def transform_batch(
        self, records: Sequence[Any], update: bool = True, keys: Sequence[Any] | None = None,
        timestamps: Sequence[Any] | None = None, keyed_update: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[BadRecord]]:
        """``records`` -> ``(X float32 [n_good, d], good_idx int64 [n_good], bad)``.

        With ``update`` the running statistics and vocabularies learn from the
        good records first (training); without it nothing changes (inference).
        """
        parsed = self.parse(records, keys, timestamps)
        late, late_bad = self.late_rows(parsed)
        if late.any():
            parsed = parsed.select(~late)
            parsed.bad = sorted(parsed.bad + late_bad, key=lambda b: b.index)
        X = self.transform_parsed(parsed, update=update, keyed_update=keyed_update)
        return X, parsed.good_idx, parsed.bad

    def _numeric_row(self, record: Any) -> np.ndarray:
        assert self._layout is not None
        if isinstance(record, np.ndarray):
            if not self._array_records:
                raise FieldError("wrong_shape", "got an array record, but records so far were mappings")
            return _vector(ARRAY_RECORD, record, self._layout[0][1], what="the array record")
        if not isinstance(record, Mapping):
            raise FieldError("not_a_record", f"a record must be a mapping or an array, got {describe(record)}")
        if self._array_records:
            raise FieldError("wrong_shape", "got a mapping record, but records so far were bare arrays")
        parts = []
        for (name, width), path in zip(self._layout, self._num_paths, strict=True):
            v = path.get(record)
            if v is MISSING:
                raise FieldError("missing_field", f"field '{name}' is missing", name)
            if width == 1 and not isinstance(v, (np.ndarray, list, tuple)):
                parts.append(np.array([number(name, v)]))
            else:
                parts.append(_vector(name, v, width))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def _category_row(self, record: Any) -> list[str]:
        keys = []
        for name, path in zip(self.spec.categorical, self._cat_paths, strict=True):
            if not isinstance(record, Mapping):
                raise FieldError("wrong_type", "an array record has no categorical fields", name)
            v = path.get(record)
            if v is MISSING:
                raise FieldError("missing_field", f"field '{name}' is missing", name)
            keys.append(category_key(name, v))
        return keys

    # ------------------------------------------------------------------ state

    def _config(self) -> dict[str, Any]:
        s = self.spec
        return {
            "numeric": s.numeric,
            "categorical": s.categorical,
            "categorical_encoding": s.categorical_encoding,
            "max_categories": s.max_categories,
            "hash_buckets": s.hash_buckets,
            "standardize": s.standardize,
            **({"keyed": {k: v for k, v in s.model_dump(mode="json").items() if k in KEYED_FIELDS}}
               if s.stateful else {}),
        }  # not the label field: it only matters before the layout is fixed (and an infer-only spec has none)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything learned, as named numeric arrays (JSON bytes for the vocabularies).

        Keys: ``config`` (the spec it was built from, checked on load),
        ``layout`` (once fixed), ``scaler/count``, ``scaler/mean``, ``scaler/m2``
        and ``vocab`` (one-hot only).
        """
        state = {"config": json_array(self._config())}
        if self._layout is not None:
            state["layout"] = json_array(
                {"array_records": self._array_records, "fields": [[n, w] for n, w in self._layout]}
            )
            assert self._scaler is not None
            state.update({f"scaler/{k}": v for k, v in self._scaler.state_dict().items()})
        if self.keyed is not None:
            state.update(prefixed("keyed", self.keyed.state_dict()))
        if self.spec.categorical_encoding == "onehot" and self.spec.categorical:
            # the index of each key is its position in the list
            state["vocab"] = json_array(
                {f: sorted(v, key=v.__getitem__) for f, v in self._vocab.items()}
            )
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`; refuses a state made from a different spec."""
        saved = from_json_array(state["config"])
        mine = self._config()
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise ValueError(
                "feature state was made from a different spec; differs in: "
                + ", ".join(f"{k} (saved {saved.get(k)!r}, spec {mine.get(k)!r})" for k in diff)
            )
        if "layout" in state:
            lay = from_json_array(state["layout"])
            self._set_layout([(n, int(w)) for n, w in lay["fields"]], bool(lay["array_records"]))
            assert self._scaler is not None
            self._scaler.load_state_dict(unprefixed("scaler", state))
        elif self._wildcard or self.spec.numeric:
            self._layout, self._scaler, self._array_records = None, None, False
        if self.keyed is not None and "keyed/meta" in state:  # absent: the per-key state stays as it is
            self.keyed.load_state_dict(unprefixed("keyed", state))
        if "vocab" in state:
            vocab = from_json_array(state["vocab"])
            self._vocab = {f: {k: i for i, k in enumerate(vocab.get(f, []))} for f in self.spec.categorical}


def infer_layout(record: Any, spec: FeatureSpec, label_field: str | None) -> tuple[list[tuple[str, int]], bool]:
    """The layout a first record gives: ``([(field, width), ...], array_records)``; a FieldError if none."""
    if isinstance(record, np.ndarray):
        if spec.categorical:
            raise FieldError("wrong_type", "an array record has no categorical fields, but the spec lists some")
        return [(ARRAY_RECORD, int(record.size))], True
    if not isinstance(record, Mapping):
        raise FieldError("not_a_record", f"a record must be a mapping or an array, got {describe(record)}")
    if "*" in spec.numeric:
        skip = set(spec.categorical) | {label_field}
        names = sorted(
            k for k, v in record.items()
            if isinstance(k, str) and k not in skip and (is_number(v) or is_numeric_array(v))
        )
        if not names:
            raise FieldError("missing_field", "numeric: ['*'] found no numeric field in the first record")
    else:
        names = list(spec.numeric)
    layout = []
    for name in names:
        v = FieldPath(name).get(record)
        if v is MISSING:
            raise FieldError("missing_field", f"field '{name}' is missing", name)
        layout.append((name, _width(name, v)))
    return layout, False


def _width(name: str, v: Any) -> int:
    """The width a field's value gives the layout (1 for a scalar)."""
    if v is None:
        raise FieldError("missing_field", f"field '{name}' is null", name)
    if isinstance(v, (np.ndarray, list, tuple)):
        size = int(np.size(v)) if isinstance(v, np.ndarray) else len(v)
        if size == 0:
            raise FieldError("wrong_shape", f"field '{name}' is an empty array", name)
        return size
    if not is_number(v):
        raise FieldError("wrong_type", f"field '{name}' must be a number, got {describe(v)}", name)
    return 1


def _vector(name: str, v: Any, width: int, what: str | None = None) -> np.ndarray:
    what = what or f"field '{name}'"
    field_name = None if name == ARRAY_RECORD else name
    if v is None:
        raise FieldError("missing_field", f"{what} is null", field_name)
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biuf":
            raise FieldError("wrong_type", f"{what} must be numeric, got dtype {v.dtype}", field_name)
        arr = v.astype(np.float64, copy=False).reshape(-1)
    elif isinstance(v, (list, tuple)):
        if not all(is_number(e) for e in v):
            raise FieldError("wrong_type", f"{what} must be a list of numbers", field_name)
        arr = np.asarray(v, dtype=np.float64)
    elif is_number(v):
        arr = np.array([float(v)])
    else:
        raise FieldError("wrong_type", f"{what} must be a number or an array, got {describe(v)}", field_name)
    if arr.size != width:
        raise FieldError("wrong_shape", f"{what} has {arr.size} values, the layout has {width}", field_name)
    check_range(field_name, arr, what)
    return arr
