"""The stateful feature stage: keyed windows, lags, label history and time features.

:class:`KeyedFeatures` turns records (already parsed into :class:`KeyedRows`)
into extra feature columns, appended after the per-record ones. Records are
processed **as if one at a time**: record i's features see the state as it is
after every record before it (in its batch too) and never anything of record i
itself (its own value, or its own label). The batch is cut into chunks
(at most ``MAX_CHUNK`` records, and at every ``state.sweep_every``-th record of
the stream, where TTL and ``max_keys`` are enforced), and each chunk is
computed vectorised (:mod:`.windows`, :mod:`.ring`), so the batch size never
changes a feature.

Columns, in order: per window, one per aggregate (and an "empty" indicator when
an aggregate can be undefined); per lag field, k values and k "present"
indicators; the label history (one-hot per previous label for classification;
value + indicator for regression); time features (sin, cos). Window aggregates,
lags and regression labels are standardised with running statistics of their
present values (missing: 0, the mean, beside the indicator).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorstream.features.keyed.layout import EMPTY, bucket_layouts, row_dtype, sliding_fields, value_fields
from tensorstream.features.keyed.parse import KeyedRows, parse_keyed
from tensorstream.features.keyed.ring import ring_step
from tensorstream.features.keyed.scaling import MaskedStandardizer
from tensorstream.features.keyed.store import MemoryStore
from tensorstream.features.keyed.windows import Chunk, bucket_features, bucket_update, sliding_features, \
    sliding_update
from tensorstream.features.records import BadRecord
from tensorstream.features.state import from_json_array, json_array, prefixed, unprefixed

log = logging.getLogger(__name__)

#: records per vectorised chunk (the window code is O(chunk^2) in memory)
MAX_CHUNK = 256
_UNDEFINED_WHEN_EMPTY = frozenset({"mean", "min", "max", "std", "last"})
_COUNTERS = ("late_records", "keys_expired", "keys_evicted", "window_truncated", "key_mismatch", "keys_checked")
_DAY, _HOUR = 86_400_000, 3_600_000


class KeyPartitioningError(ValueError):
    """features.key is a field, but the topic is not keyed by it (``state.partitioning: refuse``)."""


class KeyedFeatures:
    """Per-key state and the feature columns it gives. See the module docstring.

    ``spec`` is the ``features`` section; ``label_width``: columns per previous label
    (the number of classes; 1 for regression); ``store``: where the rows live
    (default: in memory).
    """

    def __init__(self, spec: Any, label_width: int = 1, regression: bool = False, store: Any = None) -> None:
        self.spec = spec
        self.state_spec = spec.state
        self.numeric_fields, self.hashed_fields = value_fields(spec)
        self.buckets = bucket_layouts(spec)
        self.dtype = row_dtype(spec)
        self.store = store if store is not None else MemoryStore(self.dtype)
        self.label_width = 1 if regression else max(int(label_width), 1)
        self.regression = regression
        self.columns, self._scaled = self._plan()
        self.scaler = MaskedStandardizer(int(self._scaled.sum()))
        slides = [w.size for w in spec.windows if w.type == "sliding"]
        self._horizon = max(slides, default=0)
        self.watermark = int(EMPTY)
        self.n_obs = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._warned = False
        #: the state key of each row of the last transform (delayed labels join on it)
        self.last_keys: list[bytes] = []

    # ------------------------------------------------------------------ columns

    def _plan(self) -> tuple[list[str], np.ndarray]:
        cols: list[tuple[str, bool]] = []
        for w in self.spec.windows:
            cols += [(f"{w.name}.{a}", True) for a in w.aggs]
            if _UNDEFINED_WHEN_EMPTY & set(w.aggs):
                cols.append((f"{w.name}.empty", False))
        for f, k in self.spec.lags.items():
            cols += [(f"lag{m}({f})", True) for m in range(1, k + 1)]
            cols += [(f"lag{m}({f}).present", False) for m in range(1, k + 1)]
        for m in range(1, self.spec.label_history + 1):
            if self.regression:
                cols += [(f"label{m}", True), (f"label{m}.present", False)]
            else:
                cols += [(f"label{m}=class{c}", False) for c in range(self.label_width)]
        for tf in self.spec.time_features:
            cols += [(f"{tf}.sin", False), (f"{tf}.cos", False)]
        return [c for c, _ in cols], np.array([s for _, s in cols], dtype=bool)

    @property
    def width(self) -> int:
        return len(self.columns)

    # ------------------------------------------------------------------ parse

    def parse(self, records: Sequence[Any], record_keys: Sequence[Any] | None,
              timestamps: Sequence[Any] | None) -> tuple[KeyedRows, np.ndarray, list[BadRecord]]:
        """Keys, event times and values of every record (changes no state)."""
        rows, ok, bad = parse_keyed(self.spec, self.numeric_fields, self.hashed_fields, records, record_keys,
                                    timestamps)
        self.counters["key_mismatch"] += rows.mismatched
        self.counters["keys_checked"] += rows.checked
        if rows.mismatched and self.state_spec.partitioning != "off":
            msg = (f"features.key is the field {self.spec.key!r}, but {rows.mismatched} of {rows.checked} records "
                   f"have another Kafka record key (or none): on a topic with several partitions a key's records "
                   f"may then reach different workers, each with part of its state. Produce with the key field as "
                   f"the record key (tensorstream produce --key-field {self.spec.key}); harmless on one partition")
            if self.state_spec.partitioning == "refuse":
                raise KeyPartitioningError(msg + " (state.partitioning: refuse)")
            if not self._warned:
                self._warned = True
                log.warning(msg)
        return rows, ok, bad

    def late_mask(self, t: np.ndarray) -> np.ndarray:
        """Which of these records (in order, all entering the state) would be late."""
        return self._late(np.asarray(t, dtype=np.int64), self.watermark)[0]

    def _late(self, t: np.ndarray, wm: int) -> tuple[np.ndarray, np.ndarray]:
        """``(late, window time)``: against the watermark before each record."""
        if not len(t):
            return np.zeros(0, dtype=bool), t
        before = np.maximum.accumulate(np.concatenate([[wm], t[:-1]]))
        lateness = self.state_spec.allowed_lateness
        open_from = np.where(before == EMPTY, EMPTY, before - lateness)
        return t < open_from, np.maximum(t, open_from)

    # -------------------------------------------------------------- transform

    def transform(self, kr: KeyedRows, labels: np.ndarray | None = None, update: bool = True,
                  sequential: bool = True, scale: bool | None = None) -> np.ndarray:
        """The stateful columns ``float32 [n, width]`` of ``kr`` (in order).

        ``labels``: float per row, NaN where the row has none (delayed labels come
        through :meth:`add_labels`). ``update``: the state takes the records (else the
        batch is computed on a scratch copy and forgotten). ``sequential``: standardise
        each row with statistics up to it (else the batch's, after it). ``scale``: the
        standardisation statistics learn from the batch (default: ``update``).
        """
        n = len(kr)
        self.last_keys = list(kr.keys)
        raw = np.zeros((n, self.width), dtype=np.float64)
        if n == 0:
            return raw.astype(np.float32)
        wm, n_obs = self.watermark, self.n_obs
        scratch = None if update else self._scratch(kr.keys)
        every = self.state_spec.sweep_every
        a = 0
        while a < n:
            b = min(n, a + MAX_CHUNK, a + every - n_obs % every)
            if scratch is None:
                slots = self.store.lookup(kr.keys[a:b])  # may grow (or, on disk, reload) the rows
                rows = self.store.rows
            else:
                rows, slots = scratch[0], scratch[1][a:b]
            t = kr.t[a:b]
            late, te = self._late(t, wm)
            c = Chunk(slots, t, te, ~late, {f: v[a:b] for f, v in kr.values.items()},
                      {f: h[a:b] for f, h in kr.hashes.items()})
            lab = None if labels is None else labels[a:b]
            raw[a:b] = self._chunk(rows, c, lab)
            np.maximum.at(rows["seen"], slots, t)
            np.maximum.at(rows["acc"], slots, n_obs + np.arange(len(t)))
            wm = max(wm, int(t.max()))
            n_obs += len(t)
            if update:
                self.counters["late_records"] += int(late.sum())
                self.watermark, self.n_obs = wm, n_obs
                if n_obs % every == 0:
                    self._sweep()
            a = b
        return self._scale(raw, update if scale is None else scale, sequential)

    def _chunk(self, rows: np.ndarray, c: Chunk, labels: np.ndarray | None) -> np.ndarray:
        """The raw columns of one chunk (NaN: undefined), updating ``rows``."""
        n = len(c)
        cols: list[np.ndarray] = []
        p = self.state_spec.distinct_precision
        buckets = {b.index: b for b in self.buckets}
        for i, w in enumerate(self.spec.windows):
            out = sliding_features(rows, w, c) if w.type == "sliding" else bucket_features(rows, buckets[i], c, p)
            cols += [out[a] for a in w.aggs]
            undefined = _UNDEFINED_WHEN_EMPTY & set(w.aggs)
            if undefined:
                cols.append(np.isnan(out[sorted(undefined)[0]]).astype(np.float64))
        for f, k in self.spec.lags.items():
            lag = ring_step(rows[f"lag:{f}"], rows[f"lagn:{f}"], c.slots, c.values[f], np.ones(n, bool), k)
            cols += [lag[:, m] for m in range(k)] + [(~np.isnan(lag[:, m])).astype(np.float64) for m in range(k)]
        k = self.spec.label_history
        if k:
            y = np.full(n, np.nan) if labels is None else np.asarray(labels, dtype=np.float64)
            hist = ring_step(rows["lab"], rows["labn"], c.slots, np.nan_to_num(y), ~np.isnan(y), k)
            for m in range(k):
                if self.regression:
                    cols += [hist[:, m], (~np.isnan(hist[:, m])).astype(np.float64)]
                else:
                    cls = np.where(np.isnan(hist[:, m]), -1, hist[:, m]).astype(np.int64)
                    cols += [(cls == j).astype(np.float64) for j in range(self.label_width)]
        for tf in self.spec.time_features:
            frac = (c.t % _DAY) / _DAY if tf == "hour_of_day" else ((c.t / _DAY + 3) % 7) / 7  # 1970-01-01: Thursday
            cols += [np.sin(2 * np.pi * frac), np.cos(2 * np.pi * frac)]
        if any(w.type == "sliding" for w in self.spec.windows):
            self.counters["window_truncated"] += sliding_update(rows, c, self._horizon)
        for b in self.buckets:
            bucket_update(rows, b, c, p)
        return np.stack(cols, axis=1) if cols else np.zeros((n, 0))

    def _scale(self, raw: np.ndarray, update: bool, sequential: bool) -> np.ndarray:
        s = self._scaled
        if s.any():
            x = raw[:, s]
            if not self.spec.standardize:
                z = x
            elif update and sequential:
                z = self.scaler.running(x)
            else:
                if update:
                    self.scaler.update(x)
                z = self.scaler.transform(x)
            raw[:, s] = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        return raw.astype(np.float32)

    def _scratch(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``keys`` (copies; empty for unknown keys) and the slot of each record in them."""
        uniq = list(dict.fromkeys(keys))
        pos = {k: i for i, k in enumerate(uniq)}
        return self.store.peek(uniq), np.fromiter(map(pos.__getitem__, keys), dtype=np.int64, count=len(keys))

    def _sweep(self) -> None:
        st = self.state_spec
        if st.ttl is None and st.max_keys is None:
            return
        expired, evicted = self.store.sweep(self.watermark, st.ttl, st.max_keys)
        self.counters["keys_expired"] += expired
        self.counters["keys_evicted"] += evicted

    # ----------------------------------------------------------- delayed labels

    def add_labels(self, keys: list[bytes], y: np.ndarray) -> None:
        """Labels that arrived now (delayed labels), in order, into their keys' label history."""
        k = self.spec.label_history
        if not k or not keys:
            return
        slots = self.store.lookup(keys)
        rows = self.store.rows
        y = np.asarray(y, dtype=np.float64)
        ring_step(rows["lab"], rows["labn"], slots, y, np.ones(len(y), bool), k)

    # -------------------------------------------------------------------- state

    def snapshot(self) -> dict[str, int]:
        """Counts (Python ints, so results print them as counts)."""
        c = self.counters
        return {"keys": int(self.store.n_keys), **{k: int(c[k]) for k in
                ("keys_expired", "keys_evicted", "late_records", "window_truncated", "key_mismatch")}}

    def state_dict(self) -> dict[str, np.ndarray]:
        """``meta`` (JSON: watermark, records seen, counters, row layout, store), ``store/...``, ``scaler/...``."""
        meta = {"watermark": self.watermark, "n_obs": self.n_obs, "counters": self.counters,
                "row": str(self.dtype.descr), **self.store.commit()}
        return {"meta": json_array(meta), **prefixed("store", self.store.state_dict()),
                **prefixed("scaler", self.scaler.state_dict())}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        meta = from_json_array(state["meta"])
        if meta["row"] != str(self.dtype.descr):
            raise ValueError("keyed feature state was made with another row layout (windows, lags or state "
                             "settings changed)")
        if meta.get("store", "memory") != self.store.kind:
            raise ValueError(f"keyed feature state was kept in the {meta.get('store')} store; the spec says "
                             f"state.store: {self.store.kind}")
        self.store.load_state_dict(unprefixed("store", state), meta)
        self.scaler.load_state_dict(unprefixed("scaler", state))
        self.watermark, self.n_obs = int(meta["watermark"]), int(meta["n_obs"])
        self.counters = {c: int(meta["counters"].get(c, 0)) for c in _COUNTERS}

    def close(self) -> None:
        self.store.close()


def late_rows(keyed: KeyedFeatures | None, kr: KeyedRows | None, good_idx: np.ndarray,
              keep: np.ndarray | None = None) -> tuple[np.ndarray, list[BadRecord]]:
    """With ``state.late: dead_letter``: ``(late mask over the rows of kr, their bad records)``;
    rows ``keep`` masks out do not count (they never reach the state). ``good_idx``: each
    row's index in the batch."""
    late = np.zeros(len(good_idx), dtype=bool)
    if keyed is None or kr is None or keyed.state_spec.late != "dead_letter":
        return late, []
    keep = np.ones(len(good_idx), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    late[keep] = keyed.late_mask(kr.t[keep])
    lateness = keyed.state_spec.allowed_lateness
    bad = [BadRecord(int(good_idx[i]), "late_record", f"event time {int(kr.t[i])} is more than {lateness} ms "
                     f"behind the watermark (features.state.allowed_lateness)", keyed.spec.time)
           for i in np.flatnonzero(late).tolist()]
    return late, bad
