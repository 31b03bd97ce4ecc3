"""The fixed-size state of one key: a numpy structured dtype built from the spec.

Every key's state is one row of that dtype, so the whole state is one array
(vectorised reads and writes over a batch's keys, one buffer to checkpoint),
and a key's state is ``row.tobytes()`` for the disk store. Fields:

- ``seen`` (int64): the largest event time of the key (TTL), ``acc`` (int64):
  the record number of its last record (eviction beyond ``max_keys``);
- lags of field *f*: ``lag:f`` float64 ``(k,)`` ring + ``lagn:f`` pushes so far;
- label history: ``lab`` float64 ``(k,)`` ring + ``labn``;
- sliding windows share one event ring per key: ``ev_t`` int64 ``(max_events,)``,
  ``ev_n``, and per field ``ev_v:f`` (values) / ``ev_h:f`` (64-bit hashes, for
  distinct counts);
- tumbling/hopping window *w*: a ring of ``B`` buckets, ``bk<w>_id`` int64 (the
  bucket number held, or EMPTY), ``bk<w>_n`` and, as its aggregates need,
  ``_mean``/``_m2`` (Welford, for sum/mean/std), ``_min``, ``_max``, ``_lt``/``_lv``
  (time and value of the last record), ``_hll`` uint8 ``(B, 2**p)``.

``B = span + ceil(allowed_lateness / width) + 1``: enough that a bucket a
non-late record can still need is never overwritten by a newer one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorstream.spec.keyed import NUMERIC_AGGS, WindowSpec

EMPTY = np.iinfo(np.int64).min  # an empty bucket's id, an empty event's time


@dataclass(frozen=True)
class BucketLayout:
    """Where bucketed window ``index`` lives in a row."""

    index: int
    window: WindowSpec
    ring: int  # buckets kept (B)

    @property
    def prefix(self) -> str:
        return f"bk{self.index}_"

    @property
    def moments(self) -> bool:
        return bool({"sum", "mean", "std"} & set(self.window.aggs))


def value_fields(spec: Any) -> tuple[list[str], list[str]]:
    """``(numeric fields, hashed fields)`` the stateful features read from records, in spec order."""
    numeric: dict[str, None] = {}
    hashed: dict[str, None] = {}
    for f in spec.lags:
        numeric[f] = None
    for w in spec.windows:
        if w.field is None:
            continue
        if NUMERIC_AGGS & set(w.aggs):
            numeric[w.field] = None
        if "distinct" in w.aggs:
            hashed[w.field] = None
    return list(numeric), list(hashed)


def sliding_fields(spec: Any) -> tuple[list[str], list[str]]:
    """``(fields whose values, fields whose hashes)`` the sliding-window event ring keeps."""
    vals: dict[str, None] = {}
    hashes: dict[str, None] = {}
    for w in spec.windows:
        if w.type == "sliding" and w.field is not None:
            if NUMERIC_AGGS & set(w.aggs):
                vals[w.field] = None
            if "distinct" in w.aggs:
                hashes[w.field] = None
    return list(vals), list(hashes)


def bucket_layouts(spec: Any) -> list[BucketLayout]:
    out = []
    for i, w in enumerate(spec.windows):
        if w.type == "sliding":
            continue
        ring = w.span + math.ceil(spec.state.allowed_lateness / w.width) + 1
        out.append(BucketLayout(i, w, ring))
    return out


def row_dtype(spec: Any) -> np.dtype:
    """The structured dtype of one key's state (see the module docstring)."""
    fields: list[tuple] = [("seen", np.int64), ("acc", np.int64)]
    for f, k in spec.lags.items():
        fields += [(f"lag:{f}", np.float64, (k,)), (f"lagn:{f}", np.int64)]
    if spec.label_history:
        fields += [("lab", np.float64, (spec.label_history,)), ("labn", np.int64)]
    if any(w.type == "sliding" for w in spec.windows):
        cap = spec.state.max_events
        vals, hashes = sliding_fields(spec)
        fields += [("ev_t", np.int64, (cap,)), ("ev_n", np.int64)]
        fields += [(f"ev_v:{f}", np.float64, (cap,)) for f in vals]
        fields += [(f"ev_h:{f}", np.uint64, (cap,)) for f in hashes]
    m = 1 << spec.state.distinct_precision
    for b in bucket_layouts(spec):
        p, B, aggs = b.prefix, b.ring, set(b.window.aggs)
        fields += [(p + "id", np.int64, (B,)), (p + "n", np.float64, (B,))]
        if b.moments:
            fields += [(p + "mean", np.float64, (B,)), (p + "m2", np.float64, (B,))]
        if "min" in aggs:
            fields.append((p + "min", np.float64, (B,)))
        if "max" in aggs:
            fields.append((p + "max", np.float64, (B,)))
        if "last" in aggs:
            fields += [(p + "lt", np.int64, (B,)), (p + "lv", np.float64, (B,))]
        if "distinct" in aggs:
            fields.append((p + "hll", np.uint8, (B, m)))
    return np.dtype(fields)


def empty_rows(dtype: np.dtype, n: int) -> np.ndarray:
    """``n`` rows of a key that has seen nothing."""
    rows = np.zeros(n, dtype=dtype)
    init_rows(rows)
    return rows


def init_rows(rows: np.ndarray) -> None:
    """Reset ``rows`` (a structured array or a fancy-indexed copy) to "nothing seen"."""
    rows[...] = np.zeros((), dtype=rows.dtype)
    for name in rows.dtype.names or ():
        if name == "seen" or name == "ev_t" or name.endswith("_id") or name.endswith("_lt"):
            rows[name] = EMPTY
        elif name.endswith("_min"):
            rows[name] = np.inf
        elif name.endswith("_max"):
            rows[name] = -np.inf
