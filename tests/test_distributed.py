"""Data-parallel online training (pipeline/distributed.py) with the frameworks' own engines.

The integration tests run the ranks as real processes (``tensorstream run`` with
``TENSORSTREAM_RANK``/``WORLD_SIZE``) on loopback against the embedded broker:
torch.distributed (gloo, DistributedDataParallel) and tf.distribute
(MultiWorkerMirroredStrategy over gRPC). The unit tests drive the framework-free
coordination with an in-process collective (one thread per rank).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from procutil import start_run, write_spec
from tensorstream.checkpoint import CheckpointStore
from tensorstream.data.datasets import open_source
from tensorstream.examples import example_spec
from tensorstream.features.transform import FeaturePipeline
from tensorstream.kafka import KafkaAdmin, KafkaSink
from tensorstream.pipeline import Pipeline
from tensorstream.pipeline.distributed import (
    DistributedError,
    SyncedFeatures,
    allgather_bytes,
    free_ports,
    gather_rows,
    owned_partitions,
    resolve,
)
from tensorstream.spec import FeatureSpec, SpecError, parse_spec

N_RECORDS = 2000
#: Agrawal (one-hot categoricals: the ranks' vocabularies must agree), classification function 0 -> 2 halfway
SOURCE = "river:drift.agrawal?position=1000"


# --------------------------------------------------------------------------- helpers
class _ThreadCollective:
    """W ranks as threads of this process: all_reduce = deposit, meet, sum, meet."""

    def __init__(self, rank: int, world_size: int, shared: dict) -> None:
        self.rank, self.world_size, self.train_steps = rank, world_size, 0
        self._shared = shared

    def all_reduce(self, a: np.ndarray) -> np.ndarray:
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        slots[self.rank] = np.array(a, copy=True)
        barrier.wait()
        out = np.sum(np.stack(slots), axis=0).astype(np.asarray(a).dtype)
        barrier.wait()
        return out


def _on_ranks(world_size: int, fn):
    """Run ``fn(collective)`` on ``world_size`` thread-ranks; their results in rank order."""
    shared = {"slots": [None] * world_size, "barrier": threading.Barrier(world_size, timeout=30)}
    results: list = [None] * world_size
    errors: list = []

    def body(r: int) -> None:
        try:
            results[r] = fn(_ThreadCollective(r, world_size, shared))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def _spec(backend: str, topic: str, state_dir: Path, name: str, batch: int = 8):
    base = example_spec("agrawal_drift.yaml", backend=backend)  # one-hot categoricals: vocabularies must agree
    return base.model_copy(update={
        "name": name, "mode": "train", "sink": None, "state_dir": str(state_dir),
        "source": base.source.model_copy(update={"topic": topic}),
        # Full micro-batches (a batch waits to fill, or closes at the end of the data), so
        # 2 ranks x 8 records learn from the same union-batch size as 1 rank x 16.
        "batch": base.batch.model_copy(update={"max_size": batch, "max_wait_ms": 3000}),
        "checkpoint": base.checkpoint.model_copy(update={"every_records": 700, "every_seconds": 600}),
        # Data-parallel ranks learn mini-batches whatever learn.learning says: so must the one-rank reference.
        "learn": base.learn.model_copy(update={"learning": "mini_batch"}),
    })


def _records(n: int, skip: int = 0) -> list[dict]:
    return list(open_source(SOURCE, skip + n))[skip:]


def _produce(kafka_config, topic: str, records: list[dict], *, partition=None, start: int = 0,
             rate: float = 0.0) -> None:
    """Records keyed ``k<i>`` (spread over the partitions by the key hash), or to ``partition(i)``."""
    with KafkaSink(kafka_config) as sink:
        t0 = time.monotonic()
        for i, rec in enumerate(records, start):
            if rate:
                time.sleep(max(0.0, t0 + (i - start) / rate - time.monotonic()))
            sink.produce(topic, orjson.dumps(rec), key=f"k{i}".encode(),
                         partition=None if partition is None else partition(i))
        sink.flush()


def _union_order(records: list[dict], batch: int, ranks: int) -> list[dict]:
    """The records in the order one rank learns the ranks' union batches: per step, rank 0's
    ``batch`` records, then rank 1's... (record i on partition i % ranks, rank r reads partition r)."""
    parts = [records[r::ranks] for r in range(ranks)]
    out = []
    for start in range(0, max(len(p) for p in parts), batch):
        for p in parts:
            out += p[start:start + batch]
    return out


