"""Stateful features in the online learner: leak-freedom of the label history (labels in the
record, and delayed labels), batch-size invariance of what is predicted and learned, the
example's margin over the same model without them, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest

from tensorstream.backends import make_backend
from tensorstream.data.datasets import open_source
from tensorstream.examples import example_spec
from tensorstream.learn import OnlineLearner
from tensorstream.pipeline.distributed.context import DistributedError, _check_supported
from tensorstream.spec import PipelineSpec


class Recorder:
    """A backend that records every row it is asked to predict (the fallback per-record path)."""

    name = "recorder"

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def build(self, model, n_features, n_outputs, task):
        self.n_outputs = n_outputs

    def predict(self, x):
        self.rows.extend(np.asarray(x).copy())
        return np.full((len(x), self.n_outputs), 1.0 / self.n_outputs, dtype=np.float32)

    def train_step(self, x, y):
        return 0.0

    def get_state(self):
        return {}

    def set_state(self, state):
        pass


def _spec(**extra):
    return PipelineSpec.model_validate({
        "source": {"topic": "t"}, "mode": "train",
        "features": {"numeric": ["x"], "key": "k", "time": "ts", "label_history": 2, "standardize": False},
        "label": {"field": "y", "classes": ["no", "yes"]}, **extra})


def _history(learner, rows):
    cols = learner.features.keyed.columns
    X = np.stack(rows)
    at = X.shape[1] - len(cols)
    return [[int(X[i, at + cols.index(f"label{m}=class{c}")]) for m in (1, 2) for c in (0, 1)] for i in range(len(X))]


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_a_record_sees_the_labels_of_the_records_before_it_never_its_own(batch):
    learner = OnlineLearner(_spec(), Recorder())
    recs = [{"k": "ab"[i % 2], "ts": 1000 + i, "x": 0.0, "y": ["no", "yes"][(i // 2) % 2]} for i in range(8)]
    recs[4].pop("y")  # unlabelled: nothing enters the history
    for a in range(0, len(recs), batch):
        learner.process(recs[a:a + batch])
    h = _history(learner, learner.backend.rows)
    # key a: records 0 (no), 2 (yes), 4 (none), 6 (yes); key b: 1 (no), 3 (yes), 5 (no), 7 (yes)
    assert h[0] == [0, 0, 0, 0] and h[1] == [0, 0, 0, 0]
    assert h[2] == [1, 0, 0, 0] and h[3] == [1, 0, 0, 0]  # lag 1 = no
    assert h[4] == [0, 1, 1, 0] and h[6] == [0, 1, 1, 0]  # record 4 brought no label
    assert h[5] == [0, 1, 1, 0] and h[7] == [1, 0, 0, 1]


def test_delayed_labels_enter_the_history_only_once_they_arrived():
    spec = _spec(labels={"topic": "labels", "window": 100})
    learner = OnlineLearner(spec, Recorder())
    f = lambda i: {"k": "a", "ts": 1000 + i, "x": 0.0}  # noqa: E731
    seen = []  # the rows predicted for the features records (learning re-predicts rows too)

    def features(*idx):
        learner.process_features([f(i) for i in idx], keys=[str(i).encode() for i in idx])
        seen.extend(learner.backend.rows[-len(idx):])

    features(0, 1)
    learner.process_labels([b"0"], ["yes"])  # record 0's label arrives; record 1's not yet
    features(2)
    learner.process_labels([b"1"], ["no"])
    features(3)
    h = _history(learner, seen)
    assert h[0] == h[1] == [0, 0, 0, 0]
    assert h[2] == [0, 1, 0, 0]  # only "yes" (record 0) had arrived
    assert h[3] == [1, 0, 0, 1]  # then "no" (record 1), in arrival order
    restored = OnlineLearner(spec, Recorder())
    restored.load_state_dict(learner.state_dict())  # the join keeps each waiting record's state key
    learner.process_features([f(4)], keys=[b"4"])
    restored.process_features([f(4)], keys=[b"4"])
    learner.process_labels([b"4"], ["yes"])
    restored.process_labels([b"4"], ["yes"])
    a, b = learner.features.keyed.store.peek([b"a"]), restored.features.keyed.store.peek([b"a"])
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_the_batch_size_does_not_change_predictions_or_state(backend):
    spec = example_spec("keyed.yaml", backend=backend)
    recs = list(open_source("river:keyed.transactions?seed=3", limit=300))
    outs = {}
    for batch in (1, 64):
        learner = OnlineLearner(spec, make_backend(backend))
        probs = []
        for a in range(0, len(recs), batch):
            probs.append(learner.process(recs[a:a + batch]).proba)
        outs[batch] = (np.concatenate(probs), learner.state_dict())
    np.testing.assert_allclose(outs[1][0], outs[64][0], rtol=1e-4, atol=1e-5)
    s1, s64 = outs[1][1], outs[64][1]
    assert s1["features/keyed/store/keys"].tobytes() == s64["features/keyed/store/keys"].tobytes()
    np.testing.assert_allclose(s1["features/keyed/scaler/mean"], s64["features/keyed/scaler/mean"], rtol=1e-9)


def test_the_example_beats_the_same_model_without_stateful_features():
    base = example_spec("keyed.yaml")
    plain = base.model_copy(update={"features": base.features.model_copy(
        update={"key": None, "windows": [], "lags": {}, "time_features": []})})
    recs = list(open_source("river:keyed.transactions", limit=4000))
    acc = {}
    for name, spec in (("stateful", base), ("plain", plain)):
        learner = OnlineLearner(spec, make_backend("torch"))
        for a in range(0, len(recs), 32):
            learner.process(recs[a:a + 32])
        acc[name] = learner.snapshot()["accuracy"]
    assert acc["stateful"] > acc["plain"] + 0.05, acc


def test_what_is_refused():
    spec = _spec(distributed={"world_size": 2})
    with pytest.raises(DistributedError, match="stateful features"):
        _check_supported(spec)
    infer = PipelineSpec.model_validate({
        "source": {"topic": "t"}, "sink": {"topic": "o"}, "mode": "infer", "versions": {"watch": True},
        "features": {"numeric": ["x"], "label_history": 1}})
    with pytest.raises(ValueError, match="label_history needs the 'label' section"):
        OnlineLearner(infer, Recorder())
    learner = OnlineLearner(_spec(features={"numeric": ["x"], "key": "@key", "lags": {"x": 1}}), Recorder())
    out = learner.process([{"x": 1.0, "y": "no"}, {"x": 2.0, "y": "no"}], keys=[b"a", None], timestamps=[1, 2])
    assert [(b.index, b.error_type, b.field) for b in out.bad] == [(1, "missing_field", "@key")]
    assert learner.features.keyed.store.n_keys == 1


def test_an_inference_worker_keeps_its_own_keyed_state_across_model_versions():
    train = _spec(features={"numeric": ["x"], "key": "k", "time": "ts", "lags": {"x": 1}})
    trainer = OnlineLearner(train, Recorder())
    trainer.process([{"k": "a", "ts": 1, "x": 1.0, "y": "no"}])
    infer = train.model_copy(update={"mode": "infer", "sink": {"topic": "o"}, "versions": {"watch": True}})
    worker = OnlineLearner(infer, Recorder())
    worker.load_state_dict(trainer.state_dict())  # the first model: its state too (a warm start)
    assert worker.features.keyed.store.n_keys == 1
    worker.predict([{"k": "b", "ts": 5, "x": 2.0}])
    trainer.process([{"k": "c", "ts": 2, "x": 1.0, "y": "no"}])
    worker.load_state_dict(trainer.state_dict())  # a new version: the model changes, the stream state not
    assert sorted(worker.features.keyed.store.index) == [b"a", b"b"]
