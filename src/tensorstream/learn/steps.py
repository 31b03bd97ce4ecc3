"""How the learner scores and learns rows: per record, or as one mini-batch.

Both keep the same books: the replay buffer (rows added once learned, raw
targets), the regression target's scaler (the model learns the standardised
target), ``learner.n_learned``; both report the rows whose update was refused
(non-finite loss or gradient, see ``backends.base.MAX_GRAD``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tensorstream.learn.drift import signal_values
from tensorstream.learn.sequence import known_before, learn_sequence, predicted_index

log = logging.getLogger(__name__)


def learn_in_turn(learner: Any, X: np.ndarray, y: np.ndarray, labelled: np.ndarray, n_known: int
                  ) -> tuple[np.ndarray, np.ndarray, float | None, np.ndarray, np.ndarray, np.ndarray]:
    """Per-record test-then-train of the rows ``X`` (only the ``labelled`` ones are learned).

    Returns ``(P, yhat, loss, learned, refused, model targets)``: the backend
    output for each row (made by the model that learned every row before it),
    the predicted class index (classes known before the row) or value (target
    units), the mean loss of the rows learned, which rows were learned, which
    were refused, and the targets the model learned.
    """
    target, stats = model_targets(learner, y, labelled)
    replay, slots = None, None
    if learner.replay.k and labelled.any():
        draws, slots = learner.replay.sample_steps(X[labelled], y[labelled])
        rx, ry, rw = (np.zeros((len(X), *a.shape[1:]), a.dtype) for a in draws)
        rx[labelled], ry[labelled], rw[labelled] = draws
        if stats is not None:  # replayed targets are kept raw: scaled like the row they are learned with
            ry = (ry - stats[0][1:, None]) / stats[1][1:, None]
        replay = (rx, ry.astype(target.dtype), rw)
    res = learn_sequence(learner.backend, X, target, labelled, replay)
    P = np.asarray(res.out)
    refused = labelled & res.skipped
    learned = labelled & ~refused
    if slots is not None and refused.any():
        learner.replay.discard(slots[refused[labelled]])
    if learner.task == "regression":
        yhat = learner.values_of(P, None if stats is None else (stats[0][:-1], stats[1][:-1]))
    else:
        yhat = predicted_index(P, known_before(y, labelled, n_known))
    loss = float(np.mean(res.loss[learned])) if learned.any() else None
    learner.n_learned += int(learned.sum())
    return P, yhat, loss, learned, refused, target


def model_targets(learner: Any, y: np.ndarray,
                  labelled: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Per-record model targets and, with target scaling, the scaler's (mean, std) before each row
    (n + 1 rows: the last is after the batch). Regression rows are scaled with the statistics
    that include them; predictions were made with those before them."""
    if learner.target is None:
        return y, None
    mean, std = learner.target.running(y[labelled, None].astype(np.float64))
    k = np.concatenate([[0], np.cumsum(labelled)])  # labelled rows before each row
    m, s = mean[k, 0], std[k, 0]
    scaled = np.zeros(len(y), dtype=np.float32)
    scaled[labelled] = (y[labelled] - m[1:][labelled]) / s[1:][labelled]
    return scaled, (m, s)


def learn_batch(learner: Any, X: np.ndarray, y: np.ndarray) -> tuple[float | None, np.ndarray, np.ndarray]:
    """One mini-batch step on ``X, y`` (plus replay); returns (loss, learned mask, model targets)."""
    if not len(X):
        return None, np.zeros(0, dtype=bool), y
    target = y
    if learner.target is not None:
        learner.target.update(y[:, None].astype(np.float64))
        target = learner.target.transform(y[:, None])[:, 0].astype(np.float32)
    xb, yb = X, target
    rx, ry = learner.replay.sample()  # drawn before this batch joins the buffer
    if len(rx):
        if learner.target is not None:  # kept raw: scaled with the statistics of this step
            ry = learner.target.transform(ry[:, None])[:, 0]
        xb, yb = np.concatenate([xb, rx]), np.concatenate([yb, ry.astype(target.dtype)])
    xb = np.ascontiguousarray(xb)
    if hasattr(learner.backend, "train_guarded"):
        loss, refused = learner.backend.train_guarded(xb, yb)
    else:
        loss, refused = learner.backend.train_step(xb, yb), None
    ok = np.ones(len(X), dtype=bool) if refused is None else ~refused[: len(X)]
    learner.replay.add(X[ok], y[ok])
    learner.n_learned += int(ok.sum())
    return (float(loss) if ok.any() else None), ok, target


def score(learner: Any, y: np.ndarray, P: np.ndarray, yhat: np.ndarray,
          where: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Score predictions made earlier against ``y`` and watch for drift.
    ``where[i]``: the input record behind row ``i``. Returns (drift signal, events)."""
    assert learner.metrics is not None
    events: list[dict[str, Any]] = []
    if not len(y):
        return np.zeros(0), events
    if learner.task == "regression":
        learner.metrics.update(y, yhat)
    else:
        learner.metrics.update(y, yhat, P)
    signal = np.zeros(0)
    if learner.drift.enabled:
        signal = signal_values(learner.task, learner.drift.signal, y, yhat, None if learner.task == "regression" else P)
        for ev in learner.drift.update(signal):
            events.append({"type": "drift", **ev.to_dict(), "index": int(where[ev.index]),
                           "policy": learner.policy.name, "n_learned": learner.n_learned})
            log.info("drift detected by %s after %d scored records: %s %.4f -> %.4f (policy %s)",
                     ev.detector, ev.n_seen, ev.metric, ev.before, ev.after, learner.policy.name)
            if learner.drift.spec.clear_replay:
                learner.replay.clear()
            events += [{**e, "index": int(where[ev.index])} for e in learner.policy.on_drift(learner, ev)]
    return signal, events

def after_learn(learner: Any, X: np.ndarray, y: np.ndarray, targets: np.ndarray, scored: np.ndarray,
                 learned: np.ndarray, signal: np.ndarray, where: np.ndarray) -> list[dict[str, Any]]:
    """The drift policy's turn once the batch is learned (e.g. a challenger learns it too):
    the scored rows with their labels and drift signal, and the learned rows with their model targets."""
    if not learner.drift.enabled or not learned.any():
        return []
    return [{**e, "index": int(where[learned][-1])}
            for e in learner.policy.after_learn(learner, np.ascontiguousarray(X[scored]), y[scored], signal,
                                                np.ascontiguousarray(X[learned]), targets[learned],
                                                int(learned.sum()))]
