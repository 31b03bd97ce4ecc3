"""Delayed labels: the bounded key join, delayed progressive validation, state, and the broker."""

from __future__ import annotations

import doctest
import random
import time

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import tensorstream.learn.delayed
from tensorstream.backends import make_backend
from tensorstream.data.datasets import open_source
from tensorstream.examples import example_spec
from tensorstream.kafka import KafkaSink
from tensorstream.learn import LabelJoin, OnlineLearner
from tensorstream.pipeline import Pipeline
from tensorstream.spec import DelayedLabelsSpec, PipelineSpec, SpecError, parse_spec
from test_drift import NumpyBackend, flipping_stream


def through_safetensors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return st_load(st_save(state))


def test_docstring_examples():
    result = doctest.testmod(tensorstream.learn.delayed, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------- the join


def _rows(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.arange(start, start + n, dtype=np.float32).reshape(n, 1)
    return x, np.tile(np.array([[0.3, 0.7]], np.float32), (n, 1)), np.ones(n)


def test_a_label_meets_its_prediction_in_either_order_once():
    join = LabelJoin(window=10)
    assert join.add_labels(["early"], np.array([0.0])) == []  # before its features: it waits
    m = join.add_features(["a", "early", "b"], *_rows(3))
    assert [(mm.index, mm.y, float(mm.x[0])) for mm in m] == [(1, 0.0, 1.0)]
    m = join.add_labels(["b", "a", "a"], np.array([1.0, 0.0, 1.0]))
    assert [(mm.index, float(mm.x[0])) for mm in m] == [(0, 2.0), (1, 0.0)]
    assert (join.n_matched, len(join.pending), len(join.early)) == (3, 0, 1)  # the 2nd "a" waits


def test_repeated_keys_match_oldest_first():
    join = LabelJoin(window=10)
    join.add_features(["k", "k", "k"], *_rows(3))
    m = join.add_labels(["k", "k"], np.array([1.0, 0.0]))
    assert [float(mm.x[0]) for mm in m] == [0.0, 1.0] and len(join.pending) == 1


def test_window_expiry_late_and_unmatched_labels():
    join = LabelJoin(window=3)
    join.add_labels(["orphan"], np.array([1.0]))
    join.add_features(["a", "b", "c", "d"], *_rows(4))  # "a" waited for 3 later records: still there
    assert join.n_expired == 0
    join.add_features(["e"], *_rows(1, 4))  # now "a" has waited too long; so has the orphan label
    assert (join.n_expired, join.n_unmatched) == (1, 1)
    assert join.add_labels(["a"], np.array([0.0])) == [] and join.n_late == 1
    assert len(join.add_labels(["b", "c", "d", "e"], np.ones(4))) == 4
    assert join.add_labels([None], np.ones(1)) == [] and join.n_no_key == 1


def test_keys_of_any_kind_join_by_value():
    join = LabelJoin(window=5)
    join.add_features([b"\x00k", 7, "7"], *_rows(3))
    m = join.add_labels(["7", 7, b"\x00k"], np.array([1.0, 2.0, 3.0]))
    assert [(mm.y, float(mm.x[0])) for mm in m] == [(1.0, 2.0), (2.0, 1.0), (3.0, 0.0)]


ops = st.lists(st.tuples(st.sampled_from(["f", "l"]), st.lists(st.sampled_from("abcdef") | st.none(),
                                                                   min_size=1, max_size=6)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=ops, window=st.integers(1, 6), cut=st.integers(0, 40))
def test_join_state_is_bounded_counted_and_restores_exactly(ops, window, cut):
    a = LabelJoin(window)
    b = None
    n_feat = n_lab = 0
    for i, (kind, keys) in enumerate(ops):
        if i == cut:
            b = LabelJoin(window)
            b.load_state_dict(through_safetensors(a.state_dict()))
        for j in [a] + ([b] if b is not None else []):
            if kind == "f":
                out = j.add_features(keys, *_rows(len(keys), 100 * i))
            else:
                out = j.add_labels(keys, np.arange(len(keys), dtype=float))
            if j is a:
                res_a = [(m.index, m.y, float(m.x[0])) for m in out]
            else:
                assert [(m.index, m.y, float(m.x[0])) for m in out] == res_a
        if kind == "f":
            n_feat += sum(k is not None for k in keys)
        else:
            n_lab += sum(k is not None for k in keys)
        assert len(a.pending) <= window + 1 and len(a.early) <= window  # + the record just added
    # Every keyed record is in exactly one bucket.
    assert n_feat == a.n_matched + a.n_expired + len(a.pending)
    assert n_lab == a.n_matched + a.n_late + a.n_unmatched + len(a.early)
    if b is not None:
        assert a.snapshot() == b.snapshot()


# ---------------------------------------------------------------- the learner


def delayed_spec(window: int = 100, **drift) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "source": {"topic": "in"}, "sink": {"topic": "out"}, "features": {"numeric": ["a", "b"]},
        "label": {"field": "y", "classes": [False, True]}, "metrics_window": 50,
        "model": {"kind": "linear", "optimizer": {"name": "sgd", "lr": 0.05}},
        "labels": {"topic": "labels", "window": window}, "drift": drift,
    })


def test_the_prediction_made_when_the_features_came_is_the_one_scored():
    learner = OnlineLearner(delayed_spec(window=1000), NumpyBackend())
    recs = flipping_stream(200, 10_000)
    feats = [{"a": r["a"], "b": r["b"]} for r in recs]
    first = learner.process_features(feats[:50], [f"k{i}" for i in range(50)])
    assert first.n_learned == 0 and first.unlabelled == list(range(50))
    # The model learns other records meanwhile ...
    learner.process_features(feats[50:], [f"k{i}" for i in range(50, 200)])
    learner.process_labels([f"k{i}" for i in range(50, 200)], [r["y"] for r in recs[50:]])
    before = learner.snapshot()
    # ... then the first 50 labels come: their *stored* predictions are scored.
    out = learner.process_labels([f"k{i}" for i in range(50)], [r["y"] for r in recs[:50]])
    assert out.n_learned == out.n_scored == 50 and out.predictions == []
    right = sum(p["label"] == r["y"] for p, r in zip(first.predictions, recs[:50], strict=True))
    after = learner.snapshot()
    assert after["accuracy"] * 200 == pytest.approx(before["accuracy"] * 150 + right)
    assert learner.n_learned == 200 == after["labels_matched"]


def test_bad_and_unknown_labels_are_not_learned():
    learner = OnlineLearner(delayed_spec(), NumpyBackend())
    learner.process_features([{"a": 1.0, "b": 2.0}], ["x"])
    out = learner.process_labels(["x", "nobody"], ["maybe", True])
    assert [(b.index, b.error_type) for b in out.bad] == [(0, "unknown_label")] and out.n_learned == 0
    out = learner.process_labels(["x"], [True])
    assert out.n_learned == 1 and learner.n_learned == 1


def test_learner_state_with_pending_predictions_continues_identically():
    spec = delayed_spec(window=60, detector="page_hinkley", page_hinkley={"threshold": 5}, policy="challenger",
                        challenger={"window": 50, "min_records": 50})
    recs = flipping_stream(900, 300)
    rng = random.Random(0)
    steps = []  # ("f", i0, i1) or ("l", keys)
    pending: list[int] = []
    for i in range(0, len(recs), 10):
        steps.append(("f", i, i + 10))
        pending += range(i, i + 10)
        if len(pending) >= 40:
            chunk, pending = pending[:20], pending[20:]
            rng.shuffle(chunk)
            steps.append(("l", [k for k in chunk if k % 17]))  # some labels never come

    def step(learner, s):
        if s[0] == "f":
            out = learner.process_features([{"a": r["a"], "b": r["b"]} for r in recs[s[1]:s[2]]],
                                           list(range(s[1], s[2])))
        else:
            out = learner.process_labels(s[1], [recs[k]["y"] for k in s[1]])
        return out.predictions, out.loss, out.events

    a = OnlineLearner(spec, NumpyBackend())
    cut = len(steps) // 2
    events = []
    for s in steps[:cut]:
        events += step(a, s)[2]
    assert a.join.pending and any(e["type"] == "drift" for e in events)
    state = through_safetensors(a.state_dict())
    assert {"join/meta", "join/pending_x", "drift/meta"} <= state.keys()
    b = OnlineLearner(spec, NumpyBackend())
    b.load_state_dict(state)
    for s in steps[cut:]:
        assert step(a, s) == step(b, s)
    assert a.snapshot() == pytest.approx(b.snapshot())
    snap = a.snapshot()
    assert snap["features_expired"] > 0 and snap["labels_matched"] == a.n_learned


def test_spec_checks():
    base = {"source": {"topic": "t"}, "sink": {"topic": "p"}, "features": {"numeric": ["*"]},
            "label": {"field": "y"}}
    assert parse_spec(base).labels is None
    with pytest.raises(SpecError, match="labels.topic must differ"):
        parse_spec({**base, "labels": {"topic": "t"}})
    with pytest.raises(SpecError, match=r"labels\.window"):
        parse_spec({**base, "labels": {"topic": "l", "window": 0}})
    with pytest.raises(SpecError, match="for training"):
        parse_spec({**base, "mode": "infer", "versions": {"watch": True}, "labels": {"topic": "l"}})


# ---------------------------------------------------------------- the broker

N, BLOCK, WINDOW = 3000, 50, 1000
DROPPED = set(range(0, 600, 12))  # their labels come only after the window (late)
ORPHANS = 20  # labels whose features never come (unmatched)


def test_delayed_labels_through_the_broker(kafka_config, topic_factory, admin):
    base = example_spec("agrawal_drift.yaml")
    src = topic_factory(1, prefix="feat")
    admin.ensure_topic(src + ".labels", 2)  # two partitions: read in record-time order with the features
    spec = base.model_copy(update={
        "name": f"delayed-{src[-6:]}", "source": base.source.model_copy(update={"topic": src}),
        "sink": base.sink.model_copy(update={"topic": src + ".pred"}),
        "labels": DelayedLabelsSpec(topic=src + ".labels", window=WINDOW),
        "drift": base.drift.model_copy(update={"detector": "none"}),
    })
    records = list(open_source("river:drift.agrawal?position=100000", limit=N))  # stationary
    rng = random.Random(7)
    with KafkaSink(kafka_config) as sink:
        # Labels that never meet features, and one that is not a class: first in the topic.
        for j in range(ORPHANS):
            sink.produce(spec.labels.topic, orjson.dumps({"y": j % 2}), key=f"orphan-{j}".encode())
        sink.produce(spec.labels.topic, orjson.dumps({"y": 7}), key=b"k1")
        sink.flush()
        # Features in blocks; each block's labels two blocks later, shuffled. The pipeline
        # reads the two topics aligned by record time (ms): keep the blocks ms apart.
        for b0 in range(0, N + 2 * BLOCK, BLOCK):
            time.sleep(0.003)
            if b0 < N:
                for i in range(b0, b0 + BLOCK):
                    feat = {k: v for k, v in records[i].items() if k != "y"}
                    sink.produce(spec.source.topic, orjson.dumps(feat), key=f"k{i}".encode())
            late = [i for i in range(b0 - 2 * BLOCK, b0 - BLOCK) if i >= 0 and i not in DROPPED]
            rng.shuffle(late)
            for i in late:
                sink.produce(spec.labels.topic, orjson.dumps({"y": records[i]["y"]}), key=f"k{i}".encode())
            sink.flush()

    pipe = Pipeline(spec, kafka_config)
    result = pipe.run(until_end=True, timeout=240)
    m = result.metrics
    assert result.predictions == N and result.bad == 1  # one prediction per features record
    assert result.records == N + (N - len(DROPPED)) + ORPHANS + 1
    # Every label that met its prediction within the window was learned, once.
    assert m["labels_matched"] == N - len(DROPPED) == m["n_learned"] == m["n_scored"]
    assert m["features_expired"] == len(DROPPED) and m["labels_pending"] == 0
    assert m["labels_unmatched"] == ORPHANS and m["labels_late"] == 0

    # Prequential accuracy close to the same stream with the labels in the records.
    immediate = OnlineLearner(example_spec("agrawal_drift.yaml"), make_backend("torch"))
    for i in range(0, N, spec.batch.max_size):
        immediate.process([r for r in records[i:i + spec.batch.max_size]])
    assert abs(m["accuracy"] - immediate.snapshot()["accuracy"]) < 0.04, (m["accuracy"], immediate.snapshot())

    # The late labels come now: the restarted pipeline restores the join from its
    # checkpoint, knows their predictions expired, and learns nothing twice.
    with KafkaSink(kafka_config) as sink:
        for i in sorted(DROPPED):
            sink.produce(spec.labels.topic, orjson.dumps({"y": records[i]["y"]}), key=f"k{i}".encode())
        sink.flush()
    again = Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    assert again.records == len(DROPPED)
    assert again.metrics["labels_late"] == len(DROPPED)
    assert again.metrics["n_learned"] == m["n_learned"] and again.metrics["labels_matched"] == m["labels_matched"]
