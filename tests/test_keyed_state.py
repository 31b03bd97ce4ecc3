"""The per-key state's stores: the disk store (SQLite) gives the memory store's features, and
restores exactly the state of a checkpoint, rolling back what was committed after it."""

from __future__ import annotations

import numpy as np
import pytest

from tensorstream.features import FeaturePipeline
from tensorstream.features.keyed.disk import DiskStore
from tensorstream.features.keyed.layout import row_dtype
from tensorstream.spec import FeatureSpec

SPEC = FeatureSpec.model_validate({
    "numeric": ["x"], "key": "k", "time": "ts",
    "windows": [{"field": "x", "type": "sliding", "size": 400, "aggs": ["count", "mean", "last"]},
                {"field": "c", "type": "hopping", "size": 300, "hop": 100, "aggs": ["count", "distinct", "max"]}],
    "lags": {"x": 2}, "label_history": 2, "time_features": ["hour_of_day"],
    "state": {"ttl": 12000, "max_keys": 350, "sweep_every": 50, "allowed_lateness": 30},
})
SPEC_C = FeatureSpec.model_validate({**SPEC.model_dump(), "windows": [
    {"field": "x", "type": "sliding", "size": 400, "aggs": ["count", "mean", "last"]},
    {"field": "c", "type": "hopping", "size": 300, "hop": 100, "aggs": ["count", "distinct"]},
    {"field": "x", "type": "hopping", "size": 300, "hop": 100, "aggs": ["max"]}]})


def _stream(n, seed=0, keys=1000):
    rng = np.random.default_rng(seed)
    t = 10_000
    recs, labels = [], []
    for i in range(n):
        t += int(rng.integers(0, 20)) + (15_000 if i == n // 3 else 0)  # a pause: the quiet keys expire
        recs.append({"k": f"k{int(rng.integers(keys) * rng.random())}", "ts": t - int(rng.integers(0, 40)) * (rng.random() < 0.1),
                     "x": float(rng.normal()), "c": int(rng.integers(6))})
        labels.append(float(rng.integers(2)) if rng.random() < 0.8 else np.nan)
    return recs, np.array(labels)


def _pipeline(tmp_path=None, name="db", cache=1024):
    spec = SPEC_C
    store = None if tmp_path is None else DiskStore(row_dtype(spec), tmp_path / name, cache_keys=cache,
                                                    index_ttl=True, index_lru=True)
    return FeaturePipeline(spec, "y", label_width=2, keyed_store=store)


def _feed(fp, recs, labels, batch=37):
    out = []
    for a in range(0, len(recs), batch):
        out.append(fp.transform_parsed(fp.parse(recs[a:a + batch]), labels=labels[a:a + batch], sequential=True))
    return np.concatenate(out)


def test_the_disk_store_gives_the_memory_stores_features(tmp_path):
    recs, labels = _stream(3000)
    mem = _pipeline()
    disk = _pipeline(tmp_path, cache=300)  # a cache far smaller than the key space: rows go to and fro
    a, b = _feed(mem, recs[:1500], labels[:1500]), _feed(disk, recs[:1500], labels[:1500])
    disk.state_dict()  # a checkpoint in the middle
    a2, b2 = _feed(mem, recs[1500:], labels[1500:]), _feed(disk, recs[1500:], labels[1500:])
    np.testing.assert_array_equal(np.concatenate([a, a2]), np.concatenate([b, b2]))
    assert mem.keyed.snapshot() == disk.keyed.snapshot()
    assert mem.keyed.counters["keys_evicted"] > 0 and mem.keyed.counters["keys_expired"] > 0


def test_a_restore_rolls_the_database_back_to_the_checkpoint(tmp_path):
    recs, labels = _stream(2400, seed=1)
    parts = [slice(0, 800), slice(800, 1600), slice(1600, 2400)]
    disk = _pipeline(tmp_path)
    _feed(disk, recs[parts[0]], labels[parts[0]])
    ckpt = {k: v.copy() for k, v in disk.state_dict().items()}  # epoch 1: the checkpoint that landed
    _feed(disk, recs[parts[1]], labels[parts[1]])
    disk.state_dict()  # epoch 2: committed to the database, but its checkpoint never landed (crash)
    _feed(disk, recs[parts[2]], labels[parts[2]])  # uncommitted work, lost with the process
    disk.keyed.close()

    again = _pipeline(tmp_path)
    again.load_state_dict(ckpt)
    assert again.keyed.store.epoch == 1
    ref = _pipeline()
    _feed(ref, recs[parts[0]], labels[parts[0]])
    rest = slice(800, 2400)
    np.testing.assert_array_equal(_feed(again, recs[rest], labels[rest]), _feed(ref, recs[rest], labels[rest]))


def test_a_store_behind_the_checkpoint_or_another_store_is_refused(tmp_path):
    recs, labels = _stream(300, seed=2)
    disk = _pipeline(tmp_path)
    _feed(disk, recs, labels)
    state = disk.state_dict()
    other = _pipeline(tmp_path, name="other")
    with pytest.raises(ValueError, match="disk store"):
        other.load_state_dict(state)
    disk.keyed.close()
    (tmp_path / "db" / "state.sqlite").unlink()
    for extra in ("state.sqlite-wal", "state.sqlite-shm"):
        (tmp_path / "db" / extra).unlink(missing_ok=True)
    lost = _pipeline(tmp_path)
    with pytest.raises(ValueError):
        lost.load_state_dict(state)


def test_starting_without_a_checkpoint_clears_an_old_database(tmp_path):
    recs, labels = _stream(200, seed=3)
    first = _pipeline(tmp_path)
    _feed(first, recs, labels)
    first.state_dict()
    first.keyed.close()
    second = _pipeline(tmp_path)  # no checkpoint restored: a new lineage
    np.testing.assert_array_equal(_feed(second, recs, labels), _feed(_pipeline(), recs, labels))


def test_the_memory_checkpoint_holds_every_key_compactly():
    recs, labels = _stream(2000, seed=4, keys=10_000)
    fp = _pipeline()
    _feed(fp, recs, labels)
    state = fp.state_dict()
    n = fp.keyed.store.n_keys
    assert state["keyed/store/rows"].size == n * fp.keyed.dtype.itemsize
    assert len(state["keyed/store/key_ends"]) == n
