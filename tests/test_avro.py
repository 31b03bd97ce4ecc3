"""Avro: plain (fastavro) and Confluent Schema Registry wire format, through the real broker.

The registry is confluent-kafka's own in-process mock (``mock://NAME``: no
registry server here); the wire format is checked byte by byte against the
spec (magic byte 0, 4-byte big-endian schema id, Avro binary) with fastavro
and the schema the registry holds for that id.
"""

from __future__ import annotations

import doctest
import io
import json
import struct
import time
import uuid

import fastavro
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from tensorstream.codecs import DecodeError, EncodeError, get_codec
from tensorstream.codecs.avro import PREDICTION_SCHEMA, RegistryUnavailable, schema_registry_client
from tensorstream.data.datasets import open_source
from tensorstream.examples import example_spec
from tensorstream.kafka import KafkaSink
from tensorstream.kafka.broker import free_port
from tensorstream.pipeline import Pipeline
from tensorstream.spec import BatchSpec, SchemaRegistrySpec, SinkSpec, SourceSpec, SpecError, parse_spec

_DOUBLES = ["empty_server_form_handler", "popup_window", "https", "request_from_other_domain",
            "anchor_from_other_domain", "is_popular", "long_url"]
PHISHING_V1 = {
    "type": "record", "name": "Website", "namespace": "test.phishing",
    "fields": [*({"name": f, "type": "double"} for f in _DOUBLES),
               {"name": "age_of_domain", "type": "long"}, {"name": "ip_in_url", "type": "long"},
               {"name": "y", "type": "boolean"}],
}
# v2: a new optional field with a default (a backward-compatible change)
PHISHING_V2 = {**PHISHING_V1, "fields": [*PHISHING_V1["fields"],
                                         {"name": "campaign", "type": ["null", "string"], "default": None}]}


def phishing(n: int) -> list[dict]:
    return list(open_source("river:Phishing", limit=n))


