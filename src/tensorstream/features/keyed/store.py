"""Where the per-key rows live: in memory (default), or on disk (:mod:`.disk`).

A store maps keys (bytes) to slots of one structured array (``rows``, dtype
from :mod:`.layout`). Both stores have the same interface and the same
semantics; the stage never knows which it has:

- ``lookup(keys)``: the slot of each key, new keys created empty; the slots
  stay valid (resident) until the next ``lookup``;
- ``sweep(watermark, ttl, max_keys)``: drop keys not seen for ``ttl`` (event
  time), then the least recently seen beyond ``max_keys``; returns the counts;
- ``state_dict()`` / ``load_state_dict()``: the checkpoint's part.

The memory store's checkpoint is the whole state: the keys (UTF-8/bytes,
concatenated, with offsets) and the rows as one uint8 buffer: no Python object
per key is built to write it.

>>> from tensorstream.spec import FeatureSpec
>>> from tensorstream.features.keyed.layout import row_dtype
>>> st = MemoryStore(row_dtype(FeatureSpec(key="k", lags={"x": 2})))
>>> st.lookup([b"a", b"b", b"a"]).tolist(), st.n_keys
([0, 1, 0], 2)
>>> st.rows["seen"][:2] = [10, 500]; st.rows["acc"][:2] = [1, 2]
>>> st.sweep(watermark=600, ttl=300, max_keys=None), st.n_keys, st.lookup([b"b"]).tolist()
((1, 0), 1, [1])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorstream.features.keyed.layout import empty_rows, init_rows


def pack_keys(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Keys -> (uint8 concatenation, int64 end offsets)."""
    ends = np.cumsum(np.fromiter(map(len, keys), dtype=np.int64, count=len(keys)))
    return np.frombuffer(b"".join(keys), dtype=np.uint8).copy(), ends


def unpack_keys(blob: np.ndarray, ends: np.ndarray) -> list[bytes]:
    data = np.asarray(blob, dtype=np.uint8).tobytes()
    ends_l = np.asarray(ends, dtype=np.int64).tolist()
    return [data[a:b] for a, b in zip([0, *ends_l[:-1]], ends_l, strict=True)]


class MemoryStore:
    """Keys -> slots of one in-memory structured array that grows by doubling."""

    kind = "memory"

    def __init__(self, dtype: np.dtype, capacity: int = 64) -> None:
        self.dtype = dtype
        self.rows = empty_rows(dtype, capacity)
        self.index: dict[bytes, int] = {}
        self.keys: list[bytes | None] = [None] * capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.live = np.zeros(capacity, dtype=bool)  # slots holding a key (vectorised sweeps)

    @property
    def n_keys(self) -> int:
        return len(self.index)

    def _grow(self, need: int) -> None:
        cap = len(self.rows)
        new = max(cap * 2, cap + need)
        rows = empty_rows(self.dtype, new)
        rows[:cap] = self.rows
        self.rows = rows
        self.keys.extend([None] * (new - cap))
        self.live = np.concatenate([self.live, np.zeros(new - cap, dtype=bool)])
        self.free = list(range(new - 1, cap - 1, -1)) + self.free

    def lookup(self, keys: list[bytes]) -> np.ndarray:
        index = self.index
        new = [k for k in dict.fromkeys(keys) if k not in index]
        if new:
            if len(new) > len(self.free):
                self._grow(len(new) - len(self.free))
            for k in new:
                slot = self.free.pop()
                index[k] = slot
                self.keys[slot] = k
                self.live[slot] = True
        return np.fromiter(map(index.__getitem__, keys), dtype=np.int64, count=len(keys))

    def peek(self, keys: list[bytes]) -> np.ndarray:
        """Copies of the rows of ``keys`` (empty rows for unknown keys); creates nothing."""
        out = empty_rows(self.dtype, len(keys))
        have = [(i, self.index[k]) for i, k in enumerate(keys) if k in self.index]
        if have:
            at, slots = zip(*have, strict=True)
            out[list(at)] = self.rows[list(slots)]
        return out

    def _drop(self, slots: np.ndarray) -> None:
        for s in slots.tolist():
            del self.index[self.keys[s]]  # type: ignore[index]
            self.keys[s] = None
            self.free.append(s)
        self.live[slots] = False
        sub = self.rows[slots]
        init_rows(sub)
        self.rows[slots] = sub

    def sweep(self, watermark: int, ttl: int | None, max_keys: int | None) -> tuple[int, int]:
        """Drop expired keys, then the least recently seen beyond ``max_keys``: ``(expired, evicted)``."""
        live = np.flatnonzero(self.live)
        expired = evicted = 0
        if ttl is not None and len(live):
            old = self.rows["seen"][live] < watermark - ttl
            expired = int(old.sum())
            if expired:
                self._drop(live[old])
                live = live[~old]
        if max_keys is not None and len(live) > max_keys:
            evicted = len(live) - max_keys
            acc = self.rows["acc"][live]
            self._drop(live[np.argpartition(acc, evicted - 1)[:evicted]])
        return expired, evicted

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """``keys`` + ``key_ends`` (the keys, packed), ``rows`` (their rows' bytes, same order)."""
        keys = list(self.index)
        slots = np.fromiter(self.index.values(), dtype=np.int64, count=len(keys))
        blob, ends = pack_keys(keys)
        return {"keys": blob, "key_ends": ends,
                "rows": np.ascontiguousarray(self.rows[slots]).view(np.uint8).reshape(-1)}

    def load_state_dict(self, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        keys = unpack_keys(state["keys"], state["key_ends"]) if "keys" in state else []
        raw = np.asarray(state.get("rows", np.zeros(0, np.uint8)), dtype=np.uint8)
        if raw.size != len(keys) * self.dtype.itemsize:
            raise ValueError(f"keyed state: {raw.size} bytes of rows for {len(keys)} keys of "
                             f"{self.dtype.itemsize} bytes")
        cap = max(64, 1 << max(len(keys), 1).bit_length())
        self.rows = empty_rows(self.dtype, cap)
        self.rows[: len(keys)] = raw.view(self.dtype)
        self.index = dict(zip(keys, range(len(keys)), strict=True))
        self.keys = [*keys, *([None] * (cap - len(keys)))]
        self.free = list(range(cap - 1, len(keys) - 1, -1))
        self.live = np.zeros(cap, dtype=bool)
        self.live[: len(keys)] = True

    def commit(self) -> dict[str, Any]:
        """What the checkpoint's meta records about the store (nothing to make durable here)."""
        return {"store": self.kind}

    def close(self) -> None:
        pass
