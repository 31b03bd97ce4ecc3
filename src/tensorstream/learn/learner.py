"""The online learner: test-then-train over micro-batches of records.

:class:`OnlineLearner` is the whole learning loop minus Kafka: give it a batch
of records, it returns one prediction per record. With ``train=True`` it does
progressive validation as River defines it: every record is first **predicted**,
the prediction is **scored** into the prequential metrics, and the record is
**learned**. How (spec ``learn.learning``):

- ``per_record`` (default): each record is predicted by the model that learned
  every record before it, in the same batch too, then learned with its own
  optimizer step, all in one compiled call per batch
  (:mod:`tensorstream.learn.sequence`): the batch size changes the speed, not
  what is learned;
- ``mini_batch``: the batch is predicted by the model as it was before the
  batch, then learned in one ``backend.train_step`` (one step per batch).

Either way the reported accuracy is an honest out-of-sample estimate.

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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tensorstream.backends.base import Backend
from tensorstream.features.labels import LabelEncoder
from tensorstream.features.records import BadRecord
from tensorstream.features.scaler import RunningStandardizer
from tensorstream.features.transform import FeaturePipeline
from tensorstream.learn.delayed import LabelJoin, features_step, labels_step
from tensorstream.learn.drift import DriftMonitor, signal_values
from tensorstream.learn.keyed import keyed_options, keyed_snapshot, labels_of
from tensorstream.learn.metrics import PrequentialMetrics
from tensorstream.learn.outcome import BatchOutcome
from tensorstream.learn.policies import make_policy
from tensorstream.learn.replay import ReplayBuffer
from tensorstream.learn.sequence import predicted_index
from tensorstream.learn.state import learner_state, load_learner_state
from tensorstream.learn.steps import after_learn, learn_batch, learn_in_turn, score
from tensorstream.spec import PipelineSpec



class OnlineLearner:
    """Features + labels + backend + prequential metrics, driven batch by batch.

    Parameters
    ----------
    spec
        The pipeline spec (``features``, ``label``, ``model``, ``learn``, ``metrics_window``).
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
        small stream lacks. ``None`` takes ``spec.learn.replay``.
    replay_buffer
        Capacity of the replay buffer, in records (``None``: from the spec).
    backend_factory
        Makes another, unbuilt backend of the same kind (the ``challenger``
        drift policy trains a second model); default ``type(backend)()``.

    Concept drift (spec ``drift``, :mod:`tensorstream.learn.drift`): every
    scored record's error (or loss) feeds a drift detector; a detection is a
    ``drift`` event in :attr:`BatchOutcome.events` and triggers the spec's
    policy (:mod:`tensorstream.learn.policies`). Under per-record learning a
    policy acts once the batch is learned (up to batch size - 1 records later
    than at batch 1); the detections themselves do not depend on the batch
    size. Delayed labels (spec ``labels``): :meth:`process_features` predicts,
    :meth:`process_labels` scores the stored predictions and learns
    (:mod:`tensorstream.learn.delayed`).
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
        learn_spec = spec.learn
        replay = learn_spec.replay if replay is None else replay
        replay_buffer = learn_spec.replay_buffer if replay_buffer is None else replay_buffer
        if replay < 0 or replay_buffer < 1:
            raise ValueError("replay must be >= 0 and replay_buffer >= 1")
        self.replay = ReplayBuffer(replay, replay_buffer, seed=spec.model.seed, mode=learn_spec.replay_mode)
        self.learning = learn_spec.learning
        label_field = spec.label.field if spec.label else None
        self.features = FeaturePipeline(spec.features, label_field=label_field, **keyed_options(spec))
        self.labels = LabelEncoder(spec.label) if spec.label else None
        self.metrics = (
            PrequentialMetrics(spec.label.task, spec.label.n_outputs, spec.metrics_window, history_every)
            if spec.label
            else None
        )
        self.built = False
        # an infer-only spec has no label section: task and class names come from the checkpoint
        self._task = spec.label.task if spec.label else "classification"
        #: running standardisation of the regression target (spec ``label.standardize``); None: off
        self.target = RunningStandardizer(1) if spec.label is not None and spec.label.scales_target(spec.model) \
            else None
        self._loaded_classes: list[Any] = []
        self.n_learned = 0  # records learned (the persisted lineage's exactly-once counter)
        self.n_seen = 0  # records given to process()/predict()
        self.n_bad = 0
        self.n_unlabelled = 0
        self.drift = DriftMonitor(spec.drift, self._task)
        self.policy = make_policy(spec.drift)
        self.generation = 0  # champions promoted so far (challenger policy)
        self.join = LabelJoin(spec.labels.window) if spec.labels is not None else None

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

    @property
    def per_record(self) -> bool:
        """Whether batches are learned record by record (``learn.learning: per_record``).

        Not with a backend whose steps are collective (``sequential = False``:
        the data-parallel ones, where every rank steps in lock-step): those learn
        mini-batches whatever the spec says.
        """
        return self.learning == "per_record" and getattr(self.backend, "sequential", True) is not False

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
        out.update(keyed_snapshot(self.features))
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

    def values_of(self, P: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Regression: backend output [n, 1] -> values in the target's units (float64).

        ``stats``: per-row (mean, std) of the target scaler; default its current state.
        """
        out = P[:, 0].astype(np.float64)
        if self.target is None:
            return out
        if stats is None:
            return self.target.inverse(out[:, None])[:, 0]
        return out * stats[1] + stats[0]

    def signal_of(self, y: np.ndarray, P: np.ndarray) -> np.ndarray:
        """The drift signal (see ``learn.drift``) of predictions ``P`` (backend output) for ``y``."""
        if self.task == "regression":
            return signal_values(self.task, self.drift.signal, y, self.values_of(P), None)
        n_known = self.labels.n_known if self.labels else P.shape[1]
        return signal_values(self.task, self.drift.signal, y, predicted_index(P, n_known), P)

    def promote(self, backend: Backend) -> None:
        """Make ``backend`` (a built challenger) the champion; the detector starts afresh."""
        self.backend = backend
        self.generation += 1
        self.drift.reset()

    def _outcome(self, n: int, rows: np.ndarray, P: np.ndarray, yhat: np.ndarray, **kw: Any) -> BatchOutcome:
        """The outcome of a batch of ``n`` records whose rows ``rows`` were predicted ``P`` / ``yhat``
        (the per-record dicts of ``predictions`` are only built if someone asks for them)."""
        proba = None if self.task == "regression" else P
        return BatchOutcome(None, rows=rows, proba=proba, predicted=yhat, n_records=n, classes=list(self.classes),
                            **kw)

    def _predict_rows(self, X: np.ndarray, n_known: int) -> tuple[np.ndarray, np.ndarray]:
        """``(backend output, predicted index or value)`` with the model as it is."""
        P = np.asarray(self.backend.predict(X))
        return P, (self.values_of(P) if self.task == "regression" else predicted_index(P, n_known))

    def process(self, records: Sequence[Any], train: bool = True, keys: Sequence[Any] | None = None,
                timestamps: Sequence[Any] | None = None) -> BatchOutcome:
        """Test-then-train one batch; ``train=False`` scores without learning.

        ``keys`` / ``timestamps``: the records' Kafka keys and timestamps (ms), for the
        stateful features (``features.key: "@key"``, ``features.time: "@timestamp"``).
        """
        if self.labels is None or self.metrics is None:
            raise RuntimeError("process() needs a spec with a 'label' section; use predict()")
        n = len(records)
        self.n_seen += n
        parsed = self.features.parse(records, keys, timestamps)
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
        late, late_bad = self.features.late_rows(parsed, keep)  # state.late: dead_letter
        keep &= ~late
        bad += late_bad
        labelled = np.zeros(len(parsed), dtype=bool)
        labelled[lgood] = True
        labelled = labelled[keep]
        y_rows = np.zeros(len(parsed), dtype=y.dtype)
        y_rows[lgood] = y
        y_rows = y_rows[keep]
        good_idx = parsed.good_idx[keep]
        unlabelled = sorted(int(parsed.good_idx[r]) for r in unlabelled_rows)
        self.n_unlabelled += len(unlabelled)
        sequential = train and self.per_record
        # Feature statistics learn from the batch (unsupervised) before it is
        # transformed; see FeaturePipeline.transform_parsed.
        # Stateful features see the labels of the rows before each row (never its own); the
        # per-key state takes every kept record, learned or not (it is the stream's state).
        lab = labels_of(y_rows, labelled)
        X = (self.features.transform_parsed(parsed, keep, update=True, sequential=True, labels=lab) if sequential
             else self.features.transform_parsed(parsed, keep, update=train, labels=lab, keyed_update=True))
        if len(X) == 0:
            self.n_bad += len(bad)
            return BatchOutcome([None] * n, sorted(bad, key=lambda b: b.index), None, 0, 0, unlabelled)
        self._ensure_built()
        if sequential:
            P, yhat, loss, learned, refused, targets = learn_in_turn(self, X, y_rows, labelled, n_known)
        else:  # 1. test: predict with the model as it was before this batch
            P, yhat = self._predict_rows(X, n_known)
        # 2. score (3. learn, for mini-batches)
        scored = labelled & np.isfinite(P).all(axis=1)  # a non-finite prediction cannot be scored
        signal, events = score(self, y_rows[scored], P[scored], yhat[scored], good_idx[scored])
        if not sequential:
            loss, learned, refused = None, np.zeros(len(X), dtype=bool), np.zeros(len(X), dtype=bool)
            targets = y_rows
            if train:
                loss, ok, targets_l = learn_batch(self, X[labelled], y_rows[labelled])
                learned[labelled], refused[labelled] = ok, ~ok
                targets = np.zeros(len(X), targets_l.dtype)
                targets[labelled] = targets_l
        events += after_learn(self, X, y_rows, targets, scored, learned, signal, good_idx)
        bad += [BadRecord(int(i), "non_finite_update", "the update from this record was not finite (loss or "
                          "gradient overflow): predicted, not learned") for i in good_idx[refused].tolist()]
        self.n_bad += len(bad)
        return self._outcome(n, good_idx, P, yhat, bad=sorted(bad, key=lambda b: b.index), loss=loss,
                             n_learned=int(learned.sum()), n_scored=int(scored.sum()), unlabelled=unlabelled,
                             events=events)

    # ---------------------------------------------------------- delayed labels

    def process_features(self, records: Sequence[Any], keys: Sequence[Any], train: bool = True,
                         record_keys: Sequence[Any] | None = None,
                         timestamps: Sequence[Any] | None = None) -> BatchOutcome:
        """Delayed labels, step 1: predict ``records`` now and keep each prediction, under
        ``keys[i]``, for its label (a label already waiting completes it at once).

        A label field in these records is ignored: labels come through
        :meth:`process_labels`. ``unlabelled`` lists the records left waiting.
        ``record_keys`` / ``timestamps``: as in :meth:`process` (``keys`` are the join keys).
        """
        return features_step(self, records, keys, train, record_keys, timestamps)

    def process_labels(self, keys: Sequence[Any], values: Sequence[Any], train: bool = True) -> BatchOutcome:
        """Delayed labels, step 2: label values (as in records' label field) for ``keys``.

        Each label that completes a waiting prediction scores *that* prediction
        (made when the features came) and the record is learned. ``predictions``
        is empty; ``bad`` are label values that are not valid labels.
        """
        return labels_step(self, keys, values, train)

    def predict(self, records: Sequence[Any], keys: Sequence[Any] | None = None,
                timestamps: Sequence[Any] | None = None) -> BatchOutcome:
        """Inference only: no metric, feature-statistic, vocabulary or weight change.

        The per-key state of stateful features does advance (windows and lags follow the
        stream being served; no label reaches the label history here).
        """
        _, good_idx, bad, P, yhat = self._predict_records(records, update=False, n_known=len(self.classes),
                                                          keys=keys, timestamps=timestamps)
        if P is None:
            return BatchOutcome([None] * len(records), bad)
        return self._outcome(len(records), good_idx, P, yhat, bad=bad)

    def _predict_records(self, records: Sequence[Any], update: bool, n_known: int, keys: Sequence[Any] | None = None,
                         timestamps: Sequence[Any] | None = None) -> tuple[Any, ...]:
        """Count, transform and predict ``records`` with the model as it is:
        ``(X, good_idx, bad, P, yhat)``, ``P`` and ``yhat`` None when no record is usable."""
        self.n_seen += len(records)
        X, good_idx, bad = self.features.transform_batch(records, update=update, keys=keys, timestamps=timestamps,
                                                         keyed_update=True)
        self.n_bad += len(bad)
        if len(X) == 0:
            return X, good_idx, bad, None, None
        self._ensure_built()
        return (X, good_idx, bad, *self._predict_rows(X, n_known))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole learner as named arrays (see :func:`tensorstream.learn.state.learner_state`)."""
        return learner_state(self)

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`; the learner then continues identically.

        An inference worker (``mode: infer``) whose per-key feature state already follows
        its own stream keeps it when a new model version is loaded: the trainer's state
        is as of the trainer's offsets, not the worker's.
        """
        keyed = self.features.keyed
        if keyed is not None and self.spec.mode == "infer" and keyed.n_obs > 0:
            state = {k: v for k, v in state.items() if not k.startswith("features/keyed/")}
        load_learner_state(self, state)


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
