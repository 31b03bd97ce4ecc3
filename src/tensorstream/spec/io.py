"""Where records come from and where predictions go: topics, codecs, Schema Registry."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from tensorstream.spec.base import _Strict


class SchemaRegistrySpec(_Strict):
    """A Confluent Schema Registry (Avro records carry a schema id; docs/avro.md)."""

    #: ``http(s)://host:8081``, or ``mock://NAME`` (confluent-kafka's in-process mock, for tests)
    url: str = Field(min_length=1)
    #: client settings by confluent-kafka's names (e.g. ``ssl.ca.location``). Credentials go in
    #: $TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (or ..._FILE), never in a spec file.
    config: dict[str, str | bool | int | float] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "mock://")):
            raise ValueError("must start with http://, https:// or mock://")
        return v

    @field_validator("config")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "basic.auth.user.info" in v or "bearer.auth.client.secret" in v:
            raise ValueError("credentials do not belong in a spec file: set "
                             "TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (or ..._FILE)")
        return v

    def codec_options(self) -> dict[str, Any]:
        return {"registry": self.url, "config": dict(self.config)}


def _check_avro_schema(schema: Any) -> None:
    from tensorstream.codecs.avro import _parse  # fastavro: imported only for Avro specs

    _parse(schema)


class SourceSpec(_Strict):
    """Where records come from."""

    # ``schema`` is a BaseModel attribute: the field is ``schema_``, spelled ``schema`` in specs.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, serialize_by_alias=True)

    #: the topic to read (it must exist, unless ``create``)
    topic: str = Field(min_length=1)
    #: how record values are encoded: JSON objects, tensor frames (docs/tensor-frame-format.md),
    #: Avro with the schema in the spec, or Avro in the Confluent Schema Registry wire format
    codec: Literal["json", "frame", "avro", "avro-registry"] = "json"
    group_id: str | None = None  # default: "tensorstream.<pipeline name>"
    #: where a group without committed offsets (and a trainer without a checkpoint) starts
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: create the source topic (and the labels topic) when missing; by default a missing source
    #: topic stops the run before it starts (a typo would otherwise wait forever on an empty topic)
    create: bool = False
    #: field of a tensor-frame record holding the features (frame codec only)
    frame_field: str | None = None
    #: Avro schema, inline or a ``.avsc`` path (relative to the working directory): the
    #: writer schema for ``avro`` (required); for ``avro-registry`` an optional reader
    #: schema that records of every registered version are resolved to
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    #: the registry of ``codec: avro-registry``
    schema_registry: SchemaRegistrySpec | None = None
    #: librdkafka ``fetch.wait.max.ms``: how long the broker may hold a fetch that found
    #: no new record. Kafka answers as soon as data arrives; the embedded Tansu broker
    #: holds it the whole time, so on an idle-then-busy stream this bounds the added
    #: latency. None: 100 ms, unless ``KafkaConfig.extra`` sets it (librdkafka's own is 500)
    fetch_wait_ms: int | None = Field(default=None, ge=0, le=10_000)

    @model_validator(mode="after")
    def _avro_needs(self) -> SourceSpec:
        if self.codec == "avro" and self.schema_ is None:
            raise ValueError("codec 'avro' needs 'schema' (inline Avro schema or a .avsc path)")
        if self.codec == "avro-registry" and self.schema_registry is None:
            raise ValueError("codec 'avro-registry' needs 'schema_registry' (at least its url)")
        if self.codec not in ("avro", "avro-registry") and (self.schema_ is not None or self.schema_registry):
            raise ValueError(f"'schema' and 'schema_registry' apply to the Avro codecs, not {self.codec!r}")
        if self.schema_ is not None:
            _check_avro_schema(self.schema_)
        return self

    def codec_options(self) -> dict[str, Any]:
        """Keyword arguments of ``codecs.get_codec(self.codec, ...)``."""
        if self.codec == "avro":
            return {"schema": self.schema_}
        if self.codec == "avro-registry":
            assert self.schema_registry is not None
            return {**self.schema_registry.codec_options(), "reader_schema": self.schema_}
        return {}


class SinkSpec(_Strict):
    """Where predictions go (one record per input record, same key)."""

    #: the topic predictions are written to (created if missing)
    topic: str = Field(min_length=1)
    #: ``json``, or ``avro-registry``: Avro in the Confluent wire format, with the
    #: predictions schema (``codecs.avro.PREDICTION_SCHEMA``) registered under ``subject``
    format: Literal["json", "avro-registry"] = "json"
    #: default ``<topic>-value`` (the TopicNameStrategy)
    subject: str | None = None
    #: the registry of ``format: avro-registry``
    schema_registry: SchemaRegistrySpec | None = None
    #: headers on each prediction (the value always carries the model version and the source
    #: position): ``version`` = ``model.version``; ``all`` adds ``source.topic``,
    #: ``source.partition``, ``source.offset``, ``event.timestamp.ms``; ``none``. Each header
    #: costs per record: five of them doubled the time to produce a prediction (pipeline/outputs.py)
    headers: Literal["version", "all", "none"] = "version"

    @model_validator(mode="after")
    def _avro_needs(self) -> SinkSpec:
        if self.format == "avro-registry" and self.schema_registry is None:
            raise ValueError("format 'avro-registry' needs 'schema_registry' (at least its url)")
        if self.format == "json" and (self.subject is not None or self.schema_registry is not None):
            raise ValueError("'subject' and 'schema_registry' apply to format 'avro-registry'")
        return self

    def codec_options(self) -> dict[str, Any]:
        """Keyword arguments of ``codecs.get_codec("avro-registry", ...)`` (writer schema aside)."""
        assert self.schema_registry is not None
        return {**self.schema_registry.codec_options(), "subject": self.subject or f"{self.topic}-value"}
