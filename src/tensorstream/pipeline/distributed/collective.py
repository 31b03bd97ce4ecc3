"""Collectives as numpy in, numpy out, and the feature state that learns from every rank's batch."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import orjson

from tensorstream.features.state import from_json_array, json_array
from tensorstream.features.transform import FeaturePipeline, ParsedBatch
from tensorstream.pipeline.distributed.context import DistributedError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- collectives
class Collective(Protocol):
    """What a distributed backend adds to :class:`~tensorstream.backends.base.Backend`."""

    rank: int
    world_size: int
    train_steps: int

    def connect(self, **options: Any) -> None: ...
    def all_reduce(self, a: np.ndarray) -> np.ndarray: ...
    def empty_step(self) -> None: ...
    def close(self) -> None: ...


def gather_rows(coll: Collective, row: np.ndarray) -> np.ndarray:
    """Every rank's ``row`` as ``[world_size, len(row)]``: an all-gather built from one
    all-reduce (each rank fills its own row of zeros; adding zeros is exact)."""
    row = np.asarray(row).reshape(-1)
    buf = np.zeros((coll.world_size, row.shape[0]), dtype=row.dtype)
    buf[coll.rank] = row
    return coll.all_reduce(buf.reshape(-1)).reshape(buf.shape)


def allgather_bytes(coll: Collective, data: bytes, capacity: int = 0) -> list[bytes]:
    """Every rank's ``data`` (any length), in rank order, via all-reduces of int64.

    The payloads are packed as little-endian int64 words into disjoint segments of
    one buffer. With ``capacity`` (bytes per rank), one all-reduce of a fixed-size
    buffer carries every payload up to that size (and the lengths); only when
    some payload is longer does a second round follow, sized to fit (padded to a
    power of two, so that graph engines see few shapes).
    """
    if capacity > 0:
        words = (capacity + 7) // 8
        row = np.zeros(1 + words, dtype=np.int64)
        row[0] = len(data)
        if len(data) <= words * 8:
            padded = data + b"\0" * (-len(data) % 8)
            row[1:1 + len(padded) // 8] = np.frombuffer(padded, dtype="<i8")
        rows = gather_rows(coll, row)
        lengths = rows[:, 0].tolist()
        if max(lengths) <= words * 8:
            return [rows[r, 1:].astype("<i8").tobytes()[:n] for r, n in enumerate(lengths)]
    else:
        lengths = gather_rows(coll, np.array([len(data)], dtype=np.int64))[:, 0].tolist()
    if not any(lengths):
        return [b""] * coll.world_size
    words = [(n + 7) // 8 for n in lengths]
    starts = np.concatenate([[0], np.cumsum(words)]).astype(int).tolist()
    buf = np.zeros(1 << max(starts[-1] - 1, 0).bit_length(), dtype=np.int64)
    if data:
        padded = data + b"\0" * (words[coll.rank] * 8 - len(data))
        buf[starts[coll.rank]:starts[coll.rank + 1]] = np.frombuffer(padded, dtype="<i8")
    out = coll.all_reduce(buf).astype("<i8")
    return [out[starts[r]:starts[r + 1]].tobytes()[:lengths[r]] for r in range(coll.world_size)]


# --------------------------------------------------------------------------- features
class SyncedFeatures:
    """A :class:`FeaturePipeline` whose state learns from every rank's batch.

    Single-rank training updates the running scaler and the one-hot vocabularies
    with the batch, then transforms it. Here each rank sends what its batch would
    teach (the layout once, new category keys in first-seen order, the batch's
    count/mean/M2), every rank folds all of it in rank order, then transforms its
    own rows without updating: the state is the same on every rank and equals
    learning from the union batch (rank 0's rows first). Everything else is the
    wrapped pipeline's.
    """

    def __init__(self, inner: FeaturePipeline, coll: Collective) -> None:
        self._inner = inner
        self._coll = coll
        #: syncs taken (one per step on every rank)
        self.syncs = 0
        #: bytes per rank that one all-reduce carries; grows (on every rank alike) when a payload did not fit
        self.capacity = 1024
        self._layout_everywhere = False
        s = inner.spec
        self._onehot = s.categorical if s.categorical_encoding == "onehot" else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def inner(self) -> FeaturePipeline:
        return self._inner

    def transform_parsed(self, parsed: ParsedBatch, keep: np.ndarray | None = None, update: bool = True,
                         labels: np.ndarray | None = None, keyed_update: bool | None = None) -> np.ndarray:
        # labels / keyed_update feed stateful features, which distributed training refuses (spec check)
        if keep is not None:
            parsed = parsed.select(keep)
        self.sync(parsed if update else None)
        return self._inner.transform_parsed(parsed, None, update=False)

    def _static(self) -> bool:
        """Nothing left to learn from batches: no collective needed."""
        return self._layout_everywhere and not self._onehot and not (
            self._inner.spec.standardize and self._inner.numeric_width)

    def sync(self, parsed: ParsedBatch | None) -> None:
        """Exchange and fold this step's feature updates (collective: every rank, every step)."""
        self.syncs += 1
        if self._static():
            return
        state = self._inner.state_dict()
        payload: dict[str, Any] = {}
        stats = np.zeros(0)
        if "layout" in state and not self._layout_everywhere:
            payload["layout"] = from_json_array(state["layout"])
        if parsed is not None and len(parsed):
            vocab = from_json_array(state["vocab"]) if "vocab" in state else {}
            new: dict[str, list[str]] = {}
            for j, name in enumerate(self._inner.spec.categorical):
                if name not in self._onehot:
                    continue
                known = set(vocab.get(name, []))
                keys = [k for k in dict.fromkeys(row[j] for row in parsed.categories) if k not in known]
                if keys:
                    new[name] = keys
            if new:
                payload["vocab"] = new
            if self._inner.spec.standardize and parsed.numeric.shape[1]:
                x = parsed.numeric
                mean = x.mean(axis=0)
                stats = np.concatenate([[len(x)], mean, ((x - mean) ** 2).sum(axis=0)]).astype("<f8")
        # JSON (layout, new keys) + NUL + the batch's statistics as raw float64 (exact, compact)
        data = orjson.dumps(payload) + b"\0" + stats.tobytes() if payload or len(stats) else b""
        parts = allgather_bytes(self._coll, data, self.capacity)
        longest = max(len(p) for p in parts)
        if longest > self.capacity:
            self.capacity = 1 << longest.bit_length()
        self._fold(state, [_unpack(p) for p in parts])

    def _fold(self, state: dict[str, np.ndarray], parts: list[dict[str, Any]]) -> None:
        changed = False
        layouts = [p["layout"] for p in parts if "layout" in p]
        if layouts:
            if any(lay != layouts[0] for lay in layouts):
                raise DistributedError(f"the ranks inferred different feature layouts {layouts}: list "
                                       "features.numeric explicitly")
            if "layout" not in state:
                width = sum(int(w) for _, w in layouts[0]["fields"])
                state["layout"] = json_array(layouts[0])
                for k in ("count", "mean", "m2"):
                    state[f"scaler/{k}"] = np.zeros(width, dtype=np.float64)
                changed = True
            self._layout_everywhere = True
        vocab = from_json_array(state["vocab"]) if "vocab" in state else None
        cap = self._inner.spec.max_categories
        for p in parts:
            for name, keys in p.get("vocab", {}).items():
                assert vocab is not None
                have = vocab.setdefault(name, [])
                seen = set(have)
                for k in keys:
                    if len(have) >= cap:
                        break  # later keys share the overflow slot, as on one rank
                    if k not in seen:
                        have.append(k)
                        seen.add(k)
                        changed = True
            if "stats" in p:
                n_b, mean_b, m2_b = p["stats"]
                count, mean, m2 = (np.asarray(state[f"scaler/{k}"], dtype=np.float64) for k in ("count", "mean", "m2"))
                n = count + n_b  # Chan et al.'s merge, as RunningStandardizer.update does it
                delta = mean_b - mean
                state["scaler/mean"] = mean + delta * (n_b / n)
                state["scaler/m2"] = m2 + m2_b + delta**2 * (count * n_b / n)
                state["scaler/count"] = n
                changed = True
        if vocab is not None:
            state["vocab"] = json_array(vocab)
        if changed:
            self._inner.load_state_dict(state)


def _unpack(part: bytes) -> dict[str, Any]:
    """One rank's sync payload: ``{"layout"?, "vocab"?, "stats"?: (n, mean, m2)}``."""
    if not part:
        return {}
    head, _, tail = part.partition(b"\0")
    out: dict[str, Any] = orjson.loads(head)
    if tail:
        v = np.frombuffer(tail, dtype="<f8")
        d = (len(v) - 1) // 2
        out["stats"] = (float(v[0]), v[1:1 + d], v[1 + d:])
    return out
