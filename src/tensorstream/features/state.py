"""Checkpoint-safe encodings: structured data as plain numeric arrays.

Checkpoints hold arrays only (safetensors), and a checkpoint must never run code
when it is read, so vocabularies and layouts travel as UTF-8 JSON bytes in a
``uint8`` array: never pickle.

>>> a = json_array({"fields": [["x", 1]], "vocab": ["a", "b"]})
>>> a.dtype, from_json_array(a)
(dtype('uint8'), {'fields': [['x', 1]], 'vocab': ['a', 'b']})
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def json_array(obj: Any) -> np.ndarray:
    """JSON-encode ``obj`` into a ``uint8`` array (strict JSON: no NaN/inf)."""
    data = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return np.frombuffer(data.encode("utf-8"), dtype=np.uint8).copy()


def from_json_array(arr: np.ndarray) -> Any:
    """Inverse of :func:`json_array`."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"expected a 1-D uint8 array of JSON bytes, got {arr.dtype} {arr.shape}")
    return json.loads(arr.tobytes().decode("utf-8"))


def prefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"k": a}`` -> ``{"prefix/k": a}``."""
    return {f"{prefix}/{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of ``state`` under ``prefix/``, with the prefix removed."""
    p = prefix + "/"
    return {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
