"""Labels -> model targets, and class indices back to the original labels.

Classification labels are compared **by value**, the way River's datasets yield
them and JSON decodes them: ``True == 1 == 1.0`` are one class, ``"1"`` (a
string) is another. A fixed class set (``classes: [...]``) rejects anything else
as ``unknown_label``; without one the set grows in order of first appearance up
to ``max_classes`` (then ``too_many_classes``). Predictions map back to the
spec's own values (fixed set) or to the first value seen (growing set).

>>> from tensorstream.spec import LabelSpec
>>> enc = LabelEncoder(LabelSpec(field="y", classes=[False, True]))
>>> y, good, bad = enc.encode_batch([{"y": True}, {"y": 0}, {"y": "yes"}, {}])
>>> y.tolist(), good.tolist(), [(b.index, b.error_type) for b in bad]
([1, 0], [0, 1], [(2, 'unknown_label'), (3, 'missing_field')])
>>> enc.decode(1)
True

The label field may be a dotted path into nested mappings (``label.field:
target.value``; a key that exists literally wins), as feature fields may.

Regression targets are float32:

>>> LabelEncoder(LabelSpec(field="t", task="regression")).encode_batch([{"t": 2}, {"t": 0.5}])[0]
array([2. , 0.5], dtype=float32)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tensorstream.features.columns import MISSING, FieldPath, all_dicts
from tensorstream.features.records import FLOAT32_MAX, BadRecord, FieldError, describe, number
from tensorstream.features.state import from_json_array, json_array
from tensorstream.spec import LabelSpec


def _label_key(field: str, v: Any) -> Any:
    """A hashable, by-value key for a class label (numpy scalars -> Python)."""
    if v is None:
        raise FieldError("missing_field", f"label field '{field}' is null", field)
    if isinstance(v, np.generic) or isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()  # tensor frames carry a scalar label as a 0-d array
    if isinstance(v, float) and not math.isfinite(v):
        raise FieldError("non_finite", f"label field '{field}' is {v}", field)
    if not isinstance(v, (str, bool, int, float)):
        raise FieldError(
            "wrong_type", f"label field '{field}' must be a string, number or boolean, got {describe(v)}", field
        )
    return v


class LabelEncoder:
    """Encode the label field of records; decode class indices.

    ``classes`` lists the known classes in index order; ``n_outputs`` is the
    model's output width (``len(classes)`` for a fixed set, ``max_classes`` for a
    growing one, 1 for regression).
    """

    def __init__(self, spec: LabelSpec) -> None:
        self.spec = spec
        self.field = spec.field
        self.task = spec.task
        self.fixed = spec.classes is not None
        self._path = FieldPath(spec.field)
        self._classes: list[Any] = []
        self._index: dict[Any, int] = {}
        if spec.classes is not None and self.task == "classification":
            for c in spec.classes:
                key = _label_key(spec.field, c)
                if key in self._index:
                    raise ValueError(
                        f"label.classes: {c!r} and {self._classes[self._index[key]]!r} are the same "
                        "value (labels compare by value: True == 1 == 1.0)"
                    )
                self._index[key] = len(self._classes)
                self._classes.append(c)

    @property
    def n_outputs(self) -> int:
        return self.spec.n_outputs

    @property
    def classes(self) -> list[Any]:
        """The known classes, index order (grows for a growing set)."""
        return list(self._classes)

    @property
    def n_known(self) -> int:
        return len(self._classes)

    def decode(self, index: int) -> Any:
        """Class index -> original label (None for a slot no label has claimed yet)."""
        return self._classes[index] if 0 <= index < len(self._classes) else None

    def encode_one(self, value: Any, update: bool = True) -> int | float:
        """One label value -> class index (or float target); raises FieldError."""
        if self.task == "regression":
            return number(self.field, value)
        key = _label_key(self.field, value)
        idx = self._index.get(key)
        if idx is not None:
            return idx
        if self.fixed:
            raise FieldError(
                "unknown_label",
                f"label field '{self.field}' has {describe(value)}, not one of the classes {self._classes!r}",
                self.field,
            )
        if len(self._classes) >= self.spec.max_classes:
            raise FieldError(
                "too_many_classes",
                f"label field '{self.field}' has a new class {describe(value)} but all "
                f"{self.spec.max_classes} slots (label.max_classes) are taken by {self._classes!r}",
                self.field,
            )
        if not update:
            raise FieldError("unknown_label", f"label field '{self.field}' has an unseen class {describe(value)}", self.field)
        self._index[key] = len(self._classes)
        self._classes.append(value.item() if isinstance(value, (np.generic, np.ndarray)) else value)
        return self._index[key]

    def encode_batch(
        self, records: Sequence[Any], update: bool = True
    ) -> tuple[np.ndarray, np.ndarray, list[BadRecord]]:
        """``records`` -> ``(y, good_idx, bad)``.

        ``y`` is int64 class indices (classification) or float32 (regression).
        A record without the label field is bad with ``missing_field`` (the
        online learner treats those as unlabelled: predicted, not learned).
        With ``update`` a growing class set takes new classes.
        """
        if records and all_dicts(records):
            fast = self._encode_column(self._path.column(records))
            if fast is not None:
                return fast
        return self._encode_rows(records, range(len(records)), update)

    def _encode_column(self, col: list[Any]) -> tuple[np.ndarray, np.ndarray, list[BadRecord]] | None:
        """The common case in one pass: known classes (or plain numbers for regression); None otherwise."""
        n = len(col)
        if self.task == "regression":
            if not set(map(type, col)) <= {float, int, bool}:
                return None
            try:
                y = np.array(col, dtype=np.float64)
            except OverflowError:
                return None
            if not (np.abs(y) <= FLOAT32_MAX).all():  # NaN, inf, beyond float32: the per-record path says which
                return None
            return y.astype(np.float32), np.arange(n, dtype=np.int64), []
        if not set(map(type, col)) <= {str, bool, int, float}:
            return None
        try:
            idx = list(map(self._index.__getitem__, col))  # labels compare by value, as dict keys do
        except KeyError:  # a new class, NaN or a missing field: record by record, in order
            return None
        return np.array(idx, dtype=np.int64), np.arange(n, dtype=np.int64), []

    def _encode_rows(self, records: Sequence[Any], which: Sequence[int],
                     update: bool) -> tuple[np.ndarray, np.ndarray, list[BadRecord]]:
        ys: list[int | float] = []
        good: list[int] = []
        bad: list[BadRecord] = []
        for i in which:
            record = records[i]
            try:
                v = self._path.get(record) if isinstance(record, Mapping) else MISSING
                if v is MISSING:
                    raise FieldError("missing_field", f"label field '{self.field}' is missing", self.field)
                ys.append(self.encode_one(v, update))
                good.append(i)
            except FieldError as err:
                bad.append(err.bad(i))
        dtype = np.float32 if self.task == "regression" else np.int64
        return np.asarray(ys, dtype=dtype), np.asarray(good, dtype=np.int64), bad

    def state_dict(self) -> dict[str, np.ndarray]:
        """``classes``: the known classes in index order, as JSON bytes (uint8)."""
        return {"classes": json_array(self._classes)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        classes = from_json_array(state["classes"])
        if self.fixed:
            if [_label_key(self.field, c) for c in classes] != [_label_key(self.field, c) for c in self._classes]:
                raise ValueError(f"label state has classes {classes!r}, the spec has {self._classes!r}")
            return
        if len(classes) > self.spec.max_classes:
            raise ValueError(f"label state has {len(classes)} classes, label.max_classes is {self.spec.max_classes}")
        self._classes = list(classes)
        self._index = {_label_key(self.field, c): i for i, c in enumerate(classes)}
