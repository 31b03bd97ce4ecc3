"""Window aggregates over event time, per key, for a chunk of records in order.

Record i's window holds the records of its key that came *before* it (earlier
chunks: the key's row; this chunk: records j < i of the same key, the ``prior``
matrix) and that fall in the window at i's window time ``te`` (its event time;
for a late record, the oldest time still open: ``watermark - allowed_lateness``).
Late records never enter a window.

- sliding: events with time in ``(te - size, te]``, from the key's event ring;
- tumbling / hopping: the buckets ``te // width - span + 1 .. te // width``,
  each a running summary (count, Welford mean/M2, min, max, last, HyperLogLog).

Everything is masked numpy over ``[n, ring + n]``; chunks are bounded (see
``stage.MAX_CHUNK``) so the ``n x n`` part stays small. Empty windows give
count/sum/distinct 0 and NaN for the others (the stage turns NaN into 0 plus
an "empty" indicator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tensorstream.features.keyed.hll import NO_HASH, hll_estimate, hll_slots
from tensorstream.features.keyed.layout import EMPTY, BucketLayout
from tensorstream.spec.keyed import WindowSpec


@dataclass
class Chunk:
    """Records processed as if one at a time (all arrays ``[n]``, in arrival order)."""

    slots: np.ndarray  # int64: the row of each record's key
    t: np.ndarray  # int64 event time (ms)
    te: np.ndarray  # int64 window time: t, or the oldest open time for a late record
    enter: np.ndarray  # bool: enters the windows (not late)
    values: dict[str, np.ndarray] = field(default_factory=dict)  # float64 per numeric field
    hashes: dict[str, np.ndarray] = field(default_factory=dict)  # uint64 per hashed field
    _prior: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def prior(self) -> np.ndarray:
        """``[n, n]`` bool: j is an earlier record of i's key that entered the windows."""
        if self._prior is None:
            n = len(self.slots)
            tri = np.tri(n, n, -1, dtype=bool)
            self._prior = tri & (self.slots[:, None] == self.slots[None, :]) & self.enter[None, :]
        return self._prior


def _aggregate(aggs: list[str], mask: np.ndarray, vals: np.ndarray | None, times: np.ndarray | None,
               order: np.ndarray | None, hashes: np.ndarray | None) -> dict[str, np.ndarray]:
    """Aggregates over the masked columns of ``[n, c]`` arrays (exact)."""
    out: dict[str, np.ndarray] = {}
    count = mask.sum(axis=1).astype(np.float64)
    has = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        if "count" in aggs:
            out["count"] = count
        if vals is not None:
            v0 = np.where(mask, vals, 0.0)
            total = v0.sum(axis=1)
            mean = np.where(has, total / np.maximum(count, 1), np.nan)
            if "sum" in aggs:
                out["sum"] = total
            if "mean" in aggs:
                out["mean"] = mean
            if "std" in aggs:
                dev = np.where(mask, vals - mean[:, None], 0.0)
                out["std"] = np.where(has, np.sqrt((dev * dev).sum(axis=1) / np.maximum(count, 1)), np.nan)
            if "min" in aggs:
                out["min"] = np.where(has, np.where(mask, vals, np.inf).min(axis=1), np.nan)
            if "max" in aggs:
                out["max"] = np.where(has, np.where(mask, vals, -np.inf).max(axis=1), np.nan)
            if "last" in aggs:
                assert times is not None and order is not None
                tmax = np.where(mask, times, EMPTY).max(axis=1)
                cand = mask & (times == tmax[:, None])
                j = np.where(cand, order, -1).argmax(axis=1)
                out["last"] = np.where(has, vals[np.arange(len(vals)), j], np.nan)
    if "distinct" in aggs:
        assert hashes is not None
        h = np.sort(np.where(mask, hashes, NO_HASH), axis=1)
        new = np.ones(h.shape, dtype=bool)
        new[:, 1:] = h[:, 1:] != h[:, :-1]
        out["distinct"] = (new & (h != NO_HASH)).sum(axis=1).astype(np.float64)
    return out


# ----------------------------------------------------------------------------- sliding


