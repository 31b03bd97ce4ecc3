"""Bytes to records and arrays, and back. No deep-learning framework imports.

Codecs, each with one verb per direction:

- ``"json"``: JSON objects (orjson); numpy values encode as lists/numbers.
- ``"frame"``: tensor frames, numpy arrays decoded zero-copy
  (see ``docs/tensor-frame-format.md``).
- ``"avro"`` (``schema=``) and ``"avro-registry"`` (``registry=`` URL or client,
  Confluent wire format): Avro records as dicts (``codecs/avro.py``,
  ``docs/avro.md``). These two take options, so ``get_codec`` builds them.

Every malformed input raises :class:`DecodeError` (a ``ValueError``) with a
message fit for a dead-letter header.

>>> import numpy as np
>>> codec = get_codec("frame")
>>> codec.decode(codec.encode(np.arange(3)))
array([0, 1, 2])
>>> get_codec("json").decode_batch([b'{"a": 1}', b'{"a": 2}'])
[{'a': 1}, {'a': 2}]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DecodeError, EncodeError
from .frame import decode_frame, decode_frames, encode_frame
from .jsonc import decode_json, decode_json_batch, encode_json

__all__ = [
    "Codec",
    "DecodeError",
    "EncodeError",
    "decode_frame",
    "decode_frames",
    "decode_json",
    "decode_json_batch",
    "encode_frame",
    "encode_json",
    "get_codec",
]


@dataclass(frozen=True)
class Codec:
    """A named pair of encode/decode functions plus a batch decoder.

    >>> codec = get_codec("json")
    >>> codec.name, codec.encode({"a": 1})
    ('json', b'{"a":1}')
    """

    name: str
    _encode: Callable[[Any], bytes] = field(repr=False)
    _decode: Callable[[bytes], Any] = field(repr=False)
    _decode_batch: Callable[[Sequence[bytes]], Any] = field(repr=False)

    def encode(self, value: Any) -> bytes:
        return self._encode(value)

    def decode(self, data: bytes) -> Any:
        return self._decode(data)

    def decode_value(self, value: bytes | None) -> Any:
        """A Kafka record's value: like ``decode``, and an empty value (a tombstone) is a ``DecodeError``."""
        if value is None:
            raise DecodeError("empty record value (tombstone)")
        return self._decode(value)

    def decode_batch(self, datas: Sequence[bytes]) -> Any:
        """JSON: a list of dicts. Frame: arrays stacked along a new first axis."""
        return self._decode_batch(datas)


_CODECS = {
    "json": Codec("json", encode_json, decode_json, decode_json_batch),
    "frame": Codec("frame", encode_frame, decode_frame, decode_frames),
}


def _avro(schema: Any = None, reader_schema: Any = None) -> Codec:
    from .avro import avro_codec

    if schema is None:
        raise ValueError("codec 'avro' needs a schema (inline Avro schema JSON or a .avsc path)")
    return avro_codec(schema, reader_schema)


def _avro_registry(registry: Any = None, **options: Any) -> Codec:
    from .avro import registry_codec

    if registry is None:
        raise ValueError("codec 'avro-registry' needs a schema registry (a URL: http(s)://..., or mock://NAME)")
    return registry_codec(registry, **options)


#: codecs built per use from options (a schema, a registry)
_FACTORIES: dict[str, Callable[..., Codec]] = {"avro": _avro, "avro-registry": _avro_registry}


def get_codec(name: str, **options: Any) -> Codec:
    """Return the codec registered under ``name`` (built from ``options`` for Avro).

    >>> get_codec("frame").name
    'frame'
    >>> get_codec("xml")
    Traceback (most recent call last):
    ...
    ValueError: unknown codec 'xml'; known codecs: 'avro', 'avro-registry', 'frame', 'json'
    """
    if name in _FACTORIES:
        return _FACTORIES[name](**options)
    try:
        codec = _CODECS[name]
    except KeyError:
        known = ", ".join(repr(n) for n in sorted([*_CODECS, *_FACTORIES]))
        raise ValueError(f"unknown codec {name!r}; known codecs: {known}") from None
    if options:
        raise ValueError(f"codec {name!r} takes no options (got {', '.join(sorted(options))})")
    return codec
