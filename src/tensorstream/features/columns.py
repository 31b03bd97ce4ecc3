"""Columnar extraction: a batch of decoded records -> one numpy column per field.

The per-record path (``FeaturePipeline._numeric_row``) builds a small array
per field and concatenates them per record; for a batch of plain JSON records
that costs more than the model. Here each field is read for the whole batch at
once (C-level ``itemgetter``/``map``), type-checked in one pass and converted
with one ``np.array``; the range check is one vectorised comparison. Rows that
do not fit that fast path (a missing field, a string, a numpy scalar, NaN, a
value beyond float32) are *not* judged here: they are flagged, and the caller
sends exactly those rows through the per-record path, which reports each one
as it always did. So the fast path only ever accepts what the per-record path
accepts, with the same float64 values.

Field names may be dotted paths into nested mappings (see :class:`FieldPath`).

>>> numeric_columns([{"a": 1, "b": 2.5}, {"a": "x", "b": 0}], [FieldPath("a"), FieldPath("b")])
(array([[1. , 2.5],
       [nan, nan]]), array([ True, False]))
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tensorstream.features.records import FLOAT32_MAX

#: the scalar types the fast path converts itself; anything else goes the per-record way
_PLAIN = frozenset({float, int, bool})
_STR = frozenset({str})
_KEYS = frozenset({str, int})  # bool is not int here: type(True) is bool


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FieldPath:
    """A field of a record: a top-level key, or a dotted path into nested mappings.

    ``user.age`` reads ``record["user"]["age"]``. A key that exists literally
    wins: in ``{"user.age": 3, "user": {"age": 4}}``, ``user.age`` is 3 (so
    flat records whose keys contain dots keep working).

    >>> p = FieldPath("user.age")
    >>> p.get({"user": {"age": 41}}), p.get({"user.age": 3, "user": {"age": 4}}), p.get({"user": 1})
    (41, 3, MISSING)
    """

    __slots__ = ("name", "parts")

    def __init__(self, name: str) -> None:
        self.name = name
        parts = tuple(name.split("."))
        self.parts = parts if len(parts) > 1 and all(parts) else None

    @property
    def dotted(self) -> bool:
        return self.parts is not None

    def get(self, record: Any) -> Any:
        """The value at this path, or ``MISSING`` (``record`` must be a mapping)."""
        v = record.get(self.name, MISSING)
        if v is not MISSING or self.parts is None:
            return v
        for part in self.parts:
            if not isinstance(record, Mapping):
                return MISSING
            record = record.get(part, MISSING)
            if record is MISSING:
                return MISSING
        return record

    def column(self, records: Sequence[Any]) -> list[Any]:
        """This field of every record (``MISSING`` where absent); records must be mappings."""
        if self.parts is None:
            try:
                return list(map(operator.itemgetter(self.name), records))
            except (KeyError, TypeError, IndexError):
                return [r.get(self.name, MISSING) for r in records]
        return [self.get(r) for r in records]


def all_dicts(records: Sequence[Any]) -> bool:
    """Whether every record is a plain ``dict`` (what the JSON and Avro codecs give)."""
    return set(map(type, records)) <= {dict}


def numeric_columns(records: Sequence[Any], fields: Sequence[FieldPath]) -> tuple[np.ndarray, np.ndarray]:
    """``(values float64 [n, k], ok bool [n])`` for scalar fields of dict records.

    ``ok[i]`` is False when row i needs the per-record path (its values are then NaN).
    """
    n, k = len(records), len(fields)
    ok = np.ones(n, dtype=bool)
    if not k:
        return np.zeros((n, 0)), ok
    cols = [f.column(records) for f in fields]
    flat_types = set(map(type, itertools.chain.from_iterable(cols)))
    if not flat_types <= _PLAIN:
        for col in cols:
            ok &= np.fromiter((type(v) in _PLAIN for v in col), dtype=bool, count=n)
        cols = [[v if good else 0.0 for v, good in zip(col, ok, strict=True)] for col in cols]
    try:
        values = np.array(cols, dtype=np.float64).T.reshape(n, k)
    except OverflowError:  # an int beyond float64: let the per-record path say what it is
        values = np.array([[float(v) if abs(v) < 1e308 else np.nan for v in col] for col in cols]).T.reshape(n, k)
    in_range = (np.abs(values) <= FLOAT32_MAX).all(axis=1)  # False for NaN and inf too
    ok &= in_range
    values[~ok] = np.nan
    return values, ok


def category_columns(records: Sequence[Any], fields: Sequence[FieldPath]) -> tuple[list[list[str]], np.ndarray]:
    """``(columns of keys, ok bool [n])``: strings are their own keys and ints their decimal
    form (``category_key``'s rules for them); rows holding anything else are flagged for the
    per-record path."""
    n = len(records)
    ok = np.ones(n, dtype=bool)
    cols = []
    for f in fields:
        col = f.column(records)
        types = set(map(type, col))
        if not types <= _KEYS:
            ok &= np.fromiter((type(v) in _KEYS for v in col), dtype=bool, count=n)
            col = [v if type(v) in _KEYS else "" for v in col]
        cols.append(col if types <= _STR else list(map(str, col)))
    return cols, ok


def array_rows(records: Sequence[Any], width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Bare numeric array records of ``width`` values -> ``(float64 [n, width], ok [n])``;
    None unless every record is such an array (the per-record path handles mixtures)."""
    if not records or not all(isinstance(r, np.ndarray) and r.dtype.kind in "biuf" and r.size == width
                              for r in records):
        return None
    values = np.stack([r.reshape(-1) for r in records]).astype(np.float64, copy=False)
    ok = (np.abs(values) <= FLOAT32_MAX).all(axis=1)
    return values, ok
