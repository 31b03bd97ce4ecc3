"""The disk-backed key store (``features.state.store: disk``): SQLite, for key spaces beyond memory.

Same interface and semantics as :class:`~tensorstream.features.keyed.store.MemoryStore`
(the stage cannot tell them apart); what differs is where the rows are:

- a cache of ``cache_keys`` decoded rows in memory (least recently seen go first);
  rows changed since the last checkpoint stay in memory until it (``pending``),
  so the database only ever holds checkpointed states;
- ``kv(key, row, seen, acc)`` in ``<path>/state.sqlite`` (WAL, ``synchronous=FULL``).

Exactly once, like the in-memory state: :meth:`commit` (called when the learner's
state is taken for a checkpoint) writes every changed row in one transaction that
also advances the store's *epoch* and records an undo log (each changed key's
previous row, or its absence). The checkpoint holds only ``{id, epoch}``. On
restore, a database ahead of the checkpoint (it committed, the checkpoint did not
land) is rolled back epoch by epoch with the undo log, to exactly the state the
checkpoint's offsets reflect; a database behind it, or another database, is
refused. A pipeline that starts with no checkpoint to restore clears the
database (with a warning): its rows belong to no lineage any more.

The database is local to the worker: a rebalance that moves the partitions to
another machine needs the memory store (whose state travels in the checkpoint),
or the same ``path`` on shared storage.

Why SQLite: in the standard library (no dependency), one file, transactional;
figures against RocksDB in docs/features.md (benchmarks/bench_keyed_state.py).
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tensorstream.features.keyed.layout import empty_rows

log = logging.getLogger(__name__)

#: epochs whose undo log is kept (a restore may fall back this many checkpoints)
KEEP_EPOCHS = 8
_BATCH = 500  # keys per SELECT ... IN (...)
#: the smallest cache: one chunk's keys (stage.MAX_CHUNK) must fit, with room to spare
MIN_CACHE = 300


class DiskStore:
    """Keys -> rows in SQLite, with an in-memory cache; see the module docstring."""

    kind = "disk"

    def __init__(self, dtype: np.dtype, path: str | Path, cache_keys: int = 100_000, index_ttl: bool = False,
                 index_lru: bool = False) -> None:
        self.dtype = dtype
        self.path = Path(path)
        self.cache_keys = max(int(cache_keys), MIN_CACHE)
        self.index_ttl, self.index_lru = index_ttl, index_lru
        cap = min(1024, self.cache_keys)
        self.rows = empty_rows(dtype, cap)
        self.index: dict[bytes, int] = {}
        self.keys: list[bytes | None] = [None] * cap
        self.free: list[int] = list(range(cap - 1, -1, -1))
        self.pending: dict[bytes, bytes | None] = {}  # changed rows out of the cache; None: deleted
        self.dirty = np.zeros(cap, dtype=bool)
        self.n_keys = 0
        self.epoch = 0
        self.id = ""
        self._db: sqlite3.Connection | None = None

    # ----------------------------------------------------------------- database

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path / "state.sqlite", isolation_level=None)
            # 16 KiB pages (before the first table exists): rows up to ~4 KiB stay inside their b-tree
            # page; with 4 KiB pages a 2 KiB row spills into an overflow page (measured: 5.4 KB per
            # key instead of 2.4 at 1M keys of the example's features)
            db.execute("PRAGMA page_size=16384")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS kv(key BLOB PRIMARY KEY, row BLOB NOT NULL, seen INTEGER, "
                       "acc INTEGER) WITHOUT ROWID")
            db.execute("CREATE TABLE IF NOT EXISTS undo(epoch INTEGER, key BLOB, row BLOB, seen INTEGER, acc INTEGER)")
            db.execute("CREATE INDEX IF NOT EXISTS undo_epoch ON undo(epoch)")
            if self.index_ttl:
                db.execute("CREATE INDEX IF NOT EXISTS kv_seen ON kv(seen)")
            if self.index_lru:
                db.execute("CREATE INDEX IF NOT EXISTS kv_acc ON kv(acc)")
            meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
            if meta.get("row", str(self.dtype.descr)) != str(self.dtype.descr):
                raise ValueError(f"the disk store at {self.path} holds rows of another layout (the stateful "
                                 "features changed): use another features.state.path")
            if "id" not in meta:
                meta = {"id": uuid.uuid4().hex, "epoch": "0", "undo_from": "1", "row": str(self.dtype.descr)}
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
            self.id, self.epoch = meta["id"], int(meta["epoch"])
            self._db = db
        return self._db

    def _fresh(self) -> sqlite3.Connection:
        """The database, cleared once if no checkpoint was restored into this store."""
        if self._db is not None:
            return self._db
        db = self._connect()
        n = db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
        if n or self.epoch:
            log.warning("disk keyed store %s held %d keys (epoch %d) that no checkpoint restored: cleared",
                        self.path, n, self.epoch)
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM kv")
            db.execute("DELETE FROM undo")
            db.execute("UPDATE meta SET v = '0' WHERE k = 'epoch'")
            db.execute("UPDATE meta SET v = '1' WHERE k = 'undo_from'")
            db.execute("COMMIT")
            self.epoch = 0
        return db

    def _fetch(self, keys: list[bytes]) -> dict[bytes, bytes]:
        db = self._fresh()
        out: dict[bytes, bytes] = {}
        for a in range(0, len(keys), _BATCH):
            part = keys[a:a + _BATCH]
            q = f"SELECT key, row FROM kv WHERE key IN ({','.join('?' * len(part))})"
            out.update(db.execute(q, part).fetchall())
        return out

    # -------------------------------------------------------------------- cache

    def _evict_cache(self, need: int, keep: set[bytes]) -> None:
        """Free ``need`` slots (growing up to cache_keys first, then dropping the least recently seen)."""
        cap = len(self.rows)
        if len(self.free) < need and cap < self.cache_keys:
            new = min(self.cache_keys, max(cap * 2, cap + need))
            rows = empty_rows(self.dtype, new)
            rows[:cap] = self.rows
            self.rows = rows
            self.keys.extend([None] * (new - cap))
            self.dirty = np.concatenate([self.dirty, np.zeros(new - cap, dtype=bool)])
            self.free = list(range(new - 1, cap - 1, -1)) + self.free
        if len(self.free) >= need:
            return
        slots = np.array([s for k, s in self.index.items() if k not in keep], dtype=np.int64)
        m = min(len(slots), max(need - len(self.free), len(self.rows) // 10))
        victims = slots[np.argpartition(self.rows["acc"][slots], m - 1)[:m]] if m < len(slots) else slots
        for s in victims.tolist():
            key = self.keys[s]
            assert key is not None
            if self.dirty[s]:
                self.pending[key] = self.rows[s].tobytes()
            del self.index[key]
            self.keys[s] = None
            self.dirty[s] = False
            self.free.append(s)

    def lookup(self, keys: list[bytes]) -> np.ndarray:
        uniq = list(dict.fromkeys(keys))
        missing = [k for k in uniq if k not in self.index]
        if missing:
            self._evict_cache(len(missing), set(uniq))
            from_db = self._fetch([k for k in missing if k not in self.pending])
            for k in missing:
                slot = self.free.pop()
                if k in self.pending:
                    row = self.pending.pop(k)
                else:
                    row = from_db.get(k)
                if row is None:
                    self.rows[slot] = empty_rows(self.dtype, 1)[0]
                    self.n_keys += 1
                else:
                    self.rows[slot] = np.frombuffer(row, dtype=self.dtype)[0]
                self.index[k] = slot
                self.keys[slot] = k
        slots = np.fromiter(map(self.index.__getitem__, keys), dtype=np.int64, count=len(keys))
        self.dirty[slots] = True
        return slots

    def peek(self, keys: list[bytes]) -> np.ndarray:
        out = empty_rows(self.dtype, len(keys))
        from_db = self._fetch([k for k in keys if k not in self.index and k not in self.pending])
        for i, k in enumerate(keys):
            if k in self.index:
                out[i] = self.rows[self.index[k]]
            else:
                row = self.pending[k] if k in self.pending else from_db.get(k)
                if row is not None:
                    out[i] = np.frombuffer(row, dtype=self.dtype)[0]
        return out

    # -------------------------------------------------------------------- sweep

    def _in_memory(self, field: str) -> tuple[list[bytes], np.ndarray]:
        """Keys whose newest row is in memory (cache, then changed rows out of it), and ``field`` of each."""
        slots = np.array(list(self.index.values()), dtype=np.int64)
        keys = [self.keys[s] for s in slots.tolist()]
        vals = [self.rows[field][slots]]
        rows = [(k, r) for k, r in self.pending.items() if r is not None]
        keys += [k for k, _ in rows]  # type: ignore[misc]
        vals.append(np.array([np.frombuffer(r, dtype=self.dtype)[0][field] for _, r in rows], dtype=np.int64))
        return keys, np.concatenate(vals)  # type: ignore[return-value]

    def _drop(self, keys: list[bytes]) -> None:
        for k in keys:
            if k in self.index:
                s = self.index.pop(k)
                self.keys[s] = None
                self.dirty[s] = False
                self.free.append(s)
            self.pending[k] = None
        self.n_keys -= len(keys)

    def sweep(self, watermark: int, ttl: int | None, max_keys: int | None) -> tuple[int, int]:
        db = self._fresh()
        expired = evicted = 0
        if ttl is not None:
            limit = watermark - ttl
            keys, seen = self._in_memory("seen")
            mem = set(keys)
            gone = {k for k, v in self.pending.items() if v is None}
            old = [keys[i] for i in np.flatnonzero(seen < limit).tolist()]
            old += [k for (k,) in db.execute("SELECT key FROM kv WHERE seen < ?", (limit,))
                    if k not in mem and k not in gone]
            self._drop(old)
            expired = len(old)
        if max_keys is not None and self.n_keys > max_keys:
            excess = self.n_keys - max_keys
            keys, acc = self._in_memory("acc")
            mem = set(keys)
            gone = {k for k, v in self.pending.items() if v is None}
            cand = [(int(a), k) for a, k in zip(acc.tolist(), keys, strict=True)]
            found = 0
            for a, k in db.execute("SELECT acc, key FROM kv ORDER BY acc"):  # oldest first: stops early
                if k in mem or k in gone:
                    continue
                cand.append((a, k))
                found += 1
                if found >= excess:
                    break
            cand.sort()
            victims = [k for _, k in cand[:excess]]
            self._drop(victims)
            evicted = len(victims)
        return expired, evicted

    # -------------------------------------------------------------------- state

    def commit(self) -> dict[str, Any]:
        """Write every change since the last commit, with its undo log, as the next epoch."""
        db = self._fresh()
        writes = dict(self.pending)
        slots = np.flatnonzero(self.dirty)
        for s in slots.tolist():
            writes[self.keys[s]] = self.rows[s].tobytes()  # type: ignore[index]
        epoch = self.epoch + 1
        writes = dict(sorted(writes.items()))  # in key order: b-tree pages fill instead of splitting in half
        keys = list(writes)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO undo SELECT ?1, ?2, kv.row, kv.seen, kv.acc FROM (SELECT 1) "
                           "LEFT JOIN kv ON kv.key = ?2", [(epoch, k) for k in keys])
            up = [(k, r, *(int(x) for x in np.frombuffer(r, dtype=self.dtype)[["seen", "acc"]][0]))
                  for k, r in writes.items() if r is not None]
            db.executemany("INSERT INTO kv VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET row = excluded.row, "
                           "seen = excluded.seen, acc = excluded.acc", up)
            db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k, r in writes.items() if r is None])
            keep_from = max(1, epoch - KEEP_EPOCHS + 1)
            db.execute("DELETE FROM undo WHERE epoch < ?", (keep_from,))
            db.executemany("UPDATE meta SET v = ? WHERE k = ?", [(str(epoch), "epoch"), (str(keep_from), "undo_from")])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.epoch = epoch
        self.pending.clear()
        self.dirty[:] = False
        return {"store": self.kind, "id": self.id, "epoch": epoch, "path": str(self.path)}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}  # the rows are in the database: the checkpoint's meta names its epoch

    def load_state_dict(self, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        db = self._connect()
        want, have = int(meta.get("epoch", 0)), self.epoch
        if meta.get("id") not in (None, self.id):
            raise ValueError(f"the checkpoint's keyed state is in disk store {meta.get('id')} "
                             f"({meta.get('path')}); {self.path} holds store {self.id}")
        if have < want:
            raise ValueError(f"the disk keyed store {self.path} is at epoch {have}, behind the checkpoint's "
                             f"{want}: it was lost or replaced (restore it, or start another lineage)")
        undo_from = int(dict(db.execute("SELECT k, v FROM meta").fetchall())["undo_from"])
        if have > want and want + 1 < undo_from:
            raise ValueError(f"the disk keyed store {self.path} is at epoch {have}; its undo log reaches back "
                             f"to {undo_from - 1}, not to the checkpoint's {want}")
        if have > want:
            log.info("disk keyed store %s: rolling epochs %d..%d back to the checkpoint's %d", self.path,
                     want + 1, have, want)
        db.execute("BEGIN IMMEDIATE")
        for e in range(have, want, -1):  # newest first: each epoch's undo restores the one before it
            for key, row, seen, acc in db.execute("SELECT key, row, seen, acc FROM undo WHERE epoch = ?",
                                                  (e,)).fetchall():
                if row is None:
                    db.execute("DELETE FROM kv WHERE key = ?", (key,))
                else:
                    db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, row, seen, acc))
        db.execute("DELETE FROM undo WHERE epoch > ?", (want,))
        db.execute("UPDATE meta SET v = ? WHERE k = 'epoch'", (str(want),))
        db.execute("COMMIT")
        self.epoch = want
        self.index.clear()
        self.keys = [None] * len(self.rows)
        self.free = list(range(len(self.rows) - 1, -1, -1))
        self.pending.clear()
        self.dirty[:] = False
        self.n_keys = db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
