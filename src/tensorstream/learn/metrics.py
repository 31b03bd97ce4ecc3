"""Prequential (test-then-train) metrics, overall and over a sliding window.

Computed with numpy over whole batches: River's definitions, checked against
River's metric classes in the tests (River's ``metrics`` update one record at a
time, six Python calls per record: at batch 32 that was 18 % of the learner).
Classification is scored on class *indices*: ``y_pred`` is the argmax index
(``-1`` when no class is known yet) and the binary positive class is index 1,
i.e. the second entry of ``label.classes`` (``True`` for ``[False, True]``), or
the second class seen for a growing class set.

- binary: ``accuracy``, ``f1`` (River's ``metrics.F1(pos_val=1)``), ``log_loss``
  (``metrics.LogLoss`` on the probability of index 1);
- multiclass: ``accuracy``, ``macro_f1`` (``metrics.MacroF1``: the classes are
  those seen as truth or prediction, ``-1`` included), ``cross_entropy``;
- regression: ``mae``, ``rmse``.

Each also as ``<name>_window`` over the last ``window`` records (what
``river.utils.Rolling`` gives), plus ``n_scored``. Probabilities are clamped to
``[1e-15, 1 - 1e-15]`` before the log, as River does.

>>> import numpy as np
>>> m = PrequentialMetrics("classification", n_outputs=2, window=2)
>>> m.update(np.array([1, 0, 1]), np.array([1, 1, 1]), np.array([[.2, .8], [.4, .6], [.3, .7]]))
>>> snap = m.snapshot()
>>> round(snap["accuracy"], 4), snap["accuracy_window"], snap["n_scored"]
(0.6667, 0.5, 3.0)
>>> round(snap["f1"], 4)
0.8
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorstream.features.state import from_json_array, json_array

_EPS = 1e-15  # River's probability clamp


def _f1(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """F1 per class from counts, River's way: precision/recall 0 on an empty denominator, F1 0 when both are."""
    tp, n_true, n_pred = (np.asarray(a, dtype=np.float64) for a in (tp, n_true, n_pred))
    p = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred != 0)
    r = np.divide(tp, n_true, out=np.zeros_like(tp), where=n_true != 0)
    return np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) != 0)


def _scores(names: tuple[str, ...], counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
            means: dict[str, float]) -> dict[str, float]:
    """The metric values from confusion ``counts`` (classes, true, pred: one row per pair) and running means."""
    out: dict[str, float] = {}
    for name in names:
        if name in means:
            out[name] = float(np.sqrt(means[name])) if name == "rmse" else float(means[name])
            continue
        assert counts is not None
        t, p, c = counts
        total = c.sum()
        if name == "accuracy":
            out[name] = float(c[t == p].sum() / total) if total else 0.0
        elif name == "f1":
            tp = c[(t == 1) & (p == 1)].sum()
            out[name] = float(_f1(tp, c[t == 1].sum(), c[p == 1].sum()))
        else:  # macro_f1 over every class seen as truth or prediction
            classes = np.unique(np.concatenate([t[c > 0], p[c > 0]]))
            if not len(classes):
                out[name] = 0.0
                continue
            tp = np.array([c[(t == k) & (p == k)].sum() for k in classes])
            n_true = np.array([c[t == k].sum() for k in classes])
            n_pred = np.array([c[p == k].sum() for k in classes])
            out[name] = float(_f1(tp, n_true, n_pred).sum() / len(classes))
    return out


