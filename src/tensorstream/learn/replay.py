"""Experience replay: a buffer of recently learned rows and a seeded sampler.

See ``OnlineLearner``'s ``replay`` parameter (spec ``learn.replay``). The
buffer keeps rows as they were transformed when learned; its whole state
(rows, sampler, positions) is checkpointed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorstream.features.state import from_json_array, json_array


class ReplayBuffer:
    """The last ``capacity`` learned rows (features as transformed then) and a seeded sampler."""

    def __init__(self, k: int, capacity: int, seed: int, mode: str = "recent") -> None:
        if mode not in ("recent", "reservoir"):
            raise ValueError(f"replay mode must be 'recent' or 'reservoir', not {mode!r}")
        self.k = k
        self.capacity = capacity
        self.mode = mode
        self._rng = np.random.default_rng(seed)
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._size = 0
        self._pos = 0  # next write position (ring)
        self._added = 0  # rows ever offered (reservoir)

    def clear(self) -> None:
        """Forget every row (e.g. on concept drift); the sampler's state goes on."""
        self._size = self._pos = self._added = 0

    def __len__(self) -> int:
        return self._size

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if not self.k or not len(x):
            return
        if self.mode == "recent":
            x, y = x[-self.capacity:], y[-self.capacity:]
        for xi, yi in zip(x, y, strict=True):
            self._add_one(xi, yi)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.k or not self._size:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0)
        assert self._x is not None and self._y is not None
        # floor(u * size) from uniform doubles: one 64-bit draw per index, so k draws now and k
        # later are the 2k draws of one call (numpy's bounded integers buffer 32-bit halves)
        idx = (self._rng.random(self.k) * self._size).astype(np.int64)
        return self._x[idx], self._y[idx]

    def state_dict(self) -> dict[str, np.ndarray]:
        """``rng`` (JSON sampler state), ``x``/``y`` (filled rows, ring order), ``pos``."""
        if not self.k:
            return {}
        state = {"rng": json_array(self._rng.bit_generator.state), "pos": np.array([self._pos], dtype=np.int64)}
        if self.mode == "reservoir":
            state["added"] = np.array([self._added], dtype=np.int64)
        if self._size:
            assert self._x is not None and self._y is not None
            state["x"], state["y"] = self._x[: self._size].copy(), self._y[: self._size].copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._x, self._y, self._size, self._pos = None, None, 0, 0
        if not self.k:
            return
        if "rng" in state:
            self._rng.bit_generator.state = from_json_array(state["rng"])
        if "x" in state:
            x, y = np.asarray(state["x"], dtype=np.float32), np.asarray(state["y"])
            if len(x) > self.capacity:
                raise ValueError(f"replay buffer state has {len(x)} rows, the capacity is {self.capacity}")
            self._x = np.zeros((self.capacity, x.shape[1]), dtype=np.float32)
            self._y = np.zeros(self.capacity, dtype=y.dtype)
            self._x[: len(x)], self._y[: len(x)] = x, y
            self._size = len(x)
            self._pos = int(np.asarray(state["pos"]).reshape(-1)[0]) % self.capacity
        self._added = int(np.asarray(state.get("added", [self._size])).reshape(-1)[0])

    def sample_steps(self, x: np.ndarray,
                     y: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        """Per-record learning: for each row in turn, draw what :meth:`sample` would draw, then :meth:`add` the row.

        Exactly the draws and buffer contents of one :meth:`sample` + :meth:`add`
        per record. Returns ``((rx [n, k, d], ry [n, k], rw [n, k]), slots [n])``:
        ``rw`` is 0 where the buffer was empty; ``slots[i]`` is where row i was
        written (-1: not kept), for :meth:`discard`.
        """
        n, d = x.shape
        if self.mode == "recent":
            return self._recent_steps(x, y)
        rx = np.zeros((n, self.k, d), dtype=np.float32)
        ry = np.zeros((n, self.k), dtype=y.dtype)
        rw = np.zeros((n, self.k), dtype=np.float32)
        slots = np.full(n, -1, dtype=np.int64)
        for i in range(n):  # reservoir: each row's draws depend on where the last one landed
            if self._size:
                sx, sy = self.sample()
                rx[i], ry[i], rw[i] = sx, sy, 1.0
            slots[i] = self._add_one(x[i], y[i])
        return (rx, ry, rw), slots

    def _recent_steps(self, x: np.ndarray,
                      y: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        """:meth:`sample_steps` for the ring buffer, vectorised: row i draws from the slots as
        they are after rows 0..i-1 of the batch were written."""
        n, d, cap = len(x), x.shape[1], self.capacity
        if self._x is None:
            self._x, self._y = np.zeros((cap, d), dtype=np.float32), np.zeros(cap, dtype=y.dtype)
        assert self._y is not None
        sizes = np.minimum(self._size + np.arange(n), cap)  # before each row
        drawn = sizes > 0  # an empty buffer draws nothing (as sample() does)
        u = np.zeros((n, self.k))
        u[drawn] = self._rng.random((int(drawn.sum()), self.k))
        slot = (u * sizes[:, None]).astype(np.int64)
        # the batch row that last wrote each slot before row i, else the slot's old content
        first = (slot - self._pos) % cap  # the first batch row that writes this slot
        rows = np.arange(n)[:, None]
        last = first + cap * np.maximum((rows - 1 - first) // cap, 0)
        virtual = np.where(first < rows, cap + last, slot)
        vx, vy = np.concatenate([self._x, x.astype(np.float32)]), np.concatenate([self._y, y.astype(self._y.dtype)])
        rx, ry, rw = vx[virtual], vy[virtual], np.broadcast_to(drawn[:, None], (n, self.k)).astype(np.float32)
        written = (self._pos + np.arange(n)) % cap
        keep = np.arange(n) >= n - cap  # rows overwritten within the batch are not kept
        self._x[written[keep]], self._y[written[keep]] = x[keep], y[keep]
        self._pos = int((self._pos + n) % cap)
        self._size = int(min(self._size + n, cap))
        return (rx, ry, rw), np.where(keep, written, -1)

    def _add_one(self, xi: np.ndarray, yi: Any) -> int:
        if self._x is None:
            self._x = np.zeros((self.capacity, len(xi)), dtype=np.float32)
            self._y = np.zeros(self.capacity, dtype=np.asarray(yi).dtype)
        assert self._y is not None
        if self.mode == "reservoir":  # Vitter's algorithm R: a uniform sample of every row offered
            self._added += 1
            if self._size < self.capacity:
                slot = self._size
                self._size += 1
            else:
                slot = int(self._rng.integers(0, self._added))
                if slot >= self.capacity:
                    return -1
        else:
            slot = self._pos
            self._pos = (self._pos + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)
        self._x[slot], self._y[slot] = xi, yi
        return slot

    def discard(self, slots: np.ndarray) -> None:
        """Forget the rows written at ``slots`` (rows that turned out not to be learnable)."""
        slots = np.unique(slots[slots >= 0])
        if not len(slots) or self._x is None:
            return
        assert self._y is not None
        order = np.arange(self._size) if self.mode == "reservoir" or self._size < self.capacity else \
            (np.arange(self._size) + self._pos) % self.capacity  # oldest first
        order = order[~np.isin(order, slots)]
        self._x[: len(order)], self._y[: len(order)] = self._x[order], self._y[order]
        self._size = len(order)
        self._pos = self._size % self.capacity
