"""A brute-force reference of the stateful features: one record at a time, plain Python.

It keeps every event of every key and recomputes each aggregate from scratch, so it
shares nothing with the vectorised code but the definitions (docs/features.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensorstream.features.keyed.hll import hll_estimate, hll_slots, value_hashes

UNDEFINED = {"mean", "min", "max", "std", "last"}


def aggregate(aggs: list[str], events: list[tuple[int, float, str]], hashed: bool, p: int) -> list[float]:
    """events: (time, value, category key) in arrival order."""
    vals = [v for _, v, _ in events]
    out = []
    n = len(events)
    for a in aggs:
        if a == "count":
            out.append(float(n))
        elif a == "sum":
            out.append(float(sum(vals)))
        elif n == 0 and a in UNDEFINED:
            out.append(math.nan)
        elif a == "mean":
            out.append(sum(vals) / n)
        elif a == "min":
            out.append(min(vals))
        elif a == "max":
            out.append(max(vals))
        elif a == "std":
            m = sum(vals) / n
            out.append(math.sqrt(sum((v - m) ** 2 for v in vals) / n))
        elif a == "last":
            best = max(range(n), key=lambda j: (events[j][0], j))
            out.append(vals[best])
        elif a == "distinct":
            cats = sorted({c for _, _, c in events})
            if not hashed:
                out.append(float(len(cats)))
            elif not cats:
                out.append(0.0)
            else:
                regs = np.zeros((1, 1 << p), np.uint8)
                r, rho = hll_slots(value_hashes(cats), p)
                np.maximum.at(regs, (np.zeros(len(r), np.int64), r), rho)
                out.append(float(hll_estimate(regs)[0]))
    if UNDEFINED & set(aggs):
        out.append(float(n == 0))
    return out


class Reference:
    """The features of ``KeyedFeatures`` (with ``standardize: false``), record by record."""

    def __init__(self, spec: Any, label_width: int = 2) -> None:
        self.spec = spec
        self.st = spec.state
        self.label_width = label_width
        self.keys: dict[Any, dict[str, Any]] = {}
        self.wm: int | None = None
        self.n = 0
        self.late = self.expired = self.evicted = 0

    def _key(self, k: Any) -> dict[str, Any]:
        if k not in self.keys:
            self.keys[k] = {"events": [], "lags": {f: [] for f in self.spec.lags}, "labels": [], "seen": None,
                            "acc": -1}
        return self.keys[k]

    def step(self, key: Any, t: int, values: dict[str, float], cat: dict[str, str], label: float | None) -> list[float]:
        s = self._key(key)
        L = self.st.allowed_lateness
        open_from = None if self.wm is None else self.wm - L
        late = open_from is not None and t < open_from
        te = t if open_from is None else max(t, open_from)
        row: list[float] = []
        for w in self.spec.windows:
            if w.type == "sliding":
                evs = [e for e in s["events"][-self.st.max_events:] if te - w.size < e[0] <= te]
            else:
                hi = te // w.width
                lo = hi - w.span + 1
                evs = [e for e in s["events"] if lo <= e[0] // w.width <= hi]
            evs = [(e[0], e[1].get(w.field, 0.0), e[2].get(w.field, "")) for e in evs]
            row += aggregate(w.aggs, evs, w.type != "sliding", self.st.distinct_precision)
        for f, k in self.spec.lags.items():
            prev = s["lags"][f][::-1][:k]
            vals = [prev[m] if m < len(prev) else math.nan for m in range(k)]
            row += vals + [float(not math.isnan(v)) for v in vals]
        k = self.spec.label_history
        if k:
            prev = s["labels"][::-1][:k]
            for m in range(k):
                row += [float(m < len(prev) and prev[m] == c) for c in range(self.label_width)]
        for tf in self.spec.time_features:
            frac = (t % 86_400_000) / 86_400_000 if tf == "hour_of_day" else ((t / 86_400_000 + 3) % 7) / 7
            row += [math.sin(2 * math.pi * frac), math.cos(2 * math.pi * frac)]
        # then the record enters the state
        if late:
            self.late += 1
        else:
            s["events"].append((t, values, cat))
        for f in self.spec.lags:
            s["lags"][f].append(values[f])
        if label is not None:
            s["labels"].append(label)
        s["seen"] = t if s["seen"] is None else max(s["seen"], t)
        s["acc"] = self.n
        self.wm = t if self.wm is None else max(self.wm, t)
        self.n += 1
        if self.n % self.st.sweep_every == 0:
            self._sweep()
        return row

    def _sweep(self) -> None:
        if self.st.ttl is not None:
            for k in [k for k, s in self.keys.items() if s["seen"] < self.wm - self.st.ttl]:
                del self.keys[k]
                self.expired += 1
        if self.st.max_keys is not None and len(self.keys) > self.st.max_keys:
            order = sorted(self.keys, key=lambda k: self.keys[k]["acc"])
            for k in order[: len(self.keys) - self.st.max_keys]:
                del self.keys[k]
                self.evicted += 1
