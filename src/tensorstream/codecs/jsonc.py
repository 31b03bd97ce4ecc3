"""JSON records, via orjson.

A record is a JSON object (a ``dict``). numpy arrays and scalars encode as JSON
lists and numbers.

>>> import numpy as np
>>> data = encode_json({"x": np.array([1.5, 2.0], dtype=np.float32), "y": 1})
>>> data
b'{"x":[1.5,2.0],"y":1}'
>>> decode_json(data)
{'x': [1.5, 2.0], 'y': 1}
>>> decode_json_batch([b'{"a":1}', b'{"a":2}'])
[{'a': 1}, {'a': 2}]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .errors import DecodeError, EncodeError

__all__ = ["decode_json", "decode_json_batch", "encode_json"]

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _to_python(obj: Any) -> Any:
    # orjson hands us what it cannot serialize natively. With OPT_SERIALIZE_NUMPY
    # that includes non-contiguous arrays; without it, every numpy object.
    # ``tolist``/``item`` turn any numpy array or scalar into plain Python.
    tolist = getattr(obj, "tolist", None)
    if tolist is not None and type(obj).__module__ == "numpy":
        return tolist()
    raise TypeError(f"type {type(obj).__name__} is not JSON serializable")


def encode_json(obj: Any) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON bytes.

    Raises :class:`EncodeError` for values JSON cannot hold.

    >>> encode_json({"n": 3, "ok": True})
    b'{"n":3,"ok":true}'
    """
    try:
        return orjson.dumps(obj, option=_NUMPY, default=_to_python)
    except orjson.JSONEncodeError:
        pass
    # orjson refuses some arrays outright (e.g. big-endian) instead of calling
    # ``default``; the slow path converts every numpy object through Python.
    try:
        return orjson.dumps(obj, default=_to_python)
    except orjson.JSONEncodeError as e:
        raise EncodeError(f"json record: cannot encode: {e}") from None


def decode_json(data: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    """Decode one JSON record; it must be a JSON object.

    >>> decode_json(b'{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> decode_json(b'[1, 2]')
    Traceback (most recent call last):
    ...
    tensorstream.codecs.errors.DecodeError: json record: expected a JSON object, got list
    """
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise DecodeError(f"json record: invalid JSON: {e}") from None
    if type(record) is not dict:
        raise DecodeError(f"json record: expected a JSON object, got {type(record).__name__}")
    return record


def decode_json_batch(datas: Sequence[bytes]) -> list[dict[str, Any]]:
    """Decode many JSON records; the error names the index of the first bad one.

    >>> decode_json_batch([b'{"a":1}', b'[2]'])
    Traceback (most recent call last):
    ...
    tensorstream.codecs.errors.DecodeError: json record 1: expected a JSON object, got list
    """
    try:
        records = list(map(orjson.loads, datas))
        if all(type(r) is dict for r in records):
            return records
    except orjson.JSONDecodeError:
        pass
    # Slow path, only on failure: find the first bad record to name it.
    for i, data in enumerate(datas):
        try:
            decode_json(data)
        except DecodeError as e:
            raise DecodeError(f"json record {i}: {str(e).removeprefix('json record: ')}") from None
    raise AssertionError("unreachable: the fast path failed but every record decodes")