def _ctx(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


def _read(kafka_config, topic: str, n: int, timeout: float = 30.0) -> list:
    """Every record of every partition, by assignment (no group join: seconds faster on Tansu)."""
    c = Consumer({**kafka_config.client_settings(), "group.id": f"read-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in c.consume(500, 0.2) if m.error() is None]
        return out
    finally:
        c.close()


def _registry() -> tuple[str, object]:
    url = f"mock://test-{uuid.uuid4().hex[:10]}"
    return url, schema_registry_client(url)


def test_docstring_examples_run():
    import tensorstream.codecs as codecs
    import tensorstream.codecs.avro as avro

    for mod in (avro, codecs):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0


# --------------------------------------------------------------------------- plain Avro


def test_plain_avro_round_trip_inline_and_avsc(tmp_path):
    records = phishing(50)
    codec = get_codec("avro", schema=PHISHING_V1)
    assert codec.name == "avro"
    assert [codec.decode(codec.encode(r)) for r in records] == records
    assert codec.decode_batch([codec.encode(r) for r in records]) == records
    avsc = tmp_path / "website.avsc"
    avsc.write_text(json.dumps(PHISHING_V1))
    from_file = get_codec("avro", schema=str(avsc))
    assert from_file.encode(records[0]) == codec.encode(records[0])
    # the bytes are plain Avro: any Avro reader with the schema reads them
    parsed = fastavro.parse_schema(PHISHING_V1)
    assert fastavro.schemaless_reader(io.BytesIO(codec.encode(records[1])), parsed, None) == records[1]


def test_plain_avro_bad_input_raises_decode_error():
    codec = get_codec("avro", schema=PHISHING_V1)
    good = codec.encode(phishing(1)[0])
    with pytest.raises(DecodeError, match="truncated Avro data"):
        codec.decode(good[:-4])
    with pytest.raises(DecodeError, match="2 trailing bytes"):
        codec.decode(good + b"\x00\x00")
    with pytest.raises(DecodeError, match="avro record 1: truncated"):
        codec.decode_batch([good, good[:3]])
    with pytest.raises(EncodeError, match="does not match the schema"):
        codec.encode({"y": "not a bool"})
    with pytest.raises(ValueError, match="needs a schema"):
        get_codec("avro")
    with pytest.raises(ValueError, match="avro schema: invalid"):
        get_codec("avro", schema={"type": "record", "fields": []})
    with pytest.raises(ValueError, match="takes no options"):
        get_codec("json", schema=PHISHING_V1)


# --------------------------------------------------------------------------- registry wire format


def test_wire_format_is_magic_byte_schema_id_then_avro():
    url, client = _registry()
    topic = "websites"
    serializer = AvroSerializer(client, json.dumps(PHISHING_V1))  # confluent-kafka's own, default subject
    rec = phishing(1)[0]
    data = serializer(rec, _ctx(topic))
    registered = client.get_latest_version(f"{topic}-value")  # TopicNameStrategy
    magic, schema_id = struct.unpack(">bI", data[:5])
    assert magic == 0 and schema_id == registered.schema_id
    writer = fastavro.parse_schema(json.loads(client.get_schema(schema_id).schema_str))
    body = io.BytesIO(data[5:])
    assert fastavro.schemaless_reader(body, writer, None) == rec
    assert body.tell() == len(data) - 5, "nothing after the Avro datum"
    # our codec reads it, and writes the same bytes for the same subject
    codec = get_codec("avro-registry", registry=url, writer_schema=PHISHING_V1, subject=f"{topic}-value")
    assert codec.decode(data) == rec
    assert codec.encode(rec) == data


def test_schema_evolution_both_versions_decode():
    url, client = _registry()
    topic = "websites"
    rec = phishing(1)[0]
    v1 = AvroSerializer(client, json.dumps(PHISHING_V1))(rec, _ctx(topic))
    v2 = AvroSerializer(client, json.dumps(PHISHING_V2))({**rec, "campaign": "spring"}, _ctx(topic))
    assert sorted(client.get_versions(f"{topic}-value")) == [1, 2]
    (_, id1), (_, id2) = struct.unpack(">bI", v1[:5]), struct.unpack(">bI", v2[:5])
    assert id1 != id2
    writer_schemas = get_codec("avro-registry", registry=url)  # each record read with its own schema
    assert writer_schemas.decode(v1) == rec
    assert writer_schemas.decode(v2) == {**rec, "campaign": "spring"}
    resolved = get_codec("avro-registry", registry=url, reader_schema=PHISHING_V2)  # one shape for all
    assert resolved.decode(v1) == {**rec, "campaign": None}
    assert resolved.decode(v2) == {**rec, "campaign": "spring"}


def test_registry_bad_records_raise_decode_error_with_reason():
    url, client = _registry()
    good = AvroSerializer(client, json.dumps(PHISHING_V1))(phishing(1)[0], _ctx("t"))
    codec = get_codec("avro-registry", registry=url)
    cases = {
        b"this is not avro": "bad magic byte 0x74",
        b"\x01" + good[1:]: "bad magic byte 0x01",
        b"\x00\x00\x00\x01\x00" + good[5:]: "unknown schema id: the registry has no schema 256",
        good[:-5]: "truncated Avro data",
        good + b"\x00": "1 trailing bytes",
        good[:4]: "shorter than the 5-byte Confluent header",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError, match=reason):
            codec.decode(data)


def test_unreachable_registry_is_not_a_bad_record():
    registry = SchemaRegistrySpec(url=f"http://127.0.0.1:{free_port()}", config={"max.retries": 0})  # as in YAML
    codec = get_codec("avro-registry", **registry.codec_options())
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        codec.decode(b"\x00\x00\x00\x00\x07" + b"\x00" * 10)
    assert not issubclass(RegistryUnavailable, DecodeError), "the pipeline must stop, not dead-letter"


def test_spec_validation_names_the_avro_fields(tmp_path):
    base = dict(name="p", features={"numeric": ["*"]}, label={"field": "y", "classes": [False, True]}, mode="train")
    bad = [
        ({"topic": "t", "codec": "avro"}, "codec 'avro' needs 'schema'"),
        ({"topic": "t", "codec": "avro-registry"}, "needs 'schema_registry'"),
        ({"topic": "t", "codec": "avro-registry", "schema_registry": {"url": "localhost:8081"}},
         "source.schema_registry.url"),
        ({"topic": "t", "codec": "avro-registry",
          "schema_registry": {"url": "https://sr", "config": {"basic.auth.user.info": "u:p"}}},
         "TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
        ({"topic": "t", "codec": "json", "schema": PHISHING_V1}, "apply to the Avro codecs"),
        ({"topic": "t", "codec": "avro", "schema": str(tmp_path / "missing.avsc")}, "cannot read"),
    ]
    for source, msg in bad:
        with pytest.raises(SpecError, match=msg):
            parse_spec({**base, "source": source})
    with pytest.raises(SpecError, match="format 'avro-registry' needs 'schema_registry'"):
        parse_spec({**base, "source": {"topic": "t"}, "sink": {"topic": "o", "format": "avro-registry"}})
    spec = parse_spec({**base, "source": {"topic": "t", "codec": "avro", "schema": PHISHING_V1},
                       "sink": {"topic": "o", "format": "avro-registry", "schema_registry": {"url": "mock://x"}}})
    assert spec.source.codec_options() == {"schema": PHISHING_V1}
    assert spec.sink.codec_options()["subject"] == "o-value"
    dumped = spec.model_dump(mode="json", exclude_none=True)
    assert dumped["source"]["schema"] == PHISHING_V1, "written back as 'schema' (YAML round trip)"
    assert parse_spec(dumped) == spec


# --------------------------------------------------------------------------- through the broker


def _avro_spec(topic_factory, registry_url: str, **source):
    base = example_spec("phishing.yaml", backend="torch")
    src = topic_factory(1, prefix="avro")
    return base.model_copy(update={
        "name": f"avro-{src[-8:]}",
        "source": SourceSpec(topic=src, **source),
        "sink": SinkSpec(topic=src + ".pred", format="avro-registry", schema_registry={"url": registry_url}),
        "batch": BatchSpec(max_size=16, max_wait_ms=5),
    })


def test_avro_registry_records_through_the_pipeline_with_evolution_and_dead_letters(kafka_config, topic_factory):
    url, client = _registry()
    spec = _avro_spec(topic_factory, url, codec="avro-registry", schema_registry={"url": url})
    topic = spec.source.topic
    records = phishing(400)
    v1 = AvroSerializer(client, json.dumps(PHISHING_V1))
    v2 = AvroSerializer(client, json.dumps(PHISHING_V2))  # registered later, as version 2 of the subject
    values = [v1(r, _ctx(topic)) for r in records[:250]]
    values += [v2({**r, "campaign": f"c{i % 3}" if i % 2 else None}, _ctx(topic))
               for i, r in enumerate(records[250:])]
    assert sorted(client.get_versions(f"{topic}-value")) == [1, 2]
    good = values[0]
    bad = {  # position in the stream -> (bytes, the reason the DLQ must give)
        10: (b"not an avro record", "bad magic byte 0x6e"),
        60: (b"\x01" + good[1:], "bad magic byte 0x01"),
        120: (b"\x00\x00\x00\x03\xe7" + good[5:], "unknown schema id"),
        300: (good[:-6], "truncated Avro data"),
    }
    stream = list(values)
    for pos in sorted(bad):
        stream.insert(pos, bad[pos][0])
    with KafkaSink(kafka_config) as sink:
        for i, v in enumerate(stream):
            sink.produce(topic, v, key=f"k{i}".encode())
        sink.flush()

    result = Pipeline(spec, kafka_config).run(until_end=True, timeout=90)
    assert result.records == 404 and result.bad == 4 and result.predictions == 400, result
    assert result.metrics["n_learned"] == 400
    assert result.metrics["accuracy"] >= 0.75, result.metrics

    dead = _read(kafka_config, f"{spec.name}.dlq", 4)
    assert len(dead) == 4
    for rec in dead:
        h = dict(rec.headers())
        pos = int(h["source.offset"])
        data, reason = bad[pos]
        assert rec.value() == data and h["error.type"] == b"decode_error"
        assert reason in h["error.message"].decode(), (reason, h["error.message"])

    # predictions: Avro in the Confluent wire format, schema registered under <sink>-value
    preds = _read(kafka_config, spec.sink.topic, 400)
    assert len(preds) == 400
    registered = client.get_latest_version(f"{spec.sink.topic}-value")
    assert json.loads(registered.schema.schema_str)["name"] == PREDICTION_SCHEMA["name"]
    deserializer = AvroDeserializer(client)
    offsets = []
    for p in preds:
        assert p.value()[0] == 0 and struct.unpack(">I", p.value()[1:5])[0] == registered.schema_id
        out = deserializer(p.value(), _ctx(spec.sink.topic))
        assert isinstance(out["label"], bool) and len(out["proba"]) == 2 and out["value"] is None
        assert out["model_version"].startswith(spec.name + "@")
        assert out["source"]["topic"] == topic and p.key() == f"k{out['source']['offset']}".encode()
        offsets.append(out["source"]["offset"])
    assert sorted(offsets) == sorted(set(range(404)) - set(bad)), "one prediction per good record"


def test_plain_avro_records_through_the_pipeline(kafka_config, topic_factory, tmp_path):
    avsc = tmp_path / "website.avsc"
    avsc.write_text(json.dumps(PHISHING_V1))
    url, _ = _registry()
    spec = _avro_spec(topic_factory, url, codec="avro", schema=str(avsc))
    spec = spec.model_copy(update={"sink": SinkSpec(topic=spec.sink.topic), "mode": "train"})
    codec = get_codec("avro", schema=PHISHING_V1)
    with KafkaSink(kafka_config) as sink:
        for r in phishing(150):
            sink.produce(spec.source.topic, codec.encode(r))
        sink.produce(spec.source.topic, b"\x02")  # a truncated record
        sink.flush()
    result = Pipeline(spec, kafka_config).run(until_end=True, timeout=60)
    assert result.records == 151 and result.bad == 1 and result.metrics["n_learned"] == 150
