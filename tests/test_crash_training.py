"""Crash consistency of online training: SIGKILL the trainer at random points, restart it
until the stream is consumed; the persisted lineage must have learned every record
exactly once, and equal an uninterrupted run.

Seeded: 10 kills per backend (20 across the suite). The stream is Agrawal (categorical
one-hot features, so vocabulary state is checkpointed too), long enough that the
trainer is always mid-stream when it is killed.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from procutil import kill_at_random_points, write_spec
from tensorstream.checkpoint import CheckpointStore
from tensorstream.examples import example_spec
from tensorstream.pipeline import Pipeline
from tensorstream.data.produce import produce_records

N_RECORDS = 16_000
KILLS = 10


def _spec(backend: str, topic: str, state_dir: str, name: str):
    base = example_spec("agrawal_drift.yaml", backend=backend)
    return base.model_copy(update={
        "name": name, "mode": "train", "sink": None, "state_dir": state_dir,
        "source": base.source.model_copy(update={"topic": topic}),
        # Fixed micro-batches (a batch waits up to 5 s to fill, or closes at the end
        # of the data): the same records form the same batches in every run.
        "batch": base.batch.model_copy(update={"max_size": 8, "max_wait_ms": 5000}),
        "checkpoint": base.checkpoint.model_copy(update={"every_records": 200, "every_seconds": 60}),
        "model": base.model.model_copy(update={"threads": 1}),
    })



@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_sigkill_at_random_points_learns_every_record_exactly_once(backend, broker, kafka_config, topic_factory,
                                                                    tmp_path):
    rng = random.Random(1234 if backend == "torch" else 4321)
    topic = topic_factory(1, prefix="crash")
    produce_records(kafka_config, "river:drift.agrawal", topic, limit=N_RECORDS)

    spec = _spec(backend, topic, str(tmp_path / "state"), f"crash-{backend}-{topic[-6:]}")
    spec_path = write_spec(spec, tmp_path / "spec.yaml")
    log = tmp_path / "trainer.log"
    url = spec.checkpoint_url
    kills = kill_at_random_points(spec_path, broker.bootstrap_servers, url, kills=KILLS, rng=rng, log=log,
                                  wait_s=90, finish_s=180)
    assert kills == KILLS, f"only {kills} kills happened before the stream ended: raise N_RECORDS"

    state, info = CheckpointStore(url).latest()
    assert info.n_learned == N_RECORDS, "every record learned exactly once in the persisted lineage"
    assert info.offsets == {(topic, 0): N_RECORDS}
    assert int(state["learner/n_learned"][0]) == N_RECORDS

    # The same records, uninterrupted, in this process.
    ref_spec = _spec(backend, topic, str(tmp_path / "ref"), f"ref-{backend}-{topic[-6:]}")
    Pipeline(ref_spec, kafka_config).run(until_end=True, timeout=180)
    ref_state, ref_info = CheckpointStore(ref_spec.checkpoint_url).latest()
    assert ref_info.n_learned == N_RECORDS
    weights = [k for k in ref_state if k.startswith("backend/model/")]
    assert weights
    for k in weights:
        np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in ("features/scaler/count", "features/scaler/mean", "features/vocab"):
        np.testing.assert_array_equal(state[k], ref_state[k], err_msg=k)