def sliding_features(rows: np.ndarray, w: WindowSpec, c: Chunk) -> dict[str, np.ndarray]:
    """The aggregates of sliding window ``w`` for each record of ``c``."""
    n = len(c)
    cap = rows.dtype["ev_t"].shape[0]
    T = rows["ev_t"][c.slots]
    pushed = rows["ev_n"][c.slots]
    lo, hi = c.te - w.size, c.te
    valid = np.arange(cap)[None, :] < np.minimum(pushed, cap)[:, None]
    ms = valid & (T > lo[:, None]) & (T <= hi[:, None])
    mb = c.prior & (c.t[None, :] > lo[:, None]) & (c.t[None, :] <= hi[:, None])
    mask = np.concatenate([ms, mb], axis=1)
    times = np.concatenate([T, np.broadcast_to(c.t, (n, n))], axis=1)
    vals = order = hashes = None
    f = w.field
    if f is not None and f"ev_v:{f}" in rows.dtype.names:
        vals = np.concatenate([rows[f"ev_v:{f}"][c.slots], np.broadcast_to(c.values[f], (n, n))], axis=1)
        # push number of each ring entry (older pushes first), then the chunk's records after them
        ring_order = np.arange(cap)[None, :] + cap * ((pushed[:, None] - 1 - np.arange(cap)[None, :]) // cap)
        order = np.concatenate([ring_order, np.broadcast_to((1 << 62) + np.arange(n, dtype=np.int64), (n, n))], axis=1)
    if f is not None and "distinct" in w.aggs:
        hashes = np.concatenate([rows[f"ev_h:{f}"][c.slots], np.broadcast_to(c.hashes[f], (n, n))], axis=1)
    return _aggregate(w.aggs, mask, vals, times, order, hashes)


def sliding_update(rows: np.ndarray, c: Chunk, horizon: int) -> int:
    """Push the records that enter the windows into their keys' event rings; returns how many
    pushes dropped an event younger than ``horizon`` ms (the largest sliding size) before them."""
    cap = rows.dtype["ev_t"].shape[0]
    e = np.flatnonzero(c.enter)
    if not len(e):
        return 0
    s = c.slots[e]
    srt = np.argsort(s, kind="stable")
    e, s = e[srt], s[srt]
    first = np.searchsorted(s, s)
    rank = np.arange(len(e)) - first
    total = np.searchsorted(s, s, side="right") - first
    base = rows["ev_n"][s]
    pos = (base + rank) % cap
    # the event each push drops: cap pushes back (earlier in this chunk, or in the ring)
    dropped_t = np.where(rank >= cap, c.t[e[np.maximum(rank - cap, 0) + first]], rows["ev_t"][s, pos])
    full = base + rank >= cap
    truncated = int((full & (dropped_t > c.t[e] - horizon)).sum())
    last = rank >= total - cap
    ev_t = rows["ev_t"]
    ev_t[s[last], pos[last]] = c.t[e[last]]
    for name in rows.dtype.names:
        if name.startswith("ev_v:"):
            rows[name][s[last], pos[last]] = c.values[name[5:]][e[last]]
        elif name.startswith("ev_h:"):
            rows[name][s[last], pos[last]] = c.hashes[name[5:]][e[last]]
    np.add.at(rows["ev_n"], s, 1)
    return truncated


# ---------------------------------------------------------------------------- buckets


def bucket_features(rows: np.ndarray, b: BucketLayout, c: Chunk, p: int) -> dict[str, np.ndarray]:
    """The aggregates of tumbling/hopping window ``b`` for each record of ``c``."""
    w, pre = b.window, b.prefix
    n = len(c)
    width, span = w.width, w.span
    hi = c.te // width
    lo = hi - span + 1
    ids = rows[pre + "id"][c.slots]
    ms = (ids >= lo[:, None]) & (ids <= hi[:, None])
    bj = c.t // width
    mb = c.prior & (bj[None, :] >= lo[:, None]) & (bj[None, :] <= hi[:, None])
    cn = np.where(ms, rows[pre + "n"][c.slots], 0.0)
    nb = mb.sum(axis=1)
    count = cn.sum(axis=1) + nb
    has = count > 0
    out: dict[str, np.ndarray] = {}
    aggs = set(w.aggs)
    if "count" in aggs:
        out["count"] = count.astype(np.float64)
    f = w.field
    with np.errstate(invalid="ignore", divide="ignore"):
        if b.moments:
            v = c.values[f]
            cmean = rows[pre + "mean"][c.slots]
            total = (cn * np.where(ms, cmean, 0.0)).sum(axis=1) + (mb * v[None, :]).sum(axis=1)
            mean = np.where(has, total / np.maximum(count, 1), np.nan)
            if "sum" in aggs:
                out["sum"] = total
            if "mean" in aggs:
                out["mean"] = mean
            if "std" in aggs:
                dc = np.where(ms, cmean - mean[:, None], 0.0)
                m2 = (np.where(ms, rows[pre + "m2"][c.slots], 0.0) + cn * dc * dc).sum(axis=1)
                db = np.where(mb, v[None, :] - mean[:, None], 0.0)
                m2 = m2 + (db * db).sum(axis=1)
                out["std"] = np.where(has, np.sqrt(np.maximum(m2, 0.0) / np.maximum(count, 1)), np.nan)
        for agg, fill, red in (("min", np.inf, np.min), ("max", -np.inf, np.max)):
            if agg in aggs:
                v = c.values[f]
                cell = red(np.where(ms, rows[pre + agg][c.slots], fill), axis=1)
                bat = red(np.where(mb, v[None, :], fill), axis=1)
                out[agg] = np.where(has, red(np.stack([cell, bat]), axis=0), np.nan)
        if "last" in aggs:
            v = c.values[f]
            lt = np.where(ms, rows[pre + "lt"][c.slots], EMPTY)
            jc = lt.argmax(axis=1)
            cell_t = lt[np.arange(n), jc]
            cell_v = rows[pre + "lv"][c.slots][np.arange(n), jc]
            bt = np.where(mb, c.t[None, :], EMPTY)
            tmax = bt.max(axis=1)
            jb = np.where(mb & (bt == tmax[:, None]), np.arange(n)[None, :], -1).max(axis=1)
            use_b = (nb > 0) & (tmax >= cell_t)  # a later record, or the same time but after the cell's
            out["last"] = np.where(has, np.where(use_b, c.values[f][np.maximum(jb, 0)], cell_v), np.nan)
    if "distinct" in aggs:
        regs = np.where(ms[:, :, None], rows[pre + "hll"][c.slots], 0).max(axis=1)
        ii, jj = np.nonzero(mb)
        if len(ii):
            r, rho = hll_slots(c.hashes[f][jj], p)
            np.maximum.at(regs, (ii, r), rho)
        out["distinct"] = np.where(count > 0, hll_estimate(regs), 0.0)
    return out


def bucket_update(rows: np.ndarray, b: BucketLayout, c: Chunk, p: int) -> None:
    """Fold the records that enter the windows into their buckets (in order)."""
    e = np.flatnonzero(c.enter)
    if not len(e):
        return
    pre, B, w = b.prefix, b.ring, b.window
    bkt = c.t[e] // w.width
    s = c.slots[e]
    cell = bkt % B
    g = s * B + cell
    ug, inv = np.unique(g, return_inverse=True)
    gs, gc = ug // B, ug % B
    top = np.full(len(ug), EMPTY, dtype=np.int64)
    np.maximum.at(top, inv, bkt)
    ids = rows[pre + "id"]
    stored = ids[gs, gc]
    newer = top > stored  # the cell held an older bucket (or none): it starts afresh
    if newer.any():
        ns, nc = gs[newer], gc[newer]
        ids[ns, nc] = top[newer]
        rows[pre + "n"][ns, nc] = 0.0
        for name, fill in (("mean", 0.0), ("m2", 0.0), ("min", np.inf), ("max", -np.inf), ("lt", EMPTY),
                           ("lv", 0.0), ("hll", 0)):
            if pre + name in rows.dtype.names:
                rows[pre + name][ns, nc] = fill
    live = bkt == top[inv]  # records of a bucket already overwritten in this chunk do not count
    e, inv = e[live], inv[live]
    k = len(ug)
    cnt = np.bincount(inv, minlength=k).astype(np.float64)
    n_old = rows[pre + "n"][gs, gc]
    n_new = n_old + cnt
    got = cnt > 0
    f = w.field
    if b.moments:
        v = c.values[f][e]
        gmean = np.bincount(inv, weights=v, minlength=k) / np.maximum(cnt, 1)
        d = v - gmean[inv]
        gm2 = np.bincount(inv, weights=d * d, minlength=k)
        mean_old, m2_old = rows[pre + "mean"][gs, gc], rows[pre + "m2"][gs, gc]
        delta = gmean - mean_old
        ratio = np.where(got, cnt / np.maximum(n_new, 1), 0.0)
        rows[pre + "mean"][gs, gc] = np.where(got, mean_old + delta * ratio, mean_old)
        rows[pre + "m2"][gs, gc] = np.where(got, m2_old + gm2 + delta * delta * n_old * ratio, m2_old)
    for agg, fill, ufunc in (("min", np.inf, np.minimum), ("max", -np.inf, np.maximum)):
        if pre + agg in rows.dtype.names:
            acc = rows[pre + agg][gs, gc]
            ufunc.at(acc, inv, c.values[f][e])
            rows[pre + agg][gs, gc] = acc
    if pre + "lt" in rows.dtype.names:
        t = c.t[e]
        lt = rows[pre + "lt"][gs, gc]
        gmax = np.full(k, EMPTY, dtype=np.int64)
        np.maximum.at(gmax, inv, t)
        at_max = np.full(k, -1, dtype=np.int64)
        np.maximum.at(at_max, inv, np.where(t == gmax[inv], e, -1))
        take = got & (gmax >= lt)
        rows[pre + "lt"][gs[take], gc[take]] = gmax[take]
        rows[pre + "lv"][gs[take], gc[take]] = c.values[f][at_max[take]]
    if pre + "hll" in rows.dtype.names:
        r, rho = hll_slots(c.hashes[f][e], p)
        np.maximum.at(rows[pre + "hll"], (gs[inv], gc[inv], r), rho)
    rows[pre + "n"][gs, gc] = n_new