class PrequentialMetrics:
    """Prequential metrics fed with batches of (truth, prediction, probabilities).

    Parameters
    ----------
    task
        ``"classification"`` or ``"regression"``.
    n_outputs
        Number of class slots (2 = binary metrics, more = multiclass metrics).
    window
        Size of the sliding window of the ``*_window`` metrics, in records.
    history_every
        Every this many scored records, append ``(n_scored, headline_window)`` to
        :attr:`history` (windowed accuracy, or windowed MAE for regression).
    """

    def __init__(self, task: str, n_outputs: int, window: int, history_every: int = 100) -> None:
        self.task = task
        self.n_outputs = n_outputs
        self.window = window
        self.history_every = max(1, int(history_every))
        self.binary = task == "classification" and n_outputs == 2
        if task == "classification":
            f1, prob = (("f1", "log_loss") if self.binary else ("macro_f1", "cross_entropy"))
            self.names = ("accuracy", f1, prob)
            self._mean_names: tuple[str, ...] = (prob,)
        else:
            self.names = ("mae", "rmse")
            self._mean_names = ("mae", "rmse")
        self.headline = self.names[0]
        self.history: list[tuple[int, float]] = []
        self._reset()

    def _reset(self) -> None:
        self.n_scored = 0
        self._confusion: dict[tuple[int, int], int] = {}
        self._means = {name: (0.0, 0.0) for name in self._mean_names}  # (n, mean)
        self._recent = np.zeros((0, 3))  # the window: (truth, prediction, probability) per record

    # ----------------------------------------------------------------- update

    def _per_record(self, recent: np.ndarray) -> dict[str, np.ndarray]:
        """The per-record terms of the running-mean metrics, from (truth, prediction, p) rows."""
        yt, yp, p = recent[:, 0], recent[:, 1], recent[:, 2]
        if self.task == "regression":
            err = yt - yp
            return {"mae": np.abs(err), "rmse": err * err}
        p = np.clip(p, _EPS, 1 - _EPS)
        if self.binary:
            return {"log_loss": -np.log(np.where(yt == 1, p, 1 - p))}
        return {"cross_entropy": -np.log(p)}

    def update(self, y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None = None) -> None:
        """Score a batch.

        Classification: ``y_true``/``y_pred`` int class indices, ``proba`` float
        ``[n, n_outputs]``. Regression: float targets and predictions.
        """
        y_true = np.asarray(y_true)
        n = len(y_true)
        if n == 0:
            return
        if self.task == "classification":
            if proba is None:
                raise ValueError("classification metrics need the predicted probabilities")
            proba = np.asarray(proba, dtype=np.float64)
            # binary: P(index 1); multiclass: P(true class)
            p = proba[:, 1] if self.binary else proba[np.arange(n), y_true.astype(np.int64)]
            for pair in zip(y_true.tolist(), np.asarray(y_pred).tolist(), strict=True):
                self._confusion[pair] = self._confusion.get(pair, 0) + 1  # a dict update: cheaper than np.unique
        else:
            p = np.zeros(n)
        rows = np.stack([y_true.astype(np.float64), np.asarray(y_pred, np.float64), p], axis=1)
        for name, values in self._per_record(rows).items():
            k, mean = self._means[name]
            self._means[name] = (k + n, mean + (values.sum() - n * mean) / (k + n))
        recent = np.concatenate([self._recent, rows])
        self._record_history(recent, n)
        self._recent = recent[-self.window:]
        self.n_scored += n

    def _record_history(self, recent: np.ndarray, n: int) -> None:
        """``(n_scored, windowed headline)`` at each multiple of ``history_every`` reached in this batch."""
        first = self.n_scored + 1  # n_scored after the batch's first record
        ends = np.arange(first + (-first) % self.history_every, self.n_scored + n + 1, self.history_every)
        if not len(ends):
            return
        if self.headline == "accuracy":
            hit = (recent[:, 0] == recent[:, 1]).astype(np.float64)
        else:
            hit = self._per_record(recent)["mae"]
        csum = np.concatenate([[0.0], np.cumsum(hit)])
        offset = len(recent) - n - self.n_scored  # position in `recent` = n_scored - 1 + offset
        for end in ends.tolist():
            stop = end + offset
            start = max(stop - self.window, 0)
            self.history.append((int(end), float((csum[stop] - csum[start]) / (stop - start))))

    # ----------------------------------------------------------------- report

    def _counts(self, pairs: dict[tuple[int, int], int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arr = np.array([[t, p, c] for (t, p), c in pairs.items()], dtype=np.int64).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    def snapshot(self) -> dict[str, float]:
        """Current values: ``accuracy``, ``accuracy_window``, ..., ``n_scored``."""
        classify = self.task == "classification"
        overall = _scores(self.names, self._counts(self._confusion) if classify else None,
                          {k: m for k, (_, m) in self._means.items()})
        recent = self._recent
        wmeans = {k: float(v.mean()) if len(v) else 0.0 for k, v in self._per_record(recent).items()}
        wcounts = None
        if classify:
            pairs: dict[tuple[int, int], int] = {}
            for pair in zip(recent[:, 0].astype(np.int64).tolist(), recent[:, 1].astype(np.int64).tolist(), strict=True):
                pairs[pair] = pairs.get(pair, 0) + 1
            wcounts = self._counts(pairs)
        windowed = _scores(self.names, wcounts, wmeans)
        out: dict[str, float] = {}
        for name in self.names:
            out[name] = overall[name]
            out[f"{name}_window"] = windowed[name]
        out["n_scored"] = float(self.n_scored)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """``meta`` (JSON), ``confusion`` int64 [k, 3] (true, pred, count),
        ``means`` float64 [names, 2] (n, mean of each running-mean metric; zeros
        for the others), ``recent`` float64 [w, 3] (the window), ``history`` float64 [h, 2]."""
        means = np.zeros((len(self.names), 2))
        for i, name in enumerate(self.names):
            if name in self._means:
                means[i] = self._means[name]
        conf = np.array([[t, p, c] for (t, p), c in sorted(self._confusion.items())], dtype=np.int64)
        return {
            "meta": json_array(
                {"task": self.task, "n_outputs": self.n_outputs, "window": self.window,
                 "n_scored": self.n_scored, "names": list(self.names)}
            ),
            "confusion": conf.reshape(-1, 3),
            "means": means,
            "recent": self._recent.copy(),
            "history": np.array(self.history, dtype=np.float64).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = from_json_array(state["meta"])
        if (meta["task"], meta["n_outputs"]) != (self.task, self.n_outputs):
            raise ValueError(f"metrics state is for {meta['task']}/{meta['n_outputs']} outputs")
        self._reset()
        self._recent = np.asarray(state["recent"], dtype=np.float64).reshape(-1, 3)[-self.window:].copy()
        self._confusion = {(int(t), int(p)): int(c) for t, p, c in np.asarray(state["confusion"]).tolist()}
        for i, name in enumerate(self.names):
            if name in self._means:
                k, mean = (float(v) for v in np.asarray(state["means"])[i])
                self._means[name] = (k, mean)
        self.n_scored = int(meta["n_scored"])
        self.history = [(int(n), float(v)) for n, v in np.asarray(state["history"]).tolist()]
