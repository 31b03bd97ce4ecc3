"""The online learner: test-then-train over micro-batches of records.

:class:`OnlineLearner` is the whole learning loop minus Kafka: give it a batch
of records, it returns one prediction per record. With ``train=True`` it does
progressive validation as River defines it: every record is first **predicted**
with the model as it was before the batch, the prediction is **scored** into the
prequential metrics, and only then is the batch **learned** (one
``backend.train_step``). So the reported accuracy is an honest out-of-sample
estimate.

>>> from tensorstream.spec import PipelineSpec
>>> from tensorstream.learn.learner import _ConstantBackend  # a stand-in; real ones: make_backend()
>>> spec = PipelineSpec.model_validate({
...     "source": {"topic": "in"}, "sink": {"topic": "out"},
...     "features": {"numeric": ["*"]},
...     "label": {"field": "y", "classes": [False, True]},
... })
>>> learner = OnlineLearner(spec, _ConstantBackend())
>>> out = learner.process([{"a": 1.0, "y": True}, {"a": 2.0, "y": False}, {"a": "x", "y": True}])
>>> out.predictions
[{'label': True, 'proba': [0.25, 0.75]}, {'label': True, 'proba': [0.25, 0.75]}, None]
>>> [(b.index, b.error_type) for b in out.bad], out.n_learned, learner.n_learned
([(2, 'wrong_type')], 2, 2)
>>> learner.snapshot()["accuracy"]
0.5
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorstream.backends.base import Backend
from tensorstream.features.labels import LabelEncoder
from tensorstream.features.records import BadRecord
from tensorstream.features.state import from_json_array, json_array, prefixed, unprefixed
from tensorstream.features.transform import FeaturePipeline
from tensorstream.learn.delayed import LabelJoin, Match
from tensorstream.learn.drift import DriftMonitor, signal_values
from tensorstream.learn.metrics import PrequentialMetrics
from tensorstream.learn.policies import make_policy
from tensorstream.spec import PipelineSpec

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    """What one batch produced.

    ``predictions[i]`` belongs to input record ``i``: ``{"label": <original
    label>, "proba": [p_0, ..., p_{n_outputs-1}]}`` for classification (``proba``
    in class-index order, see ``OnlineLearner.classes``), ``{"value": float}``
    for regression, ``None`` for a bad record. ``bad`` lists the bad records
    (feature or label problems; they were neither scored nor learned).
    ``unlabelled`` are indices predicted but not scored/learned because the label
    field was absent. ``loss`` is the train-step loss (None when nothing was
    learned), ``n_learned`` the number of records learned from this batch.
    """

    predictions: list[dict[str, Any] | None]
    bad: list[BadRecord] = field(default_factory=list)
    loss: float | None = None
    n_learned: int = 0
    n_scored: int = 0
    unlabelled: list[int] = field(default_factory=list)
    #: drift / challenger events (``type``: drift, challenger_started, promotion,
    #: challenger_dropped); ``index`` (when present) is the input record that
    #: revealed it
    events: list[dict[str, Any]] = field(default_factory=list)


class OnlineLearner:
    """Features + labels + backend + prequential metrics, driven batch by batch.

    Parameters
    ----------
    spec
        The pipeline spec (``features``, ``label``, ``model``, ``metrics_window``).
    backend
        Any :class:`~tensorstream.backends.base.Backend`; the model is built
        lazily on the first good batch, when the feature width is known.
    history_every
        Record ``(records scored, windowed accuracy / MAE)`` every this many
        scored records (see :attr:`history`).
    replay
        Experience replay: each train step also learns this many records drawn
        (seeded, uniformly) from a buffer of the last ``replay_buffer`` learned
        records. It never touches the test half of test-then-train (a record is
        always predicted before it is first learned); it only lets a small model
        see the recent past more than once, which is what a single pass over a
        small stream lacks. ``None`` takes ``spec.learn.replay`` when the spec
        has that section, else 0 (off).
    replay_buffer
        Capacity of the replay buffer, in records (``None``: from the spec, else 1000).
    backend_factory
        Makes another, unbuilt backend of the same kind (the ``challenger``
        drift policy trains a second model); default ``type(backend)()``.

    Concept drift (spec ``drift``, :mod:`tensorstream.learn.drift`): every
    scored record's error (or loss) feeds a drift detector; a detection is a
    ``drift`` event in :attr:`BatchOutcome.events` and triggers the spec's
    policy (:mod:`tensorstream.learn.policies`). Delayed labels (spec
    ``labels``): :meth:`process_features` predicts, :meth:`process_labels`
    scores the stored predictions and learns (:mod:`tensorstream.learn.delayed`).
    """

    def __init__(
        self,
        spec: PipelineSpec,
        backend: Backend,
        *,
        history_every: int = 100,
        replay: int | None = None,
        replay_buffer: int | None = None,
        backend_factory: Callable[[], Backend] | None = None,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.backend_factory: Callable[[], Backend] = backend_factory or type(backend)
        learn_spec = getattr(spec, "learn", None)  # forward-compatible with a `learn:` spec section
        if replay is None:
            replay = int(getattr(learn_spec, "replay", 0) or 0)
        if replay_buffer is None:
            replay_buffer = int(getattr(learn_spec, "replay_buffer", 1000) or 1000)
        if replay < 0 or replay_buffer < 1:
            raise ValueError("replay must be >= 0 and replay_buffer >= 1")
        self.replay = _ReplayBuffer(replay, replay_buffer, seed=spec.model.seed,
                                    mode=str(getattr(learn_spec, "replay_mode", "recent")))
        label_field = spec.label.field if spec.label else None
        self.features = FeaturePipeline(spec.features, label_field=label_field)
        self.labels = LabelEncoder(spec.label) if spec.label else None
        self.metrics = (
            PrequentialMetrics(spec.label.task, spec.label.n_outputs, spec.metrics_window, history_every)
            if spec.label
            else None
        )
        self.built = False
        # an infer-only spec has no label section: task and class names come from the checkpoint
        self._task = spec.label.task if spec.label else "classification"
        self._loaded_classes: list[Any] = []
        self.n_learned = 0  # records learned (the persisted lineage's exactly-once counter)
        self.n_seen = 0  # records given to process()/predict()
        self.n_bad = 0
        self.n_unlabelled = 0
        drift_spec = getattr(spec, "drift", None)
        if drift_spec is None:
            from tensorstream.spec import DriftSpec

            drift_spec = DriftSpec()
        self.drift = DriftMonitor(drift_spec, self._task)
        self.policy = make_policy(drift_spec)
        self.generation = 0  # champions promoted so far (challenger policy)
        labels_spec = getattr(spec, "labels", None)
        self.join = LabelJoin(labels_spec.window) if labels_spec is not None else None

    # ------------------------------------------------------------- properties

    @property
    def task(self) -> str:
        return self._task

    @property
    def classes(self) -> list[Any]:
        """Known classes in index order (the meaning of ``proba``)."""
        return self.labels.classes if self.labels else list(self._loaded_classes)

    @property
    def history(self) -> list[tuple[int, float]]:
        """``[(records scored, windowed accuracy or MAE), ...]``, for plots."""
        return list(self.metrics.history) if self.metrics else []

    def snapshot(self) -> dict[str, float]:
        """Prequential metrics (see ``learn.metrics``) plus record counters."""
        out = self.metrics.snapshot() if self.metrics else {}
        out.update(
            n_seen=float(self.n_seen),
            n_learned=float(self.n_learned),
            n_bad=float(self.n_bad),
            n_unlabelled=float(self.n_unlabelled),
        )
        out.update(self.drift.snapshot())
        out.update(self.policy.snapshot())
        if self.join is not None:
            out.update(self.join.snapshot())
        return out

    # -------------------------------------------------------------- the loop

    def _ensure_built(self) -> None:
        if self.built:
            return
        if self.spec.label is None:
            raise RuntimeError("no model yet: a spec without a 'label' section needs a checkpoint (load_state_dict)")
        n_features = self.features.n_features
        assert n_features is not None
        self.build_backend(self.backend)
        self.built = True

    def build_backend(self, backend: Backend) -> None:
        """Build ``backend`` as the champion is built (a challenger's, too)."""
        assert self.spec.label is not None
        n_features = self.features.n_features
        assert n_features is not None
        backend.build(self.spec.model, n_features, self.spec.label.n_outputs, self.spec.label.task)

    def signal_of(self, y: np.ndarray, P: np.ndarray) -> np.ndarray:
        """The drift signal (see ``learn.drift``) of predictions ``P`` (backend output) for ``y``."""
        if self.task == "regression":
            return signal_values(self.task, self.drift.signal, y, P[:, 0], None)
        n_known = self.labels.n_known if self.labels else P.shape[1]
        yhat = np.argmax(P[:, :n_known], axis=1) if n_known else np.full(len(P), -1)
        return signal_values(self.task, self.drift.signal, y, yhat, P)

    def promote(self, backend: Backend) -> None:
        """Make ``backend`` (a built challenger) the champion; the detector starts afresh."""
        self.backend = backend
        self.generation += 1
        self.drift.reset()

    def _predictions(self, P: np.ndarray, n_known: int) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Backend output -> JSON-able predictions, plus predicted indices (or values)."""
        if self.task == "regression":
            values = P[:, 0].astype(np.float64)
            return [{"value": v} for v in values.tolist()], values
        # Only classes known *before* this batch can be predicted: a class first
        # seen in this batch must not be handed to its own prediction.
        if n_known > 0:
            idx = np.argmax(P[:, :n_known], axis=1)
        else:
            idx = np.full(len(P), -1, dtype=np.int64)
        classes = self.classes
        preds = [
            {"label": classes[i] if 0 <= i < len(classes) else None, "proba": row}
            for i, row in zip(idx.tolist(), P.astype(np.float64).tolist(), strict=True)
        ]
        return preds, idx

    def process(self, records: Sequence[Any], train: bool = True) -> BatchOutcome:
        """Test-then-train one batch; ``train=False`` scores without learning."""
        if self.labels is None or self.metrics is None:
            raise RuntimeError("process() needs a spec with a 'label' section; use predict()")
        n = len(records)
        self.n_seen += n
        predictions: list[dict[str, Any] | None] = [None] * n
        parsed = self.features.parse(records)
        bad = list(parsed.bad)
        # Labels of the records whose features parsed. A class set grows here even
        # with train=False: that only names an output slot, it teaches no weights.
        n_known = self.labels.n_known
        y, lgood, lbad = self.labels.encode_batch([records[i] for i in parsed.good_idx], update=True)
        keep = np.ones(len(parsed), dtype=bool)
        unlabelled_rows = []
        for b in lbad:
            if b.error_type == "missing_field":
                unlabelled_rows.append(b.index)  # predict it, but nothing to score or learn
            else:
                keep[b.index] = False
                bad.append(b.at(int(parsed.good_idx[b.index])))
        labelled = np.zeros(len(parsed), dtype=bool)
        labelled[lgood] = True
        labelled = labelled[keep]
        y_rows = np.full(len(parsed), 0, dtype=y.dtype)
        y_rows[lgood] = y
        y = y_rows[keep][labelled]
        good_idx = parsed.good_idx[keep]
        bad.sort(key=lambda b: b.index)
        unlabelled = sorted(int(parsed.good_idx[r]) for r in unlabelled_rows)
        self.n_bad += len(bad)
        self.n_unlabelled += len(unlabelled)

        # Feature statistics learn from the batch (unsupervised) before it is
        # transformed; see FeaturePipeline.transform_parsed.
        X = self.features.transform_parsed(parsed, keep, update=train)
        if len(X) == 0:
            return BatchOutcome(predictions, bad, None, 0, 0, unlabelled)
        self._ensure_built()

        # 1. test: predict with the model as it was before this batch
        P = np.asarray(self.backend.predict(X))
        preds, yhat = self._predictions(P, n_known)
        for i, p in zip(good_idx.tolist(), preds, strict=True):
            predictions[i] = p
        # 2. score, 3. train
        n_scored = int(labelled.sum())
        loss, n_learned, events = self._score_and_learn(
            X[labelled], y, P[labelled], yhat[labelled], good_idx[labelled], train)
        return BatchOutcome(predictions, bad, loss, n_learned, n_scored, unlabelled, events)

    def _score_and_learn(self, X: np.ndarray, y: np.ndarray, P: np.ndarray, yhat: np.ndarray,
                         where: np.ndarray, train: bool) -> tuple[float | None, int, list[dict[str, Any]]]:
        """Score predictions made earlier (``P``/``yhat`` for ``X``) against ``y``, watch for
        drift, then learn ``X, y``. ``where[i]``: the input record behind row ``i``."""
        assert self.metrics is not None
        n_scored = len(y)
        events: list[dict[str, Any]] = []
        if not n_scored:
            return None, 0, events
        if self.task == "regression":
            self.metrics.update(y, yhat)
        else:
            self.metrics.update(y, yhat, P)
        signal = np.zeros(0)
        if self.drift.enabled:
            signal = signal_values(self.task, self.drift.signal, y, yhat, None if self.task == "regression" else P)
            for ev in self.drift.update(signal):
                events.append({"type": "drift", **ev.to_dict(), "index": int(where[ev.index]),
                               "policy": self.policy.name, "n_learned": self.n_learned})
                log.info("drift detected by %s after %d scored records: %s %.4f -> %.4f (policy %s)",
                         ev.detector, ev.n_seen, ev.metric, ev.before, ev.after, self.policy.name)
                if self.drift.spec.clear_replay:
                    self.replay.clear()
                events += [{**e, "index": int(where[ev.index])} for e in self.policy.on_drift(self, ev)]
        if not train:
            return None, 0, events
        xb, yb = X, y
        rx, ry = self.replay.sample()  # drawn before this batch joins the buffer
        self.replay.add(xb, yb)
        if len(rx):
            xb, yb = np.concatenate([xb, rx]), np.concatenate([yb, ry])
        xb = np.ascontiguousarray(xb)
        loss = float(self.backend.train_step(xb, yb))
        self.n_learned += n_scored
        if self.drift.enabled:
            events += [{**e, "index": int(where[-1])}
                       for e in self.policy.after_learn(self, np.ascontiguousarray(X), signal, xb, yb, n_scored)]
        return loss, n_scored, events

    # ---------------------------------------------------------- delayed labels

    def process_features(self, records: Sequence[Any], keys: Sequence[Any], train: bool = True) -> BatchOutcome:
        """Delayed labels, step 1: predict ``records`` now and keep each prediction, under
        ``keys[i]``, for its label (a label already waiting completes it at once).

        A label field in these records is ignored: labels come through
        :meth:`process_labels`. ``unlabelled`` lists the records left waiting.
        """
        if self.join is None or self.labels is None or self.metrics is None:
            raise RuntimeError("process_features() needs a spec with 'label' and 'labels' sections")
        n = len(records)
        self.n_seen += n
        predictions: list[dict[str, Any] | None] = [None] * n
        X, good_idx, bad = self.features.transform_batch(records, update=train)
        self.n_bad += len(bad)
        if len(X) == 0:
            return BatchOutcome(predictions, bad)
        self._ensure_built()
        P = np.asarray(self.backend.predict(X))
        preds, yhat = self._predictions(P, self.labels.n_known)
        for i, pr in zip(good_idx.tolist(), preds, strict=True):
            predictions[i] = pr
        matches = self.join.add_features([keys[i] for i in good_idx.tolist()], X, P, yhat)
        for m in matches:
            m.index = int(good_idx[m.index])
        loss, n_learned, events = self._learn_matches(matches, train)
        matched = {m.index for m in matches}
        waiting = [i for i in good_idx.tolist() if i not in matched]
        return BatchOutcome(predictions, bad, loss, n_learned, len(matches), waiting, events)

    def process_labels(self, keys: Sequence[Any], values: Sequence[Any], train: bool = True) -> BatchOutcome:
        """Delayed labels, step 2: label values (as in records' label field) for ``keys``.

        Each label that completes a waiting prediction scores *that* prediction
        (made when the features came) and the record is learned. ``predictions``
        is empty; ``bad`` are label values that are not valid labels.
        """
        if self.join is None or self.labels is None or self.metrics is None:
            raise RuntimeError("process_labels() needs a spec with 'label' and 'labels' sections")
        field_name = self.labels.field
        y, good, bad = self.labels.encode_batch([{field_name: v} for v in values], update=True)
        self.n_bad += len(bad)
        good_list = good.tolist()
        matches = self.join.add_labels([keys[i] for i in good_list], y)
        for m in matches:
            m.index = int(good_list[m.index])
        loss, n_learned, events = self._learn_matches(matches, train)
        return BatchOutcome([], bad, loss, n_learned, len(matches), [], events)

    def _learn_matches(self, matches: list[Match], train: bool) -> tuple[float | None, int, list[dict[str, Any]]]:
        if not matches:
            return None, 0, []
        if not self.built:  # restored from an unbuilt checkpoint while predictions were pending
            self._ensure_built()
        X = np.stack([m.x for m in matches]).astype(np.float32)
        P = np.stack([m.p for m in matches]).astype(np.float32)
        if self.task == "regression":
            y = np.array([m.y for m in matches], dtype=np.float32)
            yhat = np.array([m.yhat for m in matches], dtype=np.float64)
        else:
            y = np.array([m.y for m in matches], dtype=np.int64)
            yhat = np.array([m.yhat for m in matches], dtype=np.int64)
        where = np.array([m.index for m in matches], dtype=np.int64)
        return self._score_and_learn(X, y, P, yhat, where, train)

    def predict(self, records: Sequence[Any]) -> BatchOutcome:
        """Inference only: no metric, feature-statistic, vocabulary or weight change."""
        n = len(records)
        self.n_seen += n
        predictions: list[dict[str, Any] | None] = [None] * n
        X, good_idx, bad = self.features.transform_batch(records, update=False)
        self.n_bad += len(bad)
        if len(X) == 0:
            return BatchOutcome(predictions, bad)
        self._ensure_built()
        preds, _ = self._predictions(np.asarray(self.backend.predict(X)), len(self.classes))
        for i, p in zip(good_idx.tolist(), preds, strict=True):
            predictions[i] = p
        return BatchOutcome(predictions, bad)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole learner as named arrays.

        ``backend/<backend key>`` (weights + optimizer, only once built),
        ``features/...``, ``labels/classes``, ``metrics/...``, ``replay/...``
        (buffer and sampler state; empty when replay is off) and
        ``learner/n_learned``, ``learner/counters`` (int64: seen, bad,
        unlabelled), ``learner/meta`` (JSON: built, n_features, n_outputs, task).
        """
        state: dict[str, np.ndarray] = {}
        if self.built:
            state.update(prefixed("backend", self.backend.get_state()))
        state.update(prefixed("features", self.features.state_dict()))
        if self.labels is not None:
            state.update(prefixed("labels", self.labels.state_dict()))
        if self.metrics is not None:
            state.update(prefixed("metrics", self.metrics.state_dict()))
        state.update(prefixed("replay", self.replay.state_dict()))
        state.update(prefixed("drift", self.drift.state_dict()))
        state.update(prefixed("policy", self.policy.state_dict()))
        if self.join is not None:
            state.update(prefixed("join", self.join.state_dict()))
        state["learner/n_learned"] = np.array([self.n_learned], dtype=np.int64)
        state["learner/counters"] = np.array([self.n_seen, self.n_bad, self.n_unlabelled], dtype=np.int64)
        state["learner/meta"] = json_array(
            {
                "built": self.built,
                "n_features": self.features.n_features if self.built else None,
                "n_outputs": self.spec.label.n_outputs if self.spec.label else None,
                "task": self.task,
                "generation": self.generation,
            }
        )
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`; the learner then continues identically."""
        meta = from_json_array(state["learner/meta"])
        self.features.load_state_dict(unprefixed("features", state))
        if self.labels is not None:
            self.labels.load_state_dict(unprefixed("labels", state))
        elif "labels/classes" in state:
            self._loaded_classes = list(from_json_array(state["labels/classes"]))
        self._task = meta["task"]
        if self.metrics is not None and any(k.startswith("metrics/") for k in state):
            self.metrics.load_state_dict(unprefixed("metrics", state))
        self.replay.load_state_dict(unprefixed("replay", state))
        self.n_learned = int(np.asarray(state["learner/n_learned"]).reshape(-1)[0])
        self.n_seen, self.n_bad, self.n_unlabelled = (int(v) for v in np.asarray(state["learner/counters"]))
        self.built = False
        if meta["built"]:
            if meta["n_features"] != self.features.n_features:
                raise ValueError(
                    f"checkpoint model has {meta['n_features']} inputs, the features give {self.features.n_features}"
                )
            n_outputs = meta["n_outputs"]
            if self.spec.label is not None and n_outputs != self.spec.label.n_outputs:
                raise ValueError(f"checkpoint model has {n_outputs} outputs, the spec gives {self.spec.label.n_outputs}")
            self.backend.build(self.spec.model, meta["n_features"], n_outputs, meta["task"])
            self.backend.set_state(unprefixed("backend", state))
            self.built = True
        self.generation = int(meta.get("generation", 0))
        self.drift.load_state_dict(unprefixed("drift", state))
        if self.join is not None:
            self.join.load_state_dict(unprefixed("join", state))
        self.policy.load_state_dict(self, unprefixed("policy", state))
        self.policy.on_restore(self)


class _ReplayBuffer:
    """The last ``capacity`` learned rows (features as transformed then) and a seeded sampler."""

    def __init__(self, k: int, capacity: int, seed: int, mode: str = "recent") -> None:
        if mode not in ("recent", "reservoir"):
            raise ValueError(f"replay mode must be 'recent' or 'reservoir', not {mode!r}")
        self.k = k
        self.capacity = capacity
        self.mode = mode
        self._rng = np.random.default_rng(seed)
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._size = 0
        self._pos = 0  # next write position (ring)
        self._added = 0  # rows ever offered (reservoir)

    def clear(self) -> None:
        """Forget every row (e.g. on concept drift); the sampler's state goes on."""
        self._size = self._pos = self._added = 0

    def __len__(self) -> int:
        return self._size

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if not self.k or not len(x):
            return
        if self._x is None:
            self._x = np.zeros((self.capacity, x.shape[1]), dtype=np.float32)
            self._y = np.zeros(self.capacity, dtype=y.dtype)
        assert self._y is not None
        if self.mode == "reservoir":  # Vitter's algorithm R: a uniform sample of every row offered
            for xi, yi in zip(x, y, strict=True):
                self._added += 1
                if self._size < self.capacity:
                    slot = self._size
                    self._size += 1
                else:
                    slot = int(self._rng.integers(0, self._added))
                    if slot >= self.capacity:
                        continue
                self._x[slot], self._y[slot] = xi, yi
            return
        for xi, yi in zip(x[-self.capacity :], y[-self.capacity :], strict=True):
            self._x[self._pos], self._y[self._pos] = xi, yi
            self._pos = (self._pos + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.k or not self._size:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0)
        assert self._x is not None and self._y is not None
        idx = self._rng.integers(0, self._size, size=self.k)
        return self._x[idx], self._y[idx]

    def state_dict(self) -> dict[str, np.ndarray]:
        """``rng`` (JSON sampler state), ``x``/``y`` (filled rows, ring order), ``pos``."""
        if not self.k:
            return {}
        state = {"rng": json_array(self._rng.bit_generator.state), "pos": np.array([self._pos], dtype=np.int64)}
        if self.mode == "reservoir":
            state["added"] = np.array([self._added], dtype=np.int64)
        if self._size:
            assert self._x is not None and self._y is not None
            state["x"], state["y"] = self._x[: self._size].copy(), self._y[: self._size].copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._x, self._y, self._size, self._pos = None, None, 0, 0
        if not self.k:
            return
        if "rng" in state:
            self._rng.bit_generator.state = from_json_array(state["rng"])
        if "x" in state:
            x, y = np.asarray(state["x"], dtype=np.float32), np.asarray(state["y"])
            if len(x) > self.capacity:
                raise ValueError(f"replay buffer state has {len(x)} rows, the capacity is {self.capacity}")
            self._x = np.zeros((self.capacity, x.shape[1]), dtype=np.float32)
            self._y = np.zeros(self.capacity, dtype=y.dtype)
            self._x[: len(x)], self._y[: len(x)] = x, y
            self._size = len(x)
            self._pos = int(np.asarray(state["pos"]).reshape(-1)[0]) % self.capacity
        self._added = int(np.asarray(state.get("added", [self._size])).reshape(-1)[0])


class _ConstantBackend:
    """A backend that always predicts the same probabilities (for the examples)."""

    name = "constant"

    def build(self, model: Any, n_features: int, n_outputs: int, task: str) -> None:
        self.n_outputs = n_outputs

    def predict(self, x: np.ndarray) -> np.ndarray:
        p = np.full((len(x), self.n_outputs), 1.0, dtype=np.float32)
        p[:, -1] = 3.0
        return p / p.sum(axis=1, keepdims=True)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        return 0.0

    def get_state(self) -> dict[str, np.ndarray]:
        return {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        pass
