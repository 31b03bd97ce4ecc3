"""What the learner returns for a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorstream.features.records import BadRecord


@dataclass
class BatchOutcome:
    """What one batch produced.

    ``predictions[i]`` (a property) belongs to input record ``i``: ``{"label": <original
    label>, "proba": [p_0, ..., p_{n_outputs-1}]}`` for classification (``proba``
    in class-index order, see ``OnlineLearner.classes``), ``{"value": float}``
    for regression (original units), ``None`` for a record whose features or
    label were bad. ``bad`` lists the bad records: feature or label problems
    (neither scored nor learned), and ``non_finite_update``: records that were
    predicted (and scored, if the prediction is finite) but whose update was
    refused because its loss or gradient was not finite; they are not learned.
    ``unlabelled`` are indices predicted but not scored/learned because the
    label field was absent. ``loss`` is the mean train loss of the records
    learned (None when nothing was learned; in the model's units, i.e. of the
    standardised target when the target is scaled), ``n_learned`` the number of
    records learned from this batch.

    The same predictions as arrays, for building outputs per batch: ``rows``
    (int64, the input index of each predicted record), ``proba`` (float32
    ``[len(rows), n_outputs]``, classification; None for regression) and
    ``predicted`` (class index per row, -1 before any class is known; or the
    regression value, float64).
    """

    prediction_list: list[dict[str, Any] | None] | None
    bad: list[BadRecord] = field(default_factory=list)
    loss: float | None = None
    n_learned: int = 0
    n_scored: int = 0
    unlabelled: list[int] = field(default_factory=list)
    #: drift / challenger events (``type``: drift, challenger_started, promotion,
    #: challenger_dropped); ``index`` (when present) is the input record that
    #: revealed it
    events: list[dict[str, Any]] = field(default_factory=list)
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    proba: np.ndarray | None = None
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: with ``prediction_list`` None: the batch size and the class names (index order) that
    #: ``predictions`` is built from, on first use (the run loop writes outputs from the arrays)
    n_records: int = 0
    classes: list[Any] = field(default_factory=list)

    @property
    def predictions(self) -> list[dict[str, Any] | None]:
        """One dict (or None) per input record; built from the arrays the first time it is asked for."""
        if self.prediction_list is None:
            out: list[dict[str, Any] | None] = [None] * self.n_records
            if self.proba is None:  # regression
                preds: list[dict[str, Any]] = [{"value": v} for v in self.predicted.tolist()]
            else:
                classes, n = self.classes, len(self.classes)
                preds = [{"label": classes[i] if 0 <= i < n else None, "proba": row}
                         for i, row in zip(self.predicted.tolist(), self.proba.astype(np.float64).tolist(),
                                           strict=True)]
            for i, pred in zip(self.rows.tolist(), preds, strict=True):
                out[i] = pred
            self.prediction_list = out
        return self.prediction_list
