"""Read what the stateful features need from a batch of records: key, event time, values.

Column by column for dict records (as :mod:`tensorstream.features.columns`);
a row the fast path flags goes through the per-record checks, which name the
problem as a :class:`~tensorstream.features.records.BadRecord`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorstream.features.columns import MISSING, FieldPath, all_dicts, category_columns, numeric_columns
from tensorstream.features.keyed.hll import value_hashes
from tensorstream.features.records import BadRecord, FieldError, category_key, number
from tensorstream.spec.keyed import RECORD_KEY, RECORD_TIME

#: the key of the single state when features.key is not set
STREAM_KEY = b""


@dataclass
class KeyedRows:
    """Per record: the state key (bytes), event time (int64 ms), numeric values and hashes."""

    keys: list[bytes]
    t: np.ndarray
    values: dict[str, np.ndarray]
    hashes: dict[str, np.ndarray]
    #: Kafka record keys differing from the key field's values (features.key a field), of those checked
    mismatched: int = 0
    checked: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray) -> KeyedRows:
        """The rows at the indices (or boolean mask) ``rows``."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        il = idx.tolist()
        return KeyedRows([self.keys[i] for i in il], self.t[idx], {f: v[idx] for f, v in self.values.items()},
                         {f: h[idx] for f, h in self.hashes.items()}, self.mismatched, self.checked)


def _fail(bad: dict[int, BadRecord], i: int, err: FieldError) -> None:
    bad.setdefault(i, err.bad(i))


def parse_keyed(spec: Any, numeric: list[str], hashed: list[str], records: Sequence[Any],
                record_keys: Sequence[Any] | None, timestamps: Sequence[Any] | None,
                ) -> tuple[KeyedRows, np.ndarray, list[BadRecord]]:
    """``(rows for every record, ok mask, bad records)``: rows of bad records hold placeholders."""
    n = len(records)
    bad: dict[int, BadRecord] = {}
    dicts = all_dicts(records)

    def column(name: str) -> list[Any]:
        path = FieldPath(name)
        if dicts:
            return path.column(records)
        return [path.get(r) if isinstance(r, Mapping) else MISSING for r in records]

    # the state key
    keys: list[bytes] = [STREAM_KEY] * n
    mismatched = checked = 0
    if spec.key == RECORD_KEY:
        if record_keys is None:
            raise ValueError("features.key is '@key' (the Kafka record key), but no record keys were given")
        for i, k in enumerate(record_keys):
            if k is None:
                _fail(bad, i, FieldError("missing_field", "the record has no Kafka key (features.key: '@key')",
                                         RECORD_KEY))
            else:
                keys[i] = bytes(k)
    elif spec.key is not None:
        col = column(spec.key)
        strs, ok = category_columns([{"v": v} for v in col], [FieldPath("v")])  # strings and ints, columnar
        keys = list(map(str.encode, strs[0]))
        for i in np.flatnonzero(~ok).tolist():
            try:
                if col[i] is MISSING:
                    raise FieldError("missing_field", f"key field '{spec.key}' is missing", spec.key)
                keys[i] = category_key(spec.key, col[i]).encode()
            except FieldError as err:
                _fail(bad, i, err)
        if record_keys is not None:
            for i, k in enumerate(record_keys):
                if i not in bad:
                    checked += 1
                    mismatched += k is None or bytes(k) != keys[i]

    # the event time
    t = np.zeros(n, dtype=np.int64)
    if spec.time == RECORD_TIME:
        if timestamps is None:
            timestamps = [None] * n
        for i, ts in enumerate(timestamps):
            if ts is None or ts <= 0:
                _fail(bad, i, FieldError("missing_field", "the record has no timestamp (features.time: "
                                         "'@timestamp')", RECORD_TIME))
            else:
                t[i] = int(ts)
    elif spec.stateful:
        scale = 1000.0 if spec.time_unit == "s" else 1.0
        vals, ok = _numbers(spec.time, column(spec.time), bad)
        t = np.where(ok, np.round(vals * scale), 0).astype(np.int64)

    values = {f: _numbers(f, column(f), bad)[0] for f in numeric}
    hashes = {}
    for f in hashed:
        col = column(f)
        strs, ok = category_columns([{"v": v} for v in col], [FieldPath("v")])
        keys_f = strs[0]
        for i in np.flatnonzero(~ok).tolist():
            try:
                if col[i] is MISSING:
                    raise FieldError("missing_field", f"field '{f}' is missing", f)
                keys_f[i] = category_key(f, col[i])
            except FieldError as err:
                _fail(bad, i, err)
                keys_f[i] = ""
        hashes[f] = value_hashes(keys_f)
    good = np.ones(n, dtype=bool)
    good[list(bad)] = False
    rows = KeyedRows(keys, t, values, hashes, mismatched, checked)
    return rows, good, sorted(bad.values(), key=lambda b: b.index)


def _numbers(name: str, col: list[Any], bad: dict[int, BadRecord]) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column (NaN where bad); bad rows reported with the per-record checks' message."""
    vals, ok = numeric_columns([{"v": v} for v in col], [FieldPath("v")])
    vals = vals[:, 0]
    for i in np.flatnonzero(~ok).tolist():
        try:
            v = col[i]
            if v is MISSING:
                raise FieldError("missing_field", f"field '{name}' is missing", name)
            vals[i] = number(name, v)
            ok[i] = True
        except FieldError as err:
            _fail(bad, i, err)
    return vals, ok
