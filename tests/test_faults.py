"""Fault injection at every step of the commit order, against the real broker.

A fault is injected in turn at the flush (a delivery fails), the persist (the
checkpoint store fails), the commit (the broker refuses), the processing of a
batch (an exception: the close/revoke path must not commit), and a rebalance's
revoke (its flush fails). Then the pipeline is restarted, without faults, to
the end of the stream:

- training: the set of records the persisted model learned (the learner keeps
  the ids it learned in its own checkpointed state) equals the source, each
  record exactly once;
- inference: every record has a prediction (at-least-once, no gap) and
  duplicates only come from the window after the last commit.

Also: a rebalance while a resumed trainer runs (a member joins and leaves), the
broker paused longer than the session timeout, huge bad records, and numbers
beyond float32.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import threading
import time

import numpy as np
import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

import tensorstream.pipeline.runner as runner
from kafkautil import drain
from tensorstream.checkpoint import CheckpointStore
from tensorstream.kafka import DeliveryError, FailedDelivery, KafkaAdmin, KafkaConfig, KafkaSink, KafkaSource
from tensorstream.learn import OnlineLearner
from tensorstream.pipeline import Pipeline, PipelineError
from tensorstream.spec import PipelineSpec

N = 1200
PARTITIONS = 2


class RecordingLearner(OnlineLearner):
    """An OnlineLearner that keeps the ids of the records it learned in its own (checkpointed) state."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.learned_ids: list[int] = []
        self.fail_at_batch: int | None = None
        self.batches = 0

    def process(self, records, train=True, **kw):
        self.batches += 1
        if self.fail_at_batch is not None and self.batches == self.fail_at_batch:
            raise RuntimeError("injected: the learner crashed mid-batch")
        out = super().process(records, train, **kw)
        if train:
            skip = {b.index for b in out.bad} | set(out.unlabelled)
            self.learned_ids += [r["id"] for i, r in enumerate(records) if i not in skip]
        return out

    def state_dict(self):
        state = super().state_dict()
        state["test/learned"] = np.array(self.learned_ids, dtype=np.int64)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.learned_ids = [int(v) for v in state.get("test/learned", [])]


@pytest.fixture(autouse=True)
def _recording(monkeypatch):
    monkeypatch.setattr(runner, "OnlineLearner", RecordingLearner)


def _value(i: int) -> dict:
    x1, x2 = math.sin(i * 0.37), math.cos(i * 0.11)
    return {"id": i, "x1": x1, "x2": x2, "y": int(x1 + 0.5 * x2 > 0)}


def _produce(cfg: KafkaConfig, topic: str, ids, rate: float | None = None, extra: dict | None = None) -> None:
    with KafkaSink(cfg) as sink:
        for n, i in enumerate(ids):
            sink.produce(topic, orjson.dumps({**_value(i), **(extra or {})}), key=str(i).encode(),
                         partition=i % PARTITIONS)
            if rate and n % 20 == 19:
                sink.flush()
                time.sleep(20 / rate)
        sink.flush()


