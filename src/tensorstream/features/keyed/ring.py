"""Lags and label history: the previous k values of a key, vectorised over a chunk.

A chunk is a run of records processed as if one at a time: record i sees the
values pushed before it, by earlier chunks (the ring in the key's row) and by
earlier records of the same key in this chunk. Both parts are read without a
Python loop over records: the pushers of the chunk are sorted by (slot, index),
so "the m-th latest value of my key before me" is an index computation.

>>> ring, n = np.zeros((2, 2)), np.zeros(2, np.int64)
>>> out = ring_step(ring, n, np.array([0, 1, 0, 0]), np.array([1.0, 2.0, 3.0, 4.0]),
...                 np.array([True, True, True, True]), 2)
>>> out.tolist()   # lag 1, lag 2 (nan: none yet)
[[nan, nan], [nan, nan], [1.0, nan], [3.0, 1.0]]
>>> ring_step(ring, n, np.array([0]), np.array([5.0]), np.array([True]), 2).tolist(), n.tolist()
([[4.0, 3.0]], [4, 1])
"""

from __future__ import annotations

import numpy as np


def ring_step(ring: np.ndarray, count: np.ndarray, slots: np.ndarray, values: np.ndarray, push: np.ndarray,
              k: int, update: bool = True) -> np.ndarray:
    """Features ``[n, k]`` (lag 1 first; NaN where the key has fewer values) of each record,
    then (``update``) push the ``push`` records' values in order.

    ``ring`` ``[slots, k]`` and ``count`` ``[slots]`` (pushes so far) are updated in place
    (they may be views into the rows of a store).
    """
    n = len(slots)
    idx = np.arange(n, dtype=np.int64)
    p = np.flatnonzero(push)
    key_p = slots[p] * (n + 1) + p
    srt = np.argsort(key_p, kind="stable")
    key_p, p = key_p[srt], p[srt]
    start = np.searchsorted(key_p, slots * (n + 1))
    before = np.searchsorted(key_p, slots * (n + 1) + idx) - start  # pushers of my key before me
    rn = count[slots]
    out = np.full((n, k), np.nan)
    for m in range(1, k + 1):
        inb = before >= m
        if inb.any():
            out[inb, m - 1] = values[p[start[inb] + before[inb] - m]]
        back = m - before
        old = ~inb & (back <= np.minimum(rn, k))
        if old.any():
            out[old, m - 1] = ring[slots[old], (rn[old] - back[old]) % k]
    if update and len(p):
        sp = slots[p]
        first = np.searchsorted(key_p, sp * (n + 1))
        rank = np.arange(len(p)) - first
        total = np.searchsorted(key_p, sp * (n + 1) + n + 1) - first
        last = rank >= total - k  # only the last k of a key land in its ring
        ring[sp[last], (count[sp[last]] + rank[last]) % k] = values[p[last]]
        np.add.at(count, sp, 1)
    return out
