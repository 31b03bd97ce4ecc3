"""Crash consistency of stateful features: SIGKILL the trainer at random points (mid-batch,
mid-checkpoint, mid-commit, between the disk store's commit and the checkpoint's), restart it
until the stream is consumed; the final checkpoint's per-key state must equal an uninterrupted
run's, as must the weights (the approach of test_crash_training.py).

Seeded; 5 kills per case: the memory store (torch) and the disk store (tensorflow)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from procutil import kill_at_random_points, write_spec
from tensorstream.checkpoint import CheckpointStore
from tensorstream.data.produce import produce_records
from tensorstream.examples import example_spec
from tensorstream.features.keyed.layout import row_dtype
from tensorstream.features.keyed.store import unpack_keys
from tensorstream.features.state import from_json_array
from tensorstream.pipeline import Pipeline

N_RECORDS = 12_000
KILLS = 5


def _spec(backend, store, topic, state_dir, name):
    base = example_spec("keyed.yaml", backend=backend)
    state = base.features.state.model_copy(update={"store": store, "max_keys": 150, "sweep_every": 500})
    return base.model_copy(update={
        "name": name, "mode": "train", "sink": None, "state_dir": state_dir,
        "source": base.source.model_copy(update={"topic": topic}),
        "features": base.features.model_copy(update={"state": state, "label_history": 2}),
        "batch": base.batch.model_copy(update={"max_size": 8, "max_wait_ms": 5000}),
        "checkpoint": base.checkpoint.model_copy(update={"every_records": 200, "every_seconds": 60}),
    })



def _keyed_rows(spec, state) -> dict[bytes, np.void]:
    """key -> its row, from a checkpoint's state (memory store) or the database it names (disk)."""
    dtype = row_dtype(spec.features)
    meta = from_json_array(state["features/keyed/meta"])
    if meta["store"] == "memory":
        keys = unpack_keys(state["features/keyed/store/keys"], state["features/keyed/store/key_ends"])
        rows = state["features/keyed/store/rows"].view(dtype)
        return dict(zip(keys, rows, strict=True))
    db = sqlite3.connect(Path(meta["path"]) / "state.sqlite")
    try:
        epoch = int(dict(db.execute("SELECT k, v FROM meta").fetchall())["epoch"])
        assert epoch == meta["epoch"], "the database holds exactly the checkpoint's epoch"
        return {k: np.frombuffer(r, dtype=dtype)[0] for k, r in db.execute("SELECT key, row FROM kv")}
    finally:
        db.close()


@pytest.mark.parametrize("backend, store", [("torch", "memory"), ("tensorflow", "disk")])
def test_sigkill_at_random_points_keeps_the_keyed_state_exact(backend, store, broker, kafka_config, topic_factory,
                                                             tmp_path):
    rng = random.Random(16 if store == "memory" else 61)
    topic = topic_factory(1, prefix="keyed-crash")
    produce_records(kafka_config, "river:keyed.transactions?seed=5", topic, limit=N_RECORDS)
    spec = _spec(backend, store, topic, str(tmp_path / "state"), f"kc-{backend}-{topic[-6:]}")
    spec_path = write_spec(spec, tmp_path / "spec.yaml")
    log = tmp_path / "trainer.log"
    url = spec.checkpoint_url
    kills = kill_at_random_points(spec_path, broker.bootstrap_servers, url, kills=KILLS, rng=rng, log=log,
                                  wait_s=120, finish_s=300)
    assert kills == KILLS, f"only {kills} kills happened before the stream ended: raise N_RECORDS"

    state, info = CheckpointStore(url).latest()
    assert info.n_learned == N_RECORDS and info.offsets == {(topic, 0): N_RECORDS}

    ref_spec = _spec(backend, store, topic, str(tmp_path / "ref"), f"ref-{backend}-{topic[-6:]}")
    Pipeline(ref_spec, kafka_config).run(until_end=True, timeout=300)
    ref_state, ref_info = CheckpointStore(ref_spec.checkpoint_url).latest()
    assert ref_info.n_learned == N_RECORDS

    got, want = _keyed_rows(spec, state), _keyed_rows(ref_spec, ref_state)
    assert sorted(got) == sorted(want) and len(want) >= 100
    for key, row in want.items():
        for name in row.dtype.names:
            np.testing.assert_allclose(got[key][name], row[name], rtol=1e-9, err_msg=f"{key!r} {name}")
    meta, ref_meta = (from_json_array(s["features/keyed/meta"]) for s in (state, ref_state))
    assert (meta["watermark"], meta["n_obs"], meta["counters"]) == \
        (ref_meta["watermark"], ref_meta["n_obs"], ref_meta["counters"])
    assert meta["counters"]["keys_evicted"] > 0
    for k in ("features/keyed/scaler/count", "features/keyed/scaler/mean"):
        np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-9, err_msg=k)
    weights = [k for k in ref_state if k.startswith("backend/model/")]
    assert weights
    for k in weights:
        np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-5, atol=1e-6, err_msg=k)