def _spec(topic: str, name: str, tmp_path, mode: str = "train+infer", **update) -> PipelineSpec:
    data = {
        "name": name, "mode": mode, "state_dir": str(tmp_path / "state"),
        "source": {"topic": topic},
        "features": {"numeric": ["x1", "x2"]},
        "label": {"field": "y", "classes": [0, 1]},
        "model": {"kind": "linear", "threads": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
        "batch": {"max_size": 16, "max_wait_ms": 20},
        "checkpoint": {"every_records": 100, "every_seconds": 1},
        "dead_letter": {"max_rate": 1.0},
    }
    if mode != "train":
        data["sink"] = {"topic": topic + ".pred"}
    data.update(update)
    return PipelineSpec.model_validate(data)


def _learned(spec: PipelineSpec) -> list[int]:
    state, info = CheckpointStore(spec.checkpoint_url).latest()
    ids = sorted(int(v) for v in state["test/learned"])
    assert info.n_learned == len(ids)
    return ids


def _committed(cfg, spec, topic, partitions: int = PARTITIONS) -> dict:
    """The group's committed offsets (read without joining the group)."""
    from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

    c = Consumer({**cfg.consumer_settings(), "group.id": spec.group_id, "enable.auto.commit": False})
    try:
        res = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {(r.topic, r.partition): (None if r.offset == OFFSET_INVALID else r.offset) for r in res}
    finally:
        c.close()


def _prediction_ids(cfg, topic: str, n: int) -> list[int]:
    with KafkaSource(cfg, f"check-{topic}-{time.monotonic_ns()}", [topic + ".pred"]) as src:
        preds = drain(src, n, timeout=60)
        preds += drain(src, None, timeout=5, idle=1)
    return [int(p.key) for p in preds]


class Faults:
    """Counts calls of a step and fails the chosen ones."""

    def __init__(self, fail_on: set[int]):
        self.fail_on = fail_on
        self.calls = 0

    def hit(self) -> bool:
        self.calls += 1
        return self.calls in self.fail_on


def _inject(monkeypatch, step: str) -> Faults:
    if step == "flush":
        faults = Faults({2})
        real = KafkaSink.flush

        def flush(self, timeout=30.0):
            real(self, timeout)
            if faults.hit():
                raise DeliveryError([FailedDelivery("x.pred", None, "injected: Broker: Message size too large")])

        monkeypatch.setattr(KafkaSink, "flush", flush)
    elif step == "persist":
        faults = Faults({3})
        real = CheckpointStore.save

        def save(self, *a, **kw):
            if faults.hit():
                raise OSError(28, "injected: No space left on device")
            return real(self, *a, **kw)

        monkeypatch.setattr(CheckpointStore, "save", save)
    elif step == "commit":
        faults = Faults({2, 3})
        real = KafkaSource.commit

        def commit(self, offsets):
            if faults.hit():
                raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "injected: Unknown member"))
            return real(self, offsets)

        monkeypatch.setattr(KafkaSource, "commit", commit)
    else:
        raise ValueError(step)
    return faults


# inference persists nothing (the engine has no persist step there): no (persist, infer) case
CASES = [(step, "train+infer") for step in ("flush", "persist", "commit", "process")] + \
    [(step, "infer") for step in ("flush", "commit", "process")]


@pytest.mark.parametrize(("step", "mode"), CASES)
def test_a_fault_at_each_step_loses_nothing_and_learns_nothing_twice(step, mode, kafka_config, topic_factory,
                                                                     tmp_path, monkeypatch):
    topic = topic_factory(PARTITIONS, prefix=f"fault-{step}")
    _produce(kafka_config, topic, range(N))
    name = f"fault-{step}-{mode.replace('+', '')}-{topic[-6:]}"
    if mode == "infer":  # a model to serve: trained on the stream, in another pipeline
        trainer = _spec(topic, name + "-t", tmp_path, mode="train")
        Pipeline(trainer, kafka_config).run(until_end=True, timeout=120)
        Pipeline(trainer, kafka_config).save_state(str(tmp_path / "w.safetensors"))
        spec = _spec(topic, name, tmp_path, mode="infer", label=None,
                     model={"kind": "linear", "threads": 1, "optimizer": {"name": "sgd", "lr": 0.05},
                            "weights": str(tmp_path / "w.safetensors")})
    else:
        spec = _spec(topic, name, tmp_path, mode=mode)

    with monkeypatch.context() as m:
        if step == "process":
            pipe = Pipeline(spec, kafka_config, commit_interval_s=0.0)
            if mode == "infer":
                real_predict = pipe.learner.predict
                calls = {"n": 0}

                def predict(records, **kw):
                    calls["n"] += 1
                    if calls["n"] == 20:
                        raise RuntimeError("injected: the model crashed mid-batch")
                    return real_predict(records, **kw)

                pipe.learner.predict = predict
            else:
                pipe.learner.fail_at_batch = 20
            with pytest.raises(RuntimeError, match="injected"):
                pipe.run(until_end=True, timeout=120)
        else:
            faults = _inject(m, step)
            pipe = Pipeline(spec, kafka_config, commit_interval_s=0.0)
            if step == "commit":  # refused commits are retried: the run goes on
                first = pipe.run(until_end=True, timeout=120)
                assert first.records == N and faults.calls >= 4
            else:
                with pytest.raises(PipelineError, match="injected"):
                    pipe.run(until_end=True, timeout=120)
                assert faults.calls >= max(faults.fail_on)
    committed_after_fault = _committed(kafka_config, spec, topic)

    # restart, no fault: to the end of the stream
    result = Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    ends = KafkaAdmin(kafka_config).end_offsets(topic)
    assert _committed(kafka_config, spec, topic) == ends, "the restart committed everything"
    if mode != "infer":
        assert _learned(spec) == list(range(N)), "the persisted model learned every record exactly once"
    ids = _prediction_ids(kafka_config, topic, N)
    assert set(ids) == set(range(N)), "every record has a prediction (at-least-once, no gap)"
    counts = np.bincount(ids, minlength=N)
    for i in np.flatnonzero(counts > 1).tolist():  # re-emitted only from the window left uncommitted
        done = committed_after_fault[(topic, i % PARTITIONS)]
        assert done is None or i // PARTITIONS >= done, f"record {i} was committed, then predicted again"
    if step == "commit":
        assert result.records == 0, "everything was committed by the first run once the broker accepted"


