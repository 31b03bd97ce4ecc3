"""Bad records and the value checks shared by features and labels.

A bad record never crashes a batch: it is reported as a :class:`BadRecord`
(index in the batch, a short machine-readable ``error_type`` and a message that
names the field) and the rest of the batch goes on. The pipeline sends these to
the dead-letter topic with the reason in the headers.

>>> BadRecord(3, "missing_field", "field 'age' is missing", field="age").to_dict()
{'index': 3, 'error_type': 'missing_field', 'message': "field 'age' is missing", 'field': 'age'}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: error_type values produced by features/ and the label encoder
ERROR_TYPES = (
    "not_a_record",  # neither a mapping nor an array
    "missing_field",  # field absent or null
    "wrong_type",  # e.g. a string where a number is needed
    "wrong_shape",  # array field / array record of another width than the layout
    "non_finite",  # NaN or +-inf
    "out_of_range",  # finite, but beyond float32 (it would become inf in the model)
    "unknown_label",  # label outside the fixed class set
    "too_many_classes",  # growing class set is full
    "non_finite_update",  # predicted, but learning it would make the model non-finite (learner)
    "late_record",  # event time behind the watermark by more than the allowed lateness (keyed features)
)


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be used, and why."""

    index: int
    error_type: str
    message: str
    field: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def at(self, index: int) -> BadRecord:
        """The same problem, re-indexed (sub-batch index -> batch index)."""
        return BadRecord(index, self.error_type, self.message, self.field)


class FieldError(ValueError):
    """Raised inside per-record coercion; turned into a BadRecord by the caller."""

    def __init__(self, error_type: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.field = field

    def bad(self, index: int) -> BadRecord:
        return BadRecord(index, self.error_type, str(self), self.field)


_NUMBER = (bool, int, float, np.bool_, np.integer, np.floating)

#: the largest magnitude a value may have: features and targets become float32, where
#: anything beyond this is inf (one such value would turn weights and optimizer state into NaN)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_number(v: Any) -> bool:
    """int/float/bool, Python or numpy scalar."""
    return isinstance(v, _NUMBER)


def is_numeric_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) and (v.dtype.kind in "biuf")


def describe(v: Any) -> str:
    """A short, safe description of a value for error messages."""
    r = repr(v)
    if len(r) > 40:
        r = r[:37] + "..."
    return f"{type(v).__name__} {r}"


def number(field: str, v: Any) -> float:
    """A finite float from a JSON/numpy scalar, or a FieldError naming ``field``."""
    if v is None:
        raise FieldError("missing_field", f"field '{field}' is null", field)
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if not is_number(v):
        raise FieldError("wrong_type", f"field '{field}' must be a number, got {describe(v)}", field)
    f = float(v)
    if not math.isfinite(f):
        raise FieldError("non_finite", f"field '{field}' is {f} (NaN/inf not allowed)", field)
    if abs(f) > FLOAT32_MAX:
        raise FieldError("out_of_range", f"field '{field}' is {f:g}, beyond float32's range (|x| <= 3.4e38)", field)
    return f


def check_range(field: str | None, arr: np.ndarray, what: str) -> None:
    """A FieldError unless every value of the float array ``arr`` is finite and within float32's range."""
    if not np.isfinite(arr).all():
        raise FieldError("non_finite", f"{what} contains NaN/inf", field)
    if arr.size and float(np.abs(arr).max()) > FLOAT32_MAX:
        raise FieldError("out_of_range", f"{what} has a value beyond float32's range (|x| <= 3.4e38)", field)


def category_key(field: str, v: Any) -> str:
    """The stable string form of a categorical value.

    Integral floats and ints share a form (JSON may carry ``3`` or ``3.0``);
    booleans are ``"true"``/``"false"``; strings are themselves.

    >>> [category_key("f", v) for v in ("a", 3, 3.0, 2.5, True)]
    ['a', '3', '3', '2.5', 'true']
    """
    if v is None:
        raise FieldError("missing_field", f"field '{field}' is null", field)
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise FieldError("non_finite", f"field '{field}' is {v} (NaN/inf not allowed)", field)
        return str(int(v)) if v.is_integer() else repr(v)
    raise FieldError(
        "wrong_type", f"field '{field}' must be a string or a number, got {describe(v)}", field
    )
