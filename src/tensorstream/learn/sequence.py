"""Per-record learning (spec ``learn.learning: per_record``): the framework-free half.

A batch learned per record must give what the same records give one at a time
(batch 1): each record is predicted by the model that learned every record
before it, in this batch too, then learned. The backend does the model part in
one compiled call (:class:`~tensorstream.backends.base.SequentialLearning`);
what depends on earlier rows of the batch outside the model is computed here,
vectorised:

- the classes known before each row (a growing class set learns new classes
  mid-batch): :func:`known_before`, :func:`predicted_index`;
- a fallback for backends without ``learn_sequential``: the same loop, one
  ``predict`` and one train step per row (:func:`learn_sequence`).

The feature and target scalers have their own per-row form
(:meth:`~tensorstream.features.scaler.RunningStandardizer.running`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorstream.backends.base import SequentialResult


def known_before(y: np.ndarray, labelled: np.ndarray, n_known: int) -> np.ndarray:
    """Classes known before each row: ``n_known`` before the batch, plus those the labelled
    rows before it introduced (class indices are given in order of first appearance).

    >>> known_before(np.array([0, 2, 0, 3]), np.array([True, True, False, True]), 2).tolist()
    [2, 2, 3, 3]
    """
    seen = np.where(labelled, y, -1).astype(np.int64)
    after = np.maximum(np.maximum.accumulate(seen) + 1, n_known) if len(seen) else seen
    return np.concatenate([[n_known], after[:-1]]).astype(np.int64)


def predicted_index(P: np.ndarray, known: np.ndarray | int) -> np.ndarray:
    """Argmax over the classes known when each row was predicted (-1 when none is).

    Only classes known *before* a record can be predicted for it: a class first
    seen in a record must not be handed to that record's own prediction.
    """
    n, width = P.shape
    known = np.broadcast_to(np.asarray(known, dtype=np.int64), (n,))
    if not n:
        return np.zeros(0, dtype=np.int64)
    if (known >= width).all():
        return np.argmax(P, axis=1)
    masked = np.where(np.arange(width)[None, :] < known[:, None], P, -np.inf)
    return np.where(known > 0, np.argmax(masked, axis=1), -1)


def learn_sequence(backend: Any, x: np.ndarray, y: np.ndarray, learn: np.ndarray,
                   replay: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> SequentialResult:
    """``backend.learn_sequential`` when it has one, else the same thing a row at a time."""
    if hasattr(backend, "learn_sequential"):
        return backend.learn_sequential(x, y, learn, replay)
    n = len(x)
    out = None
    loss = np.full(n, np.nan, dtype=np.float32)
    refused = np.zeros(n, dtype=bool)
    for i in range(n):
        p = np.asarray(backend.predict(x[i:i + 1]))
        out = np.empty((n, p.shape[1]), dtype=np.float32) if out is None else out
        out[i] = p[0]
        if not learn[i]:
            continue
        xb, yb = x[i:i + 1], y[i:i + 1]
        if replay is not None and replay[2][i].any():
            rx, ry, rw = (a[i][replay[2][i] > 0] for a in replay)
            xb, yb = np.concatenate([xb, rx]), np.concatenate([yb, ry])
        if hasattr(backend, "train_guarded"):
            step_loss, bad = backend.train_guarded(np.ascontiguousarray(xb), yb)
            refused[i] = bad is not None and bool(bad[0])
        else:
            step_loss = backend.train_step(np.ascontiguousarray(xb), yb)
        if not refused[i]:
            loss[i] = step_loss
    assert out is not None
    return SequentialResult(out, loss, refused)