def test_a_failed_flush_during_a_revoke_commits_nothing_past_it(kafka_config, topic_factory, tmp_path, monkeypatch):
    """A member joins mid-run; the revoke's flush fails: nothing more is persisted or committed, the
    run stops with an error, and a restart learns every record exactly once."""
    topic = topic_factory(PARTITIONS, prefix="fault-revoke")
    spec = _spec(topic, f"fault-revoke-{topic[-6:]}", tmp_path, checkpoint={"every_records": 100_000,
                                                                          "every_seconds": 60})
    producer = threading.Thread(target=_produce, args=(kafka_config, topic, range(N)), kwargs={"rate": 150})
    producer.start()
    pipe = Pipeline(spec, kafka_config)
    in_revoke = threading.Event()
    real_revoke, real_flush = pipe.engine.on_revoke, KafkaSink.flush

    def on_revoke(tps, **kw):
        in_revoke.set()
        return real_revoke(tps, **kw)

    def flush(self, timeout=30.0):
        real_flush(self, timeout)
        if in_revoke.is_set() and self is getattr(pipe, "sink", None):  # this pipeline's producer only
            raise DeliveryError([FailedDelivery(topic + ".pred", None, "injected at revoke")])

    pipe.engine.on_revoke = on_revoke
    outcome: dict = {}
    with monkeypatch.context() as m:
        m.setattr(KafkaSink, "flush", flush)
        # no until_end: a run that caught up with the producer would end before the member joins
        t = threading.Thread(target=lambda: outcome.update(r=_catch(lambda: pipe.run(timeout=90))))
        t.start()
        while pipe.records < 200 and t.is_alive():
            time.sleep(0.05)
        with KafkaSource(kafka_config, spec.group_id, [topic]) as member:  # joins: our partitions are revoked
            drain(member, None, timeout=15, idle=2)
            t.join(60)
    producer.join()
    assert isinstance(outcome["r"], PipelineError) and "injected at revoke" in str(outcome["r"])
    assert pipe.learner.n_learned >= 200
    # no periodic checkpoint in this run: the revoke's was the only one due, and its flush failed
    assert CheckpointStore(spec.checkpoint_url).latest() is None, "nothing of the failed unit was persisted"
    assert _committed(kafka_config, spec, topic) == {(topic, p): None for p in range(PARTITIONS)}
    again = Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    assert again.records == N, again
    assert _learned(spec) == list(range(N))


