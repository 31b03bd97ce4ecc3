"""Stateful features: what they buy (accuracy) and what they cost (memory, checkpoints).

    python benchmarks/bench_keyed_state.py accuracy [--records 20000]
    python benchmarks/bench_keyed_state.py memory [--keys 1000000] [--store memory|disk] [--spec lean]
    python benchmarks/bench_keyed_state.py stores [--keys 1000000]   # SQLite vs RocksDB (rocksdict)
    python benchmarks/bench_keyed_state.py checkpoint [--keys 100000 1000000] [--spec lean]

``--spec``: the features of examples/keyed.yaml (2 KiB per key: a 64-event sliding
window, a 26-bucket hopping window, a HyperLogLog) or a lean set (one tumbling
window, two lags, two labels).

``accuracy``: prequential accuracy, in process (no broker), both frameworks, of
(a) examples/keyed.yaml on ``river:keyed.transactions`` with and without its
stateful features, and (b) on ``river:keyed.sticky`` (an autocorrelated label):
the "previous label of the key" baseline, the model without and with label history.

``memory``: N distinct keys through the example's feature stage (one record
each): the process's resident memory growth, the rows' bytes, the disk store's
file size. ``stores`` writes the same rows to SQLite and to RocksDB (needs
``rocksdict`` importable, e.g. ``pip install --target DIR rocksdict`` and
``PYTHONPATH=DIR``): the evidence behind the disk store's choice of SQLite.

``checkpoint``: the size of the learner state and the time to take it and
write it (CheckpointStore: safetensors + sha256 + fsync) at N keys; for the disk
store, the time of a checkpoint after 1,000 records (what it writes is what
changed, not the whole state).

Figures are for the machine it runs on; docs/features.md has ours.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tensorstream.examples import example_spec  # noqa: E402
from tensorstream.features import FeaturePipeline  # noqa: E402

BATCH = 4096


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _records(a: int, b: int) -> list[dict]:
    rng = np.random.default_rng(a)
    amounts = np.round(rng.lognormal(4, 1, b - a), 2).tolist()
    return [{"card": f"card-{i:09d}", "ts": 1_700_000_000_000 + i, "amount": amt, "merchant": f"m{i % 20}", "y": 0}
            for i, amt in zip(range(a, b), amounts, strict=True)]


#: a smaller feature set than the example's: one tumbling window, two lags, two labels
LEAN = {"numeric": ["amount"], "key": "card", "time": "ts", "lags": {"amount": 2}, "label_history": 2,
        "windows": [{"field": "amount", "type": "tumbling", "size": "1h", "aggs": ["count", "mean"]}]}


def _pipeline(store: str, path: Path | None = None, cache: int = 100_000, spec: str = "example") -> FeaturePipeline:
    from tensorstream.spec import FeatureSpec

    f = example_spec("keyed.yaml").features if spec == "example" else FeatureSpec.model_validate(LEAN)
    f = f.model_copy(update={"state": f.state.model_copy(update={"max_keys": None})})
    if store == "disk":
        from tensorstream.features.keyed.disk import DiskStore
        from tensorstream.features.keyed.layout import row_dtype

        store = DiskStore(row_dtype(f), path, cache_keys=cache, index_ttl=f.state.ttl is not None,
                          index_lru=f.state.max_keys is not None)  # as the learner makes it
        return FeaturePipeline(f, "y", label_width=2, keyed_store=store)
    return FeaturePipeline(f, "y", label_width=2)


def _fill(fp: FeaturePipeline, n: int, commit_every: int | None = None) -> float:
    t0 = time.perf_counter()
    for a in range(0, n, BATCH):
        fp.transform_parsed(fp.parse(_records(a, min(n, a + BATCH))), sequential=True)
        if commit_every and (a + BATCH) % commit_every < BATCH:
            fp.state_dict()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- memory


def memory(keys: int, store: str, spec: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="keyed-bench-"))
    try:
        before = _rss_mb()
        fp = _pipeline(store, tmp / "db", spec=spec)
        took = _fill(fp, keys, commit_every=100_000 if store == "disk" else None)
        if store == "disk":
            fp.state_dict()
        grown = _rss_mb() - before
        itemsize = fp.keyed.dtype.itemsize
        print(f"spec={spec} store={store} keys={keys:,} row={itemsize} B fill={took:.1f}s ({keys / took:,.0f} keys/s) "
              f"rss_growth={grown:,.0f} MiB ({grown * 2**20 / keys:,.0f} B/key)", end="")
        if store == "disk":
            size = sum(p.stat().st_size for p in (tmp / "db").iterdir())
            print(f" db={size / 2**20:,.0f} MiB ({size / keys:,.0f} B/key)")
        else:
            print(f" rows={keys * itemsize / 2**20:,.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stores(keys: int, spec: str) -> None:
    """The same N rows (real ones, from the feature stage) written to SQLite and to RocksDB:
    write time (batches of 100,000, each one transaction / write batch), size on disk, and
    100,000 random point reads."""
    import sqlite3

    from rocksdict import Options, Rdict, WriteBatch  # type: ignore[import-not-found]

    fp = _pipeline("memory", spec=spec)
    _fill(fp, keys)
    st = fp.keyed.store
    items = [(k, st.rows[s].tobytes()) for k, s in st.index.items()]
    del fp, st
    probe = [items[i][0] for i in np.random.default_rng(0).integers(0, len(items), 100_000)]
    tmp = Path(tempfile.mkdtemp(prefix="keyed-stores-"))
    try:
        db = sqlite3.connect(tmp / "s.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE kv(key BLOB PRIMARY KEY, row BLOB NOT NULL) WITHOUT ROWID")
        t0 = time.perf_counter()
        for a in range(0, len(items), 100_000):
            db.execute("BEGIN")
            db.executemany("INSERT INTO kv VALUES (?, ?)", items[a:a + 100_000])
            db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in probe:
            db.execute("SELECT row FROM kv WHERE key = ?", (k,)).fetchone()
        r = time.perf_counter() - t0
        db.close()
        size = sum(f.stat().st_size for f in tmp.glob("s.sqlite*"))
        print(f"spec={spec} sqlite    keys={keys:,} write={w:.1f}s read(100k)={r:.2f}s size={size / 2**20:,.0f} MiB "
              f"({size / keys:,.0f} B/key)")
        rd = Rdict(str(tmp / "rocks"), options=Options(raw_mode=True))
        t0 = time.perf_counter()
        for a in range(0, len(items), 100_000):
            wb = WriteBatch(raw_mode=True)
            for k, v in items[a:a + 100_000]:
                wb.put(k, v)
            rd.write(wb)
        rd.flush()
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in probe:
            rd.get(k)
        r = time.perf_counter() - t0
        rd.close()
        size = sum(f.stat().st_size for f in (tmp / "rocks").iterdir())
        print(f"spec={spec} rocksdict keys={keys:,} write={w:.1f}s read(100k)={r:.2f}s size={size / 2**20:,.0f} MiB "
              f"({size / keys:,.0f} B/key)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------- checkpoint


def checkpoint(counts: list[int], spec: str) -> None:
    from tensorstream.checkpoint import CheckpointStore

    for n in counts:
        tmp = Path(tempfile.mkdtemp(prefix="keyed-ckpt-"))
        try:
            fp = _pipeline("memory", spec=spec)
            _fill(fp, n)
            store = CheckpointStore(tmp / "ckpt", keep_last=1)
            t0 = time.perf_counter()
            state = fp.state_dict()
            t1 = time.perf_counter()
            store.save(state, offsets={("t", 0): n}, n_learned=n, backend="torch", spec_hash="x")
            t2 = time.perf_counter()
            size = sum(v.nbytes for v in state.values())
            print(f"spec={spec} memory store keys={n:,} state={size / 2**20:,.1f} MiB state_dict={1000 * (t1 - t0):,.0f} ms "
                  f"save={1000 * (t2 - t1):,.0f} ms")
            del state, fp
            fp = _pipeline("disk", tmp / "db", spec=spec)
            _fill(fp, n, commit_every=100_000)
            fp.state_dict()
            more = _records(n, n + 1000)
            fp.transform_parsed(fp.parse(more), sequential=True)
            t0 = time.perf_counter()
            state = fp.state_dict()
            t1 = time.perf_counter()
            print(f"spec={spec} disk store   keys={n:,} checkpoint after 1,000 records: commit={1000 * (t1 - t0):,.0f} ms, "
                  f"state={sum(v.nbytes for v in state.values()):,} B")
            fp.keyed.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- accuracy


def accuracy(records: int) -> None:
    import torch._dynamo  # noqa: F401  (import order: see tests/conftest.py)

    from tensorstream.backends import make_backend
    from tensorstream.data.datasets import open_source
    from tensorstream.learn import OnlineLearner
    from tensorstream.spec import PipelineSpec

    def prequential(spec, recs, backend):
        learner = OnlineLearner(spec, make_backend(backend))
        for a in range(0, len(recs), 32):
            learner.process(recs[a:a + 32])
        return learner.snapshot()["accuracy"]

    tx = list(open_source("river:keyed.transactions", limit=records))
    sticky = list(open_source("river:keyed.sticky", limit=records))
    prev: dict[str, int] = {}
    hits = 0
    for r in sticky:
        hits += prev.get(r["key"], 0) == r["y"]
        prev[r["key"]] = r["y"]
    print(f"keyed.sticky ({records:,} records): previous label of the key {hits / records:.4f}")
    for backend in ("torch", "tensorflow"):
        base = example_spec("keyed.yaml", backend=backend)
        plain = base.model_copy(update={"features": base.features.model_copy(
            update={"key": None, "windows": [], "lags": {}, "time_features": []})})
        print(f"keyed.transactions ({records:,} records) {backend}: with windows+lags "
              f"{prequential(base, tx, backend):.4f}, without {prequential(plain, tx, backend):.4f}")
        for hist in (0, 1, 3):
            f = {"numeric": ["x0", "x1", "x2"]}
            if hist:
                f.update(key="key", time="ts", label_history=hist)
            spec = PipelineSpec.model_validate({
                "source": {"topic": "t"}, "mode": "train", "backend": backend, "features": f,
                "label": {"field": "y", "classes": [0, 1]},
                "model": {"hidden": [32], "optimizer": {"lr": 0.005}, "threads": 1}})
            print(f"keyed.sticky {backend}: label_history={hist} {prequential(spec, sticky, backend):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--records", type=int, default=20_000)
    m = sub.add_parser("memory")
    m.add_argument("--keys", type=int, default=1_000_000)
    m.add_argument("--store", choices=["memory", "disk"], default="memory")
    m.add_argument("--spec", choices=["example", "lean"], default="example")
    s = sub.add_parser("stores")
    s.add_argument("--keys", type=int, default=1_000_000)
    s.add_argument("--spec", choices=["example", "lean"], default="lean")
    c = sub.add_parser("checkpoint")
    c.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    c.add_argument("--spec", choices=["example", "lean"], default="example")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.cmd == "accuracy":
        accuracy(args.records)
    elif args.cmd == "memory":
        memory(args.keys, args.store, args.spec)
    elif args.cmd == "stores":
        stores(args.keys, args.spec)
    else:
        checkpoint(args.keys, args.spec)


if __name__ == "__main__":
    main()