def _start_ranks(spec_path: Path, bootstrap: str, world_size: int, log: Path, *args: str):
    ports = free_ports(world_size + 1)
    env = {"TENSORSTREAM_WORLD_SIZE": str(world_size), "TENSORSTREAM_MASTER_PORT": str(ports[0]),
           "TENSORSTREAM_WORKERS": ",".join(f"127.0.0.1:{p}" for p in ports[1:])}
    return [start_run(spec_path, bootstrap, *args, env={**env, "TENSORSTREAM_RANK": str(r)},
                      log=log.with_suffix(f".rank{r}.log")) for r in range(world_size)]


def _wait_all(procs, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for r, p in enumerate(procs):
        try:
            code = p.wait(max(1.0, deadline - time.monotonic()))
        except Exception:
            code = None
        if code != 0:
            tails = "\n".join(f"--- rank {i}:\n" + log.with_suffix(f".rank{i}.log").read_text()[-2500:]
                              for i in range(len(procs)))
            raise AssertionError(f"rank {r} exited with {code}\n{tails}")


# --------------------------------------------------------------------------- unit: coordination
def test_partitions_are_split_by_rank():
    assert owned_partitions(6, 0, 2) == [0, 2, 4]
    assert owned_partitions(6, 1, 2) == [1, 3, 5]
    assert owned_partitions(2, 2, 3) == []  # more ranks than partitions: rank 2 only joins the steps
    split = [owned_partitions(7, r, 3) for r in range(3)]
    assert sorted(p for s in split for p in s) == list(range(7))


def _train_spec(**extra):
    return parse_spec({"name": "d", "mode": "train", "source": {"topic": "t"}, "features": {"numeric": ["*"]},
                       "label": {"field": "y", "classes": [0, 1]}, **extra})


def test_rank_and_world_size_come_from_env_or_spec():
    spec = _train_spec()
    assert resolve(spec, {}) is None
    assert resolve(spec, {"TENSORSTREAM_WORLD_SIZE": "1"}) is None
    ctx = resolve(spec, {"TENSORSTREAM_WORLD_SIZE": "3", "TENSORSTREAM_RANK": "2", "TENSORSTREAM_MASTER_PORT": "4000"})
    assert (ctx.engine, ctx.rank, ctx.world_size, ctx.master_port) == ("torch", 2, 3, 4000)
    # torchrun's variables
    ctx = resolve(spec, {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29999"})
    assert (ctx.rank, ctx.world_size, ctx.master_addr, ctx.master_port) == (1, 2, "10.0.0.1", 29999)
    # TENSORSTREAM_* wins over the spec, the spec over the launchers' conventions
    spec2 = _train_spec(distributed={"world_size": 2, "master_port": 1234})
    ctx = resolve(spec2, {"TENSORSTREAM_RANK": "1", "RANK": "0", "MASTER_PORT": "9"})
    assert (ctx.rank, ctx.world_size, ctx.master_port) == (1, 2, 1234)
    # tensorflow: the cluster from TF_CONFIG
    tf_spec = _train_spec(backend="tensorflow")
    tf_config = {"cluster": {"worker": ["h0:2222", "h1:2222"]}, "task": {"type": "worker", "index": 1}}
    ctx = resolve(tf_spec, {"TF_CONFIG": orjson.dumps(tf_config).decode()})
    assert (ctx.engine, ctx.backend_name, ctx.rank, ctx.world_size, ctx.workers) == (
        "tensorflow", "tensorflow-multiworker", 1, 2, ("h0:2222", "h1:2222"))
    assert resolve(_train_spec(distributed={"engine": "none"}), {"TENSORSTREAM_WORLD_SIZE": "4"}) is None


def test_distributed_specs_that_cannot_work_are_refused():
    with pytest.raises(SpecError, match="distributed.engine 'tensorflow' cannot train a torch model"):
        _train_spec(distributed={"engine": "tensorflow"})
    with pytest.raises(SpecError, match="rank 2 is not below world_size 2"):
        _train_spec(distributed={"world_size": 2, "rank": 2})
    with pytest.raises(DistributedError, match="rank 5 is outside world size 2"):
        resolve(_train_spec(), {"TENSORSTREAM_WORLD_SIZE": "2", "TENSORSTREAM_RANK": "5"})
    growing = parse_spec({"name": "d", "mode": "train", "source": {"topic": "t"}, "features": {"numeric": ["*"]},
                          "label": {"field": "y"}})
    with pytest.raises(DistributedError, match="fixed class set"):
        resolve(growing, {"TENSORSTREAM_WORLD_SIZE": "2"})


def test_allgather_of_bytes_through_all_reduce():
    payloads = [b"", b"rank one says hello", bytes(range(256)) * 3]
    out = _on_ranks(3, lambda c: allgather_bytes(c, payloads[c.rank]))
    assert out == [payloads] * 3
    assert _on_ranks(2, lambda c: allgather_bytes(c, b"")) == [[b"", b""]] * 2
    for capacity in (16, 4096):  # one round when every payload fits, two when one does not
        assert _on_ranks(3, lambda c: allgather_bytes(c, payloads[c.rank], capacity)) == [payloads] * 3
    rows = _on_ranks(2, lambda c: gather_rows(c, np.array([c.rank + 1, -7], dtype=np.int64)))
    assert rows[0].tolist() == rows[1].tolist() == [[1, -7], [2, -7]]


def test_feature_state_learns_from_the_union_batch_on_every_rank():
    spec = FeatureSpec(numeric=["*"], categorical=["c"], max_categories=3)
    batches = [
        [{"a": 1.0, "b": 2, "c": "x", "y": 0}, {"a": 3.0, "b": 0, "c": "y", "y": 1}],
        [],  # rank 1 has nothing this step: it still learns the layout and the statistics
        [{"a": 5.0, "b": 1, "c": "z", "y": 1}, {"a": 2.0, "b": 1, "c": "x", "y": 0},
         {"a": 0.0, "b": 4, "c": "w", "y": 1}],
    ]

    def rank(coll):
        fp = SyncedFeatures(FeaturePipeline(spec, label_field="y"), coll)
        parsed = fp.parse(batches[coll.rank])
        X = fp.transform_parsed(parsed)
        return fp.inner.state_dict(), X

    results = _on_ranks(3, rank)
    ref = FeaturePipeline(spec, label_field="y")
    X_ref, _, _ = ref.transform_batch([r for b in batches for r in b])  # rank order = union order
    ref_state = ref.state_dict()
    for state, _ in results:
        assert state["vocab"].tobytes() == ref_state["vocab"].tobytes()  # x, y, z; w overflows
        assert state["layout"].tobytes() == ref_state["layout"].tobytes()
        for k in ("scaler/count", "scaler/mean", "scaler/m2"):
            np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-12, err_msg=k)
    np.testing.assert_allclose(np.concatenate([x for _, x in results]), X_ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- integration: real ranks
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_two_ranks_train_like_one_and_checkpoint_for_any_world_size(backend, broker, kafka_config, topic_factory,
                                                                     tmp_path):
    topic = topic_factory(2, prefix=f"dist-{backend[:2]}")
    _produce(kafka_config, topic, _records(N_RECORDS), partition=lambda i: i % 2)  # key k<i> -> partition i % 2
    stream = topic_factory(1, prefix=f"ref-{backend[:2]}")
    _produce(kafka_config, stream, _union_order(_records(N_RECORDS), 8, 2))
    ends = KafkaAdmin(kafka_config).end_offsets(topic)
    assert all(v > N_RECORDS // 4 for v in ends.values()), ends

    spec = _spec(backend, topic, tmp_path / "state", f"dist-{backend}-{topic[-6:]}")
    log = tmp_path / "ranks"
    procs = _start_ranks(write_spec(spec, tmp_path / "spec.yaml"), kafka_config.bootstrap_servers, 2, log,
                         "--until-end", "--timeout", "240")
    # Meanwhile, the reference: one rank learning the same union batches (16 = 2 x 8, rank 0's rows
    # first) from a one-partition topic. (One rank reading the 2 partitions would interleave them by
    # fetch timing; and the learner's accuracy on this stream moves by ~2 points when records are only
    # reordered within batches, as the one-hot slots are numbered in first-seen order.)
    ref = _spec(backend, stream, tmp_path / "ref", f"ref-{backend}-{topic[-6:]}", batch=16)
    one = Pipeline(ref, kafka_config).run(until_end=True, timeout=240)
    _wait_all(procs, log, timeout=300)

    store = CheckpointStore(spec.checkpoint_url)
    state, info = store.latest()
    assert info.offsets == ends, "rank 0's checkpoint holds both ranks' partitions, read to the end"
    assert info.n_learned == N_RECORDS and int(state["learner/n_learned"][0]) == N_RECORDS
    assert info.extra["distributed"] == {"engine": backend, "world_size": 2}
    assert len(store.list()) >= 2, "intermediate checkpoints too (every 700 records)"
    two_acc = info.metrics["accuracy"]
    assert int(from_meta(state)["n_scored"]) == N_RECORDS
    assert one.metrics["n_learned"] == N_RECORDS
    print(f"{backend}: prequential accuracy 2 ranks {two_acc:.4f}, 1 rank {one.metrics['accuracy']:.4f}")
    assert abs(two_acc - one.metrics["accuracy"]) <= 0.01
    # ... because it is the same training: the update of each step equals learning the union batch.
    _, ref_info = CheckpointStore(ref.checkpoint_url).latest()
    ref_state = CheckpointStore(ref.checkpoint_url).load(ref_info.id)[0]
    weights = [k for k in ref_state if k.startswith("backend/model/")]
    assert weights
    for k in weights:
        np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-3, atol=1e-4, err_msg=k)
    assert state["features/vocab"].tobytes() == ref_state["features/vocab"].tobytes()
    np.testing.assert_allclose(state["features/scaler/mean"], ref_state["features/scaler/mean"], rtol=1e-9)

    # The 2-rank checkpoint restores into one rank (world size 1: all partitions, from its offsets),
    # which learns only what was produced since.
    more = 200
    _produce(kafka_config, topic, _records(more, skip=N_RECORDS), start=N_RECORDS)
    new_ends = KafkaAdmin(kafka_config).end_offsets(topic)
    single = Pipeline(spec, kafka_config)
    assert single.distributed is None and single.last_checkpoint == info.id
    res = single.run(until_end=True, timeout=120)
    assert res.records == more, "nothing learned twice, nothing skipped"
    state2, info2 = store.latest()
    assert info2.parent == info.id
    assert info2.offsets == new_ends
    assert info2.n_learned == N_RECORDS + more
    assert res.metrics["n_scored"] == N_RECORDS + more  # the job's metrics carried on


def from_meta(state) -> dict:
    from tensorstream.features.state import from_json_array

    return from_json_array(state["metrics/meta"])


def test_uneven_partition_rates_neither_hang_nor_learn_twice(broker, kafka_config, topic_factory, tmp_path):
    """Partition 0 holds 1700 records from the start; partition 1 trickles 100 in while the job
    runs (its rank mostly joins steps with zero rows), and is idle before and after. The ranks
    come from ``tensorstream run --ranks 2``."""
    topic = topic_factory(2, prefix="dist-uneven")
    busy, slow = 1700, 100
    recs = _records(busy + slow)
    _produce(kafka_config, topic, recs[:busy], partition=lambda i: 0)
    spec = _spec("torch", topic, tmp_path / "state", f"uneven-{topic[-6:]}")
    log = tmp_path / "ranks.log"
    t0 = time.monotonic()
    job = start_run(write_spec(spec, tmp_path / "spec.yaml"), kafka_config.bootstrap_servers, "--ranks", "2",
                    "--max-records", str(busy + slow), "--timeout", "200", "--result-json",
                    str(tmp_path / "result.json"), log=log)
    _produce(kafka_config, topic, recs[busy:], partition=lambda i: 1, start=busy, rate=40)  # ~2.5 s
    assert job.wait(240) == 0, log.read_text()[-4000:]
    result = orjson.loads((tmp_path / "result.json").read_bytes())  # rank 0's: the job's totals
    assert result["records"] == busy + slow and result["metrics"]["n_learned"] == busy + slow
    state, info = CheckpointStore(spec.checkpoint_url).latest()
    assert info.offsets == {(topic, 0): busy, (topic, 1): slow}
    assert info.n_learned == busy + slow, "every record learned exactly once"
    assert int(from_meta(state)["n_scored"]) == busy + slow
    print(f"uneven: {busy}+{slow} records on 2 ranks in {time.monotonic() - t0:.1f}s (processes included)")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """The in-process pipelines here are single-rank, whatever the environment says."""
    for var in ("TENSORSTREAM_WORLD_SIZE", "TENSORSTREAM_RANK", "WORLD_SIZE", "RANK", "TF_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