def _catch(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - returned to the test thread
        return e


def test_a_resumed_trainer_survives_a_member_joining_and_leaving(kafka_config, topic_factory, tmp_path):
    """Issue: a resumed trainer rewound to its restore-time offsets after a rebalance and learned
    6,630 records twice. Every (re)assignment must start where the model is."""
    topic = topic_factory(PARTITIONS, prefix="rebalance")
    spec = _spec(topic, f"rebalance-{topic[-6:]}", tmp_path, mode="train")
    _produce(kafka_config, topic, range(300))
    Pipeline(spec, kafka_config).run(max_records=300, timeout=120)  # a checkpoint to resume from
    producer = threading.Thread(target=_produce, args=(kafka_config, topic, range(300, N)), kwargs={"rate": 50})
    producer.start()
    pipe = Pipeline(spec, kafka_config)  # resumed
    assert pipe.learner.n_learned == 300
    outcome: dict = {}
    t = threading.Thread(target=lambda: outcome.update(r=_catch(lambda: pipe.run(timeout=180))))
    t.start()
    while pipe.records < 100 and t.is_alive():
        time.sleep(0.05)
    with KafkaSource(kafka_config, spec.group_id, [topic]) as member:  # joins, reads, commits nothing, leaves
        got = drain(member, None, timeout=40, idle=3)
    producer.join()
    _stop_when_learned(pipe, t, N)
    assert got, "the second member held a partition for a while"
    assert not isinstance(outcome["r"], Exception), outcome["r"]
    assert _learned(spec) == list(range(N)), "every record learned exactly once"
    assert pipe.learner.n_learned == N


def _stop_when_learned(pipe: Pipeline, t: threading.Thread, n: int, timeout: float = 90) -> None:
    """Let the run learn ``n`` records (and a little longer: it must not learn more), then stop it."""
    deadline = time.monotonic() + timeout
    while pipe.learner.n_learned < n and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)
    pipe.stop()
    t.join(60)


def test_broker_paused_past_the_session_timeout_learns_nothing_twice(tmp_path):
    """SIGSTOP the broker for longer than the session timeout: the member is expired, its commits fail
    ("Unknown member"); after SIGCONT it rejoins and resumes where its model is."""
    from tensorstream.kafka import EmbeddedBroker

    with EmbeddedBroker() as b:
        cfg = KafkaConfig.local(b.bootstrap_servers, session_timeout_ms=3000, heartbeat_interval_ms=300)
        KafkaAdmin(cfg).ensure_topic("paused", PARTITIONS)
        spec = _spec("paused", "paused", tmp_path, mode="train")
        _produce(cfg, "paused", range(400))
        pipe = Pipeline(spec, cfg)
        outcome: dict = {}
        t = threading.Thread(target=lambda: outcome.update(r=_catch(lambda: pipe.run(timeout=180))))
        t.start()
        while pipe.records < 400 and t.is_alive():
            time.sleep(0.05)
        os.kill(b.pid, signal.SIGSTOP)
        time.sleep(9)  # three session timeouts
        os.kill(b.pid, signal.SIGCONT)
        _produce(cfg, "paused", range(400, N))
        _stop_when_learned(pipe, t, N)
        assert not isinstance(outcome["r"], Exception), outcome["r"]
        assert _learned(spec) == list(range(N)), "no record learned twice, none skipped"


