"""Concept drift: detectors on River's drifting streams, policies, champion/challenger, state."""

from __future__ import annotations

import doctest
import time
import uuid

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import tensorstream.learn.challenger
import tensorstream.learn.drift
import tensorstream.learn.policies
from tensorstream.backends import make_backend
from tensorstream.checkpoint.versions import ModelRegistry
from tensorstream.data.datasets import open_source
from tensorstream.examples import example_spec
from tensorstream.learn import DriftMonitor, OnlineLearner
from tensorstream.learn.challenger import reset_optimizer
from tensorstream.pipeline import Pipeline
from tensorstream.data.produce import produce_records
from tensorstream.spec import DriftSpec, ModelSpec, PipelineSpec, SpecError, parse_spec

# Acceptance bounds: the first drift reported must come at or after the drift
# point and at most this many records later; nothing is reported before it.
SEA_DRIFT, SEA_BOUND = 500, 100  # river:drift.sea, sea_drift.yaml (Page-Hinkley on the log loss)
AGRAWAL_DRIFT, AGRAWAL_BOUND = 5000, 200  # river:drift.agrawal, agrawal_drift.yaml (ADWIN on the log loss)


class NumpyBackend:
    """Softmax regression with SGD + momentum in numpy: fast, deterministic, and it has
    an optimizer state (momentum) and ``set_learning_rate`` like the real backends."""

    name = "numpy"

    def build(self, model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        rng = np.random.default_rng(model.seed)
        self.lr = model.optimizer.lr
        self.W = rng.normal(0.0, 0.5, size=(n_features, n_outputs)).astype(np.float32)
        self.b = np.zeros(n_outputs, dtype=np.float32)
        self.vW, self.vb = np.zeros_like(self.W), np.zeros_like(self.b)
        self.steps = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.W + self.b
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        out = self.predict(x).astype(np.float64)
        loss = float(-np.mean(np.log(out[np.arange(len(y)), y] + 1e-12)))
        g = out
        g[np.arange(len(y)), y] -= 1
        g /= len(x)
        self.vW = (0.9 * self.vW + (x.T @ g)).astype(np.float32)
        self.vb = (0.9 * self.vb + g.sum(axis=0)).astype(np.float32)
        self.W -= self.lr * self.vW
        self.b -= self.lr * self.vb
        self.steps += 1
        return loss

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr

    def get_state(self) -> dict[str, np.ndarray]:
        return {"model/W": self.W.copy(), "model/b": self.b.copy(), "optim/W.momentum": self.vW.copy(),
                "optim/b.momentum": self.vb.copy(), "optim/step": np.array(self.steps, dtype=np.int64)}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.W, self.b = np.array(state["model/W"]), np.array(state["model/b"])
        self.vW, self.vb = np.array(state["optim/W.momentum"]), np.array(state["optim/b.momentum"])
        self.steps = int(state["optim/step"])


def through_safetensors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return st_load(st_save(state))


def flipping_stream(n: int, at: int, seed: int = 0) -> list[dict]:
    """y = a + b > 0, and the opposite from record ``at`` on (an abrupt drift)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = rng.normal(size=2)
        y = bool(a + b > 0) != (i >= at)
        out.append({"a": float(a), "b": float(b), "y": y})
    return out


def small_spec(**drift) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "source": {"topic": "in"}, "sink": {"topic": "out"}, "features": {"numeric": ["a", "b"]},
        "label": {"field": "y", "classes": [False, True]}, "metrics_window": 50,
        "model": {"kind": "linear", "optimizer": {"name": "sgd", "lr": 0.05}},
        "drift": drift,
    })


def run_learner(learner: OnlineLearner, records: list[dict], batch: int, start: int = 0):
    """Process ``records`` in batches; returns (outcomes, events with absolute record index)."""
    outcomes, events = [], []
    for i in range(0, len(records), batch):
        out = learner.process(records[i:i + batch])
        outcomes.append(out)
        events += [{**e, "at": start + i + e["index"]} for e in out.events]
    return outcomes, events


def read_topic(kafka_config, topic: str, n: int, timeout: float = 30.0) -> list:
    """The first ``n`` records of partition 0, by assignment (no group join: seconds faster)."""
    c = Consumer({**kafka_config.client_settings(), "group.id": f"read-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in c.consume(500, 0.2) if m.error() is None]
        return out
    finally:
        c.close()


def river_records(source: str, n: int) -> list[dict]:
    return [{str(k): v for k, v in r.items()} for r in open_source(source, limit=n)]


@pytest.mark.parametrize("module", [tensorstream.learn.drift, tensorstream.learn.challenger,
                                    tensorstream.learn.policies])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------ detectors, in memory


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_sea_drift_is_detected_after_the_drift_point_and_not_before(backend):
    spec = example_spec("sea_drift.yaml", backend=backend)
    assert spec.drift.detector == "page_hinkley" and spec.drift.signal == "loss"
    learner = OnlineLearner(spec, make_backend(backend))
    _, events = run_learner(learner, river_records("river:drift.sea", 1000), spec.batch.max_size)
    drifts = [e for e in events if e["type"] == "drift"]
    assert drifts, "no drift detected"
    assert all(e["at"] >= SEA_DRIFT for e in drifts), f"false alarm before the drift: {drifts}"
    first = drifts[0]
    assert first["at"] < SEA_DRIFT + SEA_BOUND, first
    assert first["metric"] == "log_loss" and first["after"] > first["before"]


def test_agrawal_switch_is_detected_after_the_drift_point_and_not_before():
    spec = example_spec("agrawal_drift.yaml", backend="torch")
    assert spec.drift.detector == "adwin"
    learner = OnlineLearner(spec, make_backend("torch"))
    _, events = run_learner(learner, river_records("river:drift.agrawal", 10_000), spec.batch.max_size)
    drifts = [e for e in events if e["type"] == "drift"]
    assert drifts and all(e["at"] >= AGRAWAL_DRIFT for e in drifts), drifts
    assert drifts[0]["at"] < AGRAWAL_DRIFT + AGRAWAL_BOUND, drifts[0]
    assert learner.snapshot()["n_drifts"] == len(drifts)


def test_direction_up_ignores_a_falling_error():
    mon = DriftMonitor(DriftSpec(detector="adwin"))
    assert mon.update([1.0] * 300 + [0.0] * 300) == [] and mon.n_ignored >= 1
    both = DriftMonitor(DriftSpec(detector="adwin", direction="both"))
    events = both.update([1.0] * 300 + [0.0] * 300)
    assert events and events[0].before == 0.0 < events[0].after  # accuracy rose: reported only with "both"


def test_warmup_values_are_not_watched():
    spec = DriftSpec(detector="page_hinkley", page_hinkley={"threshold": 5, "min_instances": 10}, warmup=100)
    mon = DriftMonitor(spec)
    assert mon.update([0.0] * 50 + [1.0] * 50 + [1.0] * 50) == []  # the rise is inside the warm-up
    assert mon.n_seen == 150


@pytest.mark.parametrize("at_detection", [False, True], ids=["mid", "at-detection"])
@pytest.mark.parametrize("detector", ["adwin", "page_hinkley", "kswin"])
def test_detector_state_restores_exactly(detector, at_detection):
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.random(700) < 0.1, rng.random(700) < 0.5, rng.random(600) < 0.1,
                             rng.random(700) < 0.6]).astype(float)
    spec = DriftSpec(detector=detector, page_hinkley={"threshold": 10},
                     kswin={"alpha": 0.005, "window_size": 300, "stat_size": 100, "seed": 5})
    cut = 900
    if at_detection:  # the cut right after a detection: River resets the detector on the next value
        cut = DriftMonitor(spec).update(values)[0].index + 1
    a = DriftMonitor(spec)
    before = a.update(values[:cut])
    state = through_safetensors(a.state_dict())
    assert all(v.dtype != object for v in state.values())
    b = DriftMonitor(spec)
    b.load_state_dict(state)
    rest_a, rest_b = a.update(values[cut:]), b.update(values[cut:])
    assert [e.to_dict() for e in rest_a] == [e.to_dict() for e in rest_b]
    assert before and rest_a, "the test stream should drift before and after the cut"
    assert (a.n_seen, a.n_drifts, a.n_ignored) == (b.n_seen, b.n_drifts, b.n_ignored)


def test_adwin_restored_from_a_truncated_history_still_detects():
    # ADWIN (Rust) cannot be saved: it is rebuilt from the last `history` values (docs/drift.md).
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.random(3000) < 0.1, rng.random(400) < 0.6]).astype(float)
    spec = DriftSpec(detector="adwin", history=500)
    a = DriftMonitor(spec)
    assert a.update(values[:3000]) == []
    state = a.state_dict()
    assert state["history"].shape == (500,)
    b = DriftMonitor(spec)
    b.load_state_dict(through_safetensors(state))
    ea, eb = a.update(values[3000:]), b.update(values[3000:])
    assert ea and eb and abs(ea[0].index - eb[0].index) <= 64


def test_spec_errors_name_the_field():
    base = {"source": {"topic": "t"}, "sink": {"topic": "p"}, "features": {"numeric": ["*"]},
            "label": {"field": "y"}}
    with pytest.raises(SpecError, match=r"drift\.adwin\.deltaa"):
        parse_spec({**base, "drift": {"detector": "adwin", "adwin": {"deltaa": 0.1}}})
    with pytest.raises(SpecError, match="choose a detector"):
        parse_spec({**base, "drift": {"policy": "boost"}})
    with pytest.raises(SpecError, match=r"drift\.policy"):
        parse_spec({**base, "drift": {"detector": "kswin", "policy": "retrain"}})
    with pytest.raises(SpecError, match="stat_size"):
        parse_spec({**base, "drift": {"detector": "kswin", "kswin": {"window_size": 10, "stat_size": 10}}})
    assert parse_spec(base).drift.detector == "none"  # off by default: today's behaviour


# --------------------------------------------------------------- policies, in memory


def test_boost_raises_the_learning_rate_and_decays_back():
    spec = small_spec(detector="adwin", policy="boost", boost={"factor": 4, "records": 100})
    backend = NumpyBackend()
    learner = OnlineLearner(spec, backend)
    lrs = []
    records = flipping_stream(800, 300)
    for i in range(0, 800, 10):
        out = learner.process(records[i:i + 10])
        lrs.append((i, backend.lr, [e["type"] for e in out.events]))
    drift_at = next(i for i, _, ev in lrs if "drift" in ev)
    assert drift_at >= 300
    after = [lr for i, lr, _ in lrs if i >= drift_at]
    assert after[0] == pytest.approx(0.05 * (1 + 3 * 0.9))  # boosted, one batch (10 of 100 records) decayed
    assert after[10] == pytest.approx(0.05)  # back to model.optimizer.lr after 100 records


def test_reset_optimizer_policy_zeroes_the_optimizer_state_and_keeps_the_weights():
    spec = small_spec(detector="adwin", policy="reset-optimizer")
    seen = []

    class Watching(NumpyBackend):
        def set_state(self, state):
            seen.append((np.abs(state["optim/W.momentum"]).sum(), state["model/W"].copy(), self.W.copy()))
            super().set_state(state)

    learner = OnlineLearner(spec, Watching())
    _, events = run_learner(learner, flipping_stream(800, 300), 10)
    assert [e["type"] for e in events].count("drift") == len(seen) >= 1
    momentum, new_w, old_w = seen[0]
    assert momentum == 0 and np.array_equal(new_w, old_w)
    assert learner.policy.n_resets == len(seen)


@pytest.mark.parametrize(("init", "margin"), [("fresh", 0.05), ("clone", 0.0)])
def test_challenger_is_promoted_after_the_drift(init, margin):
    spec = small_spec(detector="adwin", policy="challenger",
                      challenger={"init": init, "window": 100, "min_records": 100, "margin": margin})
    learner = OnlineLearner(spec, NumpyBackend())
    champion = learner.backend
    _, events = run_learner(learner, flipping_stream(1500, 500), 10)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["drift", "challenger_started", "promotion"], kinds
    promo = events[2]
    assert promo["at"] - events[1]["at"] >= 100 - 10  # min_records (less the batch the challenger started in)
    assert promo["challenger"] <= promo["champion"] - margin and promo["challenger_records"] >= 100
    assert learner.backend is not champion and learner.generation == 1
    assert learner.snapshot()["n_promotions"] >= 1


def test_challenger_that_does_not_win_is_dropped():
    spec = small_spec(detector="adwin", policy="challenger",
                      challenger={"window": 50, "min_records": 50, "margin": 0.9, "max_records": 200})
    learner = OnlineLearner(spec, NumpyBackend())
    _, events = run_learner(learner, flipping_stream(1200, 400), 10)
    kinds = [e["type"] for e in events]
    assert "promotion" not in kinds and "challenger_dropped" in kinds
    assert learner.generation == 0 and not learner.policy.challenger.active


POLICY_STATES = [
    ({"detector": "adwin", "policy": "none"}, None),
    ({"detector": "page_hinkley", "policy": "boost", "page_hinkley": {"threshold": 10},
      "boost": {"factor": 3, "records": 400}}, "policy/boost"),
    ({"detector": "kswin", "policy": "reset-optimizer", "kswin": {"alpha": 0.001}}, "policy/resets"),
    ({"detector": "adwin", "policy": "challenger", "challenger": {"window": 300, "min_records": 300}},
     "policy/challenger/backend/model/W"),
    ({"detector": "adwin", "signal": "loss", "policy": "challenger", "clear_replay": True,
      "challenger": {"init": "clone", "window": 300, "min_records": 300}}, "policy/challenger/backend/model/W"),
]


@pytest.mark.parametrize(("drift", "key"), POLICY_STATES, ids=[d["policy"] + "-" + d["detector"] for d, _ in
                                                                POLICY_STATES])
@pytest.mark.parametrize("replay_mode", ["recent", "reservoir"])
def test_state_roundtrip_mid_policy_continues_identically(drift, key, replay_mode):
    spec = small_spec(**drift)
    spec = spec.model_copy(update={"learn": spec.learn.model_copy(update={"replay": 4, "replay_buffer": 50,
                                                                          "replay_mode": replay_mode})})
    records = flipping_stream(1400, 400)
    a = OnlineLearner(spec, NumpyBackend())
    _, events = run_learner(a, records[:520], 8)
    assert any(e["type"] == "drift" for e in events), "the cut should come after a detection"
    state = through_safetensors(a.state_dict())
    assert all(v.dtype != object for v in state.values())
    assert "drift/meta" in state and (key is None or key in state), sorted(state)
    if drift["policy"] == "boost":
        assert state["policy/boost"][0] > 0  # the cut is inside the boost
    b = OnlineLearner(spec, NumpyBackend())
    b.load_state_dict(state)
    assert b.snapshot() == pytest.approx(a.snapshot())
    for i in range(520, len(records), 8):
        oa, ob = a.process(records[i:i + 8]), b.process(records[i:i + 8])
        assert oa.predictions == ob.predictions and oa.loss == ob.loss and oa.events == ob.events
    assert a.snapshot() == pytest.approx(b.snapshot()) and a.generation == b.generation


def test_real_backend_challenger_state_roundtrip():
    spec = example_spec("agrawal_drift.yaml", backend="torch")
    spec = spec.model_copy(update={"drift": DriftSpec.model_validate({
        **spec.drift.model_dump(), "policy": "challenger",
        "challenger": {"window": 200, "min_records": 200, "margin": 0.0}})})
    records = river_records("river:drift.agrawal?position=800", 1300)
    a = OnlineLearner(spec, make_backend("torch"))
    _, events = run_learner(a, records[:904], 8)
    assert [e["type"] for e in events] == ["drift", "challenger_started"] and a.policy.challenger.active
    b = OnlineLearner(spec, make_backend("torch"))
    b.load_state_dict(through_safetensors(a.state_dict()))
    _, ea = run_learner(a, records[904:], 8, 904)
    _, eb = run_learner(b, records[904:], 8, 904)
    assert ea == eb and "promotion" in [e["type"] for e in ea]
    assert a.snapshot() == pytest.approx(b.snapshot())


# ------------------------------------------------------------- backends' runtime lr


@pytest.mark.parametrize("backend_name", ["torch", "tensorflow"])
def test_set_learning_rate_changes_the_next_step(backend_name):
    x = np.ones((4, 2), np.float32)
    y = np.array([0, 1, 1, 1])
    b = make_backend(backend_name)
    b.build(ModelSpec(kind="linear", optimizer={"name": "sgd", "lr": 0.1}), 2, 2, "classification")
    s0 = b.get_state()
    b.train_step(x, y)
    d1 = b.get_state()["model/0.kernel"] - s0["model/0.kernel"]
    b.set_state(s0)
    b.set_learning_rate(1.0)
    b.train_step(x, y)
    d2 = b.get_state()["model/0.kernel"] - s0["model/0.kernel"]
    np.testing.assert_allclose(d2, 10 * d1, rtol=1e-4)


def test_reset_optimizer_equals_a_fresh_optimizer():
    spec = ModelSpec(kind="mlp", hidden=[8], optimizer={"name": "adam", "lr": 0.01})
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 3)).astype(np.float32), rng.integers(0, 2, 16)
    a = make_backend("torch")
    a.build(spec, 3, 2, "classification")
    for _ in range(5):
        a.train_step(x, y)
    fresh = make_backend("torch")
    fresh.build(spec, 3, 2, "classification")
    fresh.set_state({**fresh.get_state(), **{k: v for k, v in a.get_state().items() if k.startswith("model/")}})
    reset_optimizer(a)
    assert a.train_step(x, y) == fresh.train_step(x, y)
    for k, v in a.get_state().items():
        np.testing.assert_array_equal(v, fresh.get_state()[k], err_msg=k)


# ---------------------------------------------------------- through the pipeline


def _drift_spec(topic_factory, policy: str, backend: str = "torch", **drift) -> PipelineSpec:
    base = example_spec("agrawal_drift.yaml", backend=backend)
    src = topic_factory(1, prefix="agrawal")
    d = base.drift.model_copy(update={"policy": policy, **drift})
    return base.model_copy(update={
        "name": f"drift-{policy}-{src[-6:]}", "source": base.source.model_copy(update={"topic": src}),
        "sink": base.sink.model_copy(update={"topic": src + ".pred"}), "drift": d,
        "batch": base.batch.model_copy(update={"max_size": 8, "max_wait_ms": 5}),
    })


# Agrawal function 0 -> 2, abrupt at record 1000 of 2000 (the river:drift.agrawal preset,
# shortened to keep the suite fast); detections must come after it, within the bound.
PIPE_DRIFT, PIPE_N = 1000, 2000


@pytest.mark.parametrize("policy", ["none", "boost", "reset-optimizer", "challenger"])
def test_policies_through_the_pipeline(policy, kafka_config, topic_factory, monkeypatch):
    spec = _drift_spec(topic_factory, policy)
    if policy == "challenger":  # promotions are announced as model versions (unsigned: a local test)
        monkeypatch.delenv("TENSORSTREAM_MODELS_HMAC_KEY", raising=False)
        spec = spec.model_copy(update={"versions": spec.versions.model_copy(
            update={"promote": "every_checkpoint", "allow_unsigned": True})})
    produce_records(kafka_config, f"river:drift.agrawal?position={PIPE_DRIFT}", spec.source.topic, limit=PIPE_N)
    pipe = Pipeline(spec, kafka_config)
    result = pipe.run(until_end=True, timeout=240)
    assert result.records == PIPE_N and result.bad == 0 and result.metrics["n_learned"] == PIPE_N
    assert result.metrics["accuracy"] > 0.65, result.metrics
    events = [orjson.loads(m.value()) for m in read_topic(kafka_config, pipe.events_topic, len(pipe.drift_events))]
    assert events == pipe.drift_events
    drifts = [e for e in events if e["type"] == "drift"]
    assert drifts, events
    for e in drifts:
        assert e["source"]["topic"] == spec.source.topic and e["source"]["partition"] == 0
        assert PIPE_DRIFT <= e["source"]["offset"] < PIPE_N
        assert e["detector"] == "adwin" and e["policy"] == policy and e["pipeline"] == spec.name
    assert drifts[0]["source"]["offset"] < PIPE_DRIFT + AGRAWAL_BOUND
    assert result.metrics["n_drifts"] == len(drifts)
    if policy == "challenger":
        promos = [e for e in events if e["type"] == "promotion"]
        assert promos and promos[0]["source"]["offset"] > drifts[0]["source"]["offset"], events
        assert promos[0]["model_version"].endswith("+g1") and result.model_version.startswith(spec.name + "@")
        # The promotion was checkpointed at once and announced through the registry.
        anns = ModelRegistry(kafka_config, spec.name, None, allow_unsigned=True).history()
        assert any(a.metrics.get("n_promotions", 0) >= 1 for a in anns), [a.metrics for a in anns]
