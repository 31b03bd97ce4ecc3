"""Prequential (test-then-train) metrics, overall and over a sliding window.

River's metric classes do the arithmetic, so the numbers are River's numbers.
Classification is scored on class *indices*: ``y_pred`` is the argmax index
(``-1`` when no class is known yet) and the binary positive class is index 1,
i.e. the second entry of ``label.classes`` (``True`` for ``[False, True]``), or
the second class seen for a growing class set.

- binary: ``accuracy``, ``f1`` (``metrics.F1(pos_val=1)``), ``log_loss``
  (``metrics.LogLoss`` on the probability of index 1);
- multiclass: ``accuracy``, ``macro_f1``, ``cross_entropy``;
- regression: ``mae``, ``rmse``.

Each also as ``<name>_window`` over the last ``window`` records
(``river.utils.Rolling``), plus ``n_scored``.

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

from collections import deque
from typing import Any

import numpy as np
from river import metrics, utils

from tensorstream.features.state import from_json_array, json_array


class PrequentialMetrics:
    """Running River metrics fed with batches of (truth, prediction, probabilities).

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
        else:
            self.names = ("mae", "rmse")
        self.headline = self.names[0]
        self.history: list[tuple[int, float]] = []
        self._reset()

    _KINDS: dict[str, tuple[type, dict[str, Any]]] = {
        "accuracy": (metrics.Accuracy, {}),
        "f1": (metrics.F1, {"pos_val": 1}),
        "macro_f1": (metrics.MacroF1, {}),
        "log_loss": (metrics.LogLoss, {}),
        "cross_entropy": (metrics.CrossEntropy, {}),
        "mae": (metrics.MAE, {}),
        "rmse": (metrics.RMSE, {}),
    }

    def _reset(self) -> None:
        self.n_scored = 0
        self._overall = {n: cls(**kw) for n, (cls, kw) in ((n, self._KINDS[n]) for n in self.names)}
        self._windowed = {
            n: utils.Rolling(cls, window_size=self.window, **kw)
            for n, (cls, kw) in ((n, self._KINDS[n]) for n in self.names)
        }
        # What the checkpoint needs to rebuild the metrics exactly: confusion counts
        # (accuracy/F1 depend on nothing else), the running means, and the window.
        self._confusion: dict[tuple[int, int], int] = {}
        self._recent: deque[tuple[float, float, float]] = deque(maxlen=self.window)

    # ----------------------------------------------------------------- update

    def _river_args(self, yt: float, yp: float, p: float, name: str) -> tuple[Any, Any]:
        if name == "log_loss":
            return bool(yt == 1), p
        if name == "cross_entropy":
            return int(yt), {int(yt): p}  # River only reads the true class' probability
        if self.task == "classification":
            return int(yt), int(yp)
        return yt, yp

    def _update_one(self, yt: float, yp: float, p: float) -> None:
        for name in self.names:
            a, b = self._river_args(yt, yp, p, name)
            self._overall[name].update(a, b)
            self._windowed[name].update(a, b)
        if self.task == "classification":
            key = (int(yt), int(yp))
            self._confusion[key] = self._confusion.get(key, 0) + 1
        self._recent.append((yt, yp, p))
        self.n_scored += 1
        if self.n_scored % self.history_every == 0:
            self.history.append((self.n_scored, self._windowed[self.headline].get()))

    def update(self, y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None = None) -> None:
        """Score a batch.

        Classification: ``y_true``/``y_pred`` int class indices, ``proba`` float
        ``[n, n_outputs]``. Regression: float targets and predictions.
        """
        y_true = np.asarray(y_true)
        y_pred = np.asarray(y_pred)
        if self.task == "classification":
            if proba is None:
                raise ValueError("classification metrics need the predicted probabilities")
            proba = np.asarray(proba, dtype=np.float64)
            rows = np.arange(len(y_true))
            # binary: P(index 1); multiclass: P(true class)
            p = proba[:, 1] if self.binary else proba[rows, y_true.astype(np.int64)]
        else:
            p = np.zeros(len(y_true))
        for yt, yp, pp in zip(y_true.tolist(), y_pred.tolist(), p.tolist(), strict=True):
            self._update_one(yt, yp, pp)

    # ----------------------------------------------------------------- report

    def snapshot(self) -> dict[str, float]:
        """Current values: ``accuracy``, ``accuracy_window``, ..., ``n_scored``."""
        out: dict[str, float] = {}
        for name in self.names:
            out[name] = float(self._overall[name].get())
            out[f"{name}_window"] = float(self._windowed[name].get())
        out["n_scored"] = float(self.n_scored)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """``meta`` (JSON), ``confusion`` int64 [k, 3] (true, pred, count),
        ``means`` float64 [names, 2] (n, mean of each running-mean metric),
        ``recent`` float64 [w, 3] (the window), ``history`` float64 [h, 2]."""
        means = np.zeros((len(self.names), 2))
        for i, name in enumerate(self.names):
            mean = getattr(self._overall[name], "_mean", None)  # River's MeanMetric internals
            if mean is not None:
                means[i] = (mean.n, mean._mean)
        conf = np.array([[t, p, c] for (t, p), c in sorted(self._confusion.items())], dtype=np.int64)
        return {
            "meta": json_array(
                {"task": self.task, "n_outputs": self.n_outputs, "window": self.window,
                 "n_scored": self.n_scored, "names": list(self.names)}
            ),
            "confusion": conf.reshape(-1, 3),
            "means": means,
            "recent": np.array(list(self._recent), dtype=np.float64).reshape(-1, 3),
            "history": np.array(self.history, dtype=np.float64).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        meta = from_json_array(state["meta"])
        if (meta["task"], meta["n_outputs"]) != (self.task, self.n_outputs):
            raise ValueError(f"metrics state is for {meta['task']}/{meta['n_outputs']} outputs")
        self._reset()
        # The window: replay the last `window` records into fresh Rolling metrics.
        for yt, yp, p in np.asarray(state["recent"]).tolist()[-self.window :]:
            for name in self.names:
                self._windowed[name].update(*self._river_args(yt, yp, p, name))
            self._recent.append((yt, yp, p))
        # Overall: confusion counts replayed with weights, running means set directly.
        for t, p, c in np.asarray(state["confusion"]).tolist():
            self._confusion[(t, p)] = c
            for name in self.names:
                if name in ("accuracy", "f1", "macro_f1"):
                    self._overall[name].update(t, p, w=c)
        for i, name in enumerate(self.names):
            mean = getattr(self._overall[name], "_mean", None)
            if mean is not None:
                mean.n, mean._mean = (float(v) for v in np.asarray(state["means"])[i])
        self.n_scored = int(meta["n_scored"])
        self.history = [(int(n), float(v)) for n, v in np.asarray(state["history"]).tolist()]