@pytest.mark.parametrize("size_mb", [2, 5])
def test_huge_bad_records_end_in_the_dlq_truncated(size_mb, kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix=f"huge{size_mb}")
    big = b"\xff" + os.urandom(size_mb * 1_000_000)  # not JSON
    cfg_big = kafka_config.model_copy(update={"extra": {"message.max.bytes": 20_000_000}})
    with KafkaSink(cfg_big) as sink:
        for i in range(60):
            sink.produce(topic, orjson.dumps(_value(i)), key=str(i).encode())
        sink.produce(topic, big, key=b"big")
        for i in range(60, 120):
            sink.produce(topic, orjson.dumps(_value(i)), key=str(i).encode())
    spec = _spec(topic, f"huge{size_mb}-{topic[-6:]}", tmp_path)
    result = Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    assert (result.records, result.predictions, result.bad) == (121, 120, 1)
    with KafkaSource(kafka_config, f"check-{topic}", [spec.name + ".dlq"]) as src:
        dlq = drain(src, 1, timeout=30)
    h = dict(dlq[0].headers)
    assert h["dlq.truncated"] == b"true" and int(h["dlq.original.size"]) == len(big)
    assert h["dlq.original.sha256"].decode() == hashlib.sha256(big).hexdigest()
    assert h["source.offset"] == b"60" and h["error.type"] == b"decode_error"
    assert dlq[0].value == big[:len(dlq[0].value)]
    ids = _prediction_ids(kafka_config, topic, 120)
    assert sorted(ids) == list(range(120)), "source records = predictions + dead letters"


def test_a_dead_letter_that_cannot_be_delivered_stops_the_run_and_commits_nothing_past_it(
        kafka_config, topic_factory, tmp_path, monkeypatch):
    topic = topic_factory(1, prefix="dlqfail")
    cfg_big = kafka_config.model_copy(update={"extra": {"message.max.bytes": 20_000_000}})
    with KafkaSink(cfg_big) as sink:
        for i in range(60):
            sink.produce(topic, orjson.dumps(_value(i)), key=str(i).encode())
        sink.produce(topic, b"\xff" * 3_000_000, key=b"big")
        for i in range(60, 120):
            sink.produce(topic, orjson.dumps(_value(i)), key=str(i).encode())
    spec = _spec(topic, f"dlqfail-{topic[-6:]}", tmp_path)
    # as if the broker's limit were higher than it is: the dead letter is not truncated, and is refused
    monkeypatch.setattr(runner, "_max_message_bytes", lambda kafka: 100_000_000)
    with pytest.raises(PipelineError, match="not delivered|too large"):
        Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    committed = _committed(kafka_config, spec, topic)[(topic, 0)]
    assert committed is None or committed <= 60, "nothing committed past the record whose dead letter failed"
    state = CheckpointStore(spec.checkpoint_url).latest()
    assert state is None or state[1].offsets.get((topic, 0), 0) <= 60
    monkeypatch.undo()
    result = Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    assert result.bad == 1
    assert set(_prediction_ids(kafka_config, topic, 120)) == set(range(120))


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("value", [1e39, 1e200])
def test_numbers_beyond_float32_are_dead_letters_and_the_model_stays_finite(value, standardize, kafka_config,
                                                                            topic_factory, tmp_path):
    topic = topic_factory(1, prefix="huge-number")
    with KafkaSink(kafka_config) as sink:
        for i in range(200):
            v = _value(i)
            if i == 100:
                v["x1"] = value
            sink.produce(topic, orjson.dumps(v), key=str(i).encode())
    spec = _spec(topic, f"num-{topic[-6:]}", tmp_path, model={"kind": "mlp", "hidden": [8], "threads": 1},
                 features={"numeric": ["x1", "x2"], "standardize": standardize})
    pipe = Pipeline(spec, kafka_config)
    result = pipe.run(until_end=True, timeout=120)
    assert (result.bad, result.predictions) == (1, 199)
    assert result.first_bad and "out_of_range" in result.first_bad and "@100" in result.first_bad
    state = pipe.learner.state_dict()
    for k, v in state.items():
        if v.dtype.kind == "f":
            assert np.isfinite(v).all(), k
    with KafkaSource(kafka_config, f"check-{topic}", [topic + ".pred"]) as src:
        preds = [orjson.loads(p.value) for p in drain(src, 199, timeout=30)]
    assert len(preds) == 199 and all(np.isfinite(p["proba"]).all() for p in preds)
    later = {round(p["proba"][1], 6) for p in preds if p["source"]["offset"] > 100}
    assert len(later) > 50, "the model still tells records apart after the huge value"
