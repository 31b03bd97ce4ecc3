"""Avro records: plain (schema from the spec) and Confluent Schema Registry wire format.

Two codecs, both decoding to dicts (so a ``FeatureSpec`` picks fields by name,
as for JSON):

- ``"avro"``: plain Avro binary, no framing; writer schema from the spec
  (inline JSON or a ``.avsc`` path). fastavro ``schemaless_reader``/``writer``.
- ``"avro-registry"``: the Confluent wire format, ``0x00`` + 4-byte big-endian
  schema id + Avro binary. Read and written with confluent-kafka's
  ``AvroDeserializer``/``AvroSerializer`` and a ``SchemaRegistryClient``
  (``mock://NAME`` URLs give confluent-kafka's in-process mock registry).
  Each record is read with the schema its id names (the writer's); with a
  reader schema, records are resolved to it (Avro schema evolution: fields
  added with a default appear with that default in older records).

Every malformed record raises :class:`DecodeError` naming what is wrong (bad
magic byte, unknown schema id, truncated data, trailing bytes), so the pipeline
dead-letters it. A registry that cannot be *reached* is not a bad record: that
raises :class:`RegistryUnavailable` and the pipeline stops without committing.

>>> schema = {"type": "record", "name": "P", "fields": [{"name": "x", "type": "double"}]}
>>> codec = avro_codec(schema)
>>> codec.decode(codec.encode({"x": 1.5}))
{'x': 1.5}
>>> client = schema_registry_client("mock://doctest")
>>> reg = registry_codec(client, writer_schema=schema, subject="points-value")
>>> data = reg.encode({"x": 2.0})
>>> data[:5]                     # magic byte 0, schema id 1
b'\\x00\\x00\\x00\\x00\\x01'
>>> reg.decode(data)
{'x': 2.0}
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastavro
from fastavro import schemaless_reader, schemaless_writer

from .errors import DecodeError, EncodeError

if TYPE_CHECKING:  # pragma: no cover
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from . import Codec

__all__ = [
    "BASIC_AUTH_ENV",
    "PREDICTION_SCHEMA",
    "RegistryUnavailable",
    "WIRE_MAGIC",
    "avro_codec",
    "load_schema",
    "registry_codec",
    "schema_registry_client",
    "wire_header",
]

#: first byte of the Confluent wire format (schema id follows, 4 bytes big-endian)
WIRE_MAGIC = 0
_HEADER = struct.Struct(">bI")

#: Schema Registry basic auth ("user:password"), or ``..._FILE`` naming a file holding it
BASIC_AUTH_ENV = "TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"

#: the predictions a pipeline writes when its sink has ``format: avro-registry``
#: (the same fields as the JSON predictions; ``label``/``proba`` for classification,
#: ``value`` for regression, the others null)
PREDICTION_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Prediction",
    "namespace": "tensorstream",
    "fields": [
        {"name": "label", "type": ["null", "boolean", "long", "double", "string"], "default": None},
        {"name": "proba", "type": ["null", {"type": "array", "items": "double"}], "default": None},
        {"name": "value", "type": ["null", "double"], "default": None},
        {"name": "model_version", "type": "string"},
        {"name": "source", "type": {
            "type": "record", "name": "SourcePosition",
            "fields": [
                {"name": "topic", "type": "string"},
                {"name": "partition", "type": "int"},
                {"name": "offset", "type": "long"},
            ],
        }},
    ],
}


class RegistryUnavailable(RuntimeError):
    """The Schema Registry could not be reached or failed (not a bad record: stop, do not dead-letter)."""


def load_schema(schema: str | Path | Mapping[str, Any] | list[Any]) -> dict[str, Any] | list[Any] | str:
    """An Avro schema as JSON data: a mapping as is, a JSON string, or a ``.avsc`` path.

    >>> load_schema('{"type": "array", "items": "long"}')
    {'type': 'array', 'items': 'long'}
    """
    if isinstance(schema, (Mapping, list)):
        return dict(schema) if isinstance(schema, Mapping) else list(schema)
    text = str(schema)
    if isinstance(schema, str) and text.lstrip()[:1] in ("{", "[", '"'):
        source = "inline schema"
    else:
        path = Path(text).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"avro schema: cannot read {path}: {e.strerror or e}") from None
        source = str(path)
    try:
        return json.loads(text)  # type: ignore[no-any-return]
    except json.JSONDecodeError as e:
        raise ValueError(f"avro schema: {source} is not valid JSON: {e}") from None


def _parse(schema: Any) -> Any:
    try:
        return fastavro.parse_schema(load_schema(schema))
    except (fastavro.schema.SchemaParseException, fastavro.schema.UnknownType, TypeError, KeyError) as e:
        raise ValueError(f"avro schema: invalid: {e}") from None


def _read_exact(buf: io.BytesIO, size: int, writer: Any, reader: Any, what: str) -> Any:
    """One datum from ``buf``, which must hold exactly that datum."""
    try:
        value = schemaless_reader(buf, writer, reader)
    except (EOFError, struct.error, IndexError) as e:
        raise DecodeError(f"{what}: truncated Avro data ({size} bytes): {e}") from None
    except fastavro.read.SchemaResolutionError as e:
        raise DecodeError(f"{what}: cannot resolve to the reader schema: {e}") from None
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, KeyError, MemoryError) as e:
        raise DecodeError(f"{what}: invalid Avro data: {e}") from None
    if buf.tell() != size:
        raise DecodeError(f"{what}: {size - buf.tell()} trailing bytes after the Avro record")
    return value


def _decode_batch(decode: Any, name: str) -> Any:
    def batch(datas: Sequence[bytes]) -> list[Any]:
        out = []
        for i, data in enumerate(datas):
            try:
                out.append(decode(data))
            except DecodeError as e:
                raise DecodeError(f"{name} record {i}: {str(e).removeprefix(name + ' record: ')}") from None
        return out

    return batch


# --------------------------------------------------------------------------- plain Avro


def avro_codec(schema: Any, reader_schema: Any = None) -> Codec:
    """Plain Avro binary with a fixed writer schema (no framing, no registry).

    ``reader_schema`` (optional) resolves records to another, compatible schema.
    """
    from . import Codec

    writer = _parse(schema)
    reader = _parse(reader_schema) if reader_schema is not None else None

    def encode(record: Any) -> bytes:
        buf = io.BytesIO()
        try:
            schemaless_writer(buf, writer, record, strict=True)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise EncodeError(f"avro record: does not match the schema: {e}") from None
        return buf.getvalue()

    def decode(data: bytes) -> Any:
        return _read_exact(io.BytesIO(data), len(data), writer, reader, "avro record")

    return Codec("avro", encode, decode, _decode_batch(decode, "avro"))


# --------------------------------------------------------------------------- Schema Registry

_CLIENTS: dict[str, SchemaRegistryClient] = {}
_CLIENTS_LOCK = threading.Lock()


def _env_secret(var: str) -> str | None:
    if var in os.environ:
        return os.environ[var]
    if var + "_FILE" in os.environ:
        with open(os.environ[var + "_FILE"]) as f:
            return f.read().strip()
    return None


def schema_registry_client(url: str, config: Mapping[str, Any] | None = None) -> SchemaRegistryClient:
    """One shared client per registry configuration (its schema caches are shared too).

    ``config`` takes confluent-kafka's client settings (``ssl.ca.location``,
    ``basic.auth.user.info``, ...). Basic auth may come from
    ``$TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`` (or ``..._FILE``) so
    that it never sits in a spec file. ``mock://NAME`` gives confluent-kafka's
    in-process mock registry; the same NAME returns the same mock.
    """
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf = {"url": url, **(config or {})}
    if "basic.auth.user.info" not in conf:
        auth = _env_secret(BASIC_AUTH_ENV)
        if auth:
            conf["basic.auth.credentials.source"] = "USER_INFO"
            conf["basic.auth.user.info"] = auth
    key = json.dumps(conf, sort_keys=True, default=str)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = SchemaRegistryClient.new_client(conf)
        return client


def wire_header(data: bytes) -> int:
    """The schema id of a Confluent wire-format record (DecodeError if the framing is wrong).

    >>> wire_header(b"\\x00\\x00\\x00\\x01\\x00" + b"avro")
    256
    >>> wire_header(b"\\x01abcdefgh")
    Traceback (most recent call last):
    ...
    tensorstream.codecs.errors.DecodeError: avro-registry record: bad magic byte 0x01 (expected 0x00: Confluent wire format)
    """
    if len(data) < _HEADER.size:
        raise DecodeError(f"avro-registry record: {len(data)} bytes, shorter than the 5-byte Confluent header "
                          "(magic byte 0x00 + 4-byte schema id)")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != WIRE_MAGIC:
        raise DecodeError(f"avro-registry record: bad magic byte 0x{magic & 0xFF:02x} "
                          "(expected 0x00: Confluent wire format)")
    return int(schema_id)


class _Payload(threading.local):
    buf: io.BytesIO | None = None


def registry_codec(client: SchemaRegistryClient | str, *, reader_schema: Any = None,
                   writer_schema: Any = None, subject: str | None = None,
                   config: Mapping[str, Any] | None = None) -> Codec:
    """Avro in the Confluent wire format, through a Schema Registry.

    Decoding needs only the registry (the record names its schema id);
    ``reader_schema`` resolves every record to one schema. Encoding needs
    ``writer_schema`` and ``subject`` (e.g. ``"<topic>-value"``, the
    TopicNameStrategy); the schema is registered (or looked up) on first use.
    """
    from confluent_kafka.schema_registry import SchemaRegistryError
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.serialization import SerializationError

    from . import Codec

    if isinstance(client, str):
        client = schema_registry_client(client, config)
    reader = json.dumps(load_schema(reader_schema)) if reader_schema is not None else None
    if reader is not None:
        _parse(reader)  # a bad reader schema fails here, not on the first record
    payload = _Payload()

    def strict_prefix(data: bytes, ctx: Any, schema_id: Any) -> io.BytesIO:
        # Only the classic framing (magic 0 + 4-byte id; no GUIDs, no header ids),
        # and keep the buffer so we can tell whether the datum used every byte.
        buf = schema_id.from_bytes(io.BytesIO(data))
        payload.buf = buf
        return buf  # type: ignore[no-any-return]

    deserializer = AvroDeserializer(client, reader, conf={"schema.id.deserializer": strict_prefix})

    def decode(data: bytes) -> Any:
        schema_id = wire_header(data)
        what = f"avro-registry record (schema id {schema_id})"
        try:
            value = deserializer(bytes(data), None)
        except SchemaRegistryError as e:
            if e.http_status_code == 404:
                raise DecodeError(f"{what}: unknown schema id: the registry has no schema {schema_id} "
                                  f"({e.error_message})") from None
            raise RegistryUnavailable(f"schema registry error for schema id {schema_id}: {e}") from e
        except (EOFError, struct.error, IndexError) as e:
            raise DecodeError(f"{what}: truncated Avro data ({len(data)} bytes): {e}") from None
        except SerializationError as e:
            raise DecodeError(f"{what}: {e}") from None
        except fastavro.read.SchemaResolutionError as e:
            raise DecodeError(f"{what}: cannot resolve to the reader schema: {e}") from None
        except (ValueError, TypeError, UnicodeDecodeError, OverflowError, KeyError, MemoryError) as e:
            raise DecodeError(f"{what}: invalid Avro data: {e}") from None
        except Exception as e:  # httpx transport errors and the like: the registry, not the record
            if type(e).__module__.startswith(("httpx", "httpcore", "ssl", "socket")) or isinstance(e, OSError):
                raise RegistryUnavailable(f"schema registry unreachable: {e}") from e
            raise DecodeError(f"{what}: {type(e).__name__}: {e}") from None
        buf, payload.buf = payload.buf, None
        if buf is not None and buf.tell() != len(data):
            raise DecodeError(f"{what}: {len(data) - buf.tell()} trailing bytes after the Avro record")
        return value

    serializer = None
    if writer_schema is not None:
        if not subject:
            raise ValueError("avro-registry: encoding needs a subject (e.g. '<topic>-value')")
        writer = json.dumps(load_schema(writer_schema))
        _parse(writer)
        serializer = AvroSerializer(client, writer, conf={
            "auto.register.schemas": True,
            "subject.name.strategy": lambda ctx, record_name: subject,
        })

    def encode(record: Any) -> bytes:
        if serializer is None:
            raise EncodeError("avro-registry: this codec was built without a writer schema and subject")
        try:
            return serializer(record, None)  # type: ignore[no-any-return]
        except SchemaRegistryError as e:
            raise RegistryUnavailable(f"schema registry refused subject {subject!r}: {e}") from e
        except (ValueError, TypeError, KeyError, AttributeError, SerializationError) as e:
            raise EncodeError(f"avro-registry record: does not match the schema of {subject!r}: {e}") from None

    return Codec("avro-registry", encode, decode, _decode_batch(decode, "avro-registry"))
