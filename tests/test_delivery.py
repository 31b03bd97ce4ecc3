"""Delivery guarantees of the inference worker and the pipeline's failure handling,
against the real broker: crash + restart, hot-swap, bad input, SIGTERM, outage."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kafkautil import drain
from procutil import start_run, write_spec
from tensorstream.checkpoint.versions import ModelRegistry, ModelWatcher, file_sha256
from tensorstream.examples import example_spec
from tensorstream.kafka import KafkaAdmin, KafkaSink, KafkaSource
from tensorstream.pipeline import Pipeline, PipelineError
from tensorstream.data.produce import produce_records

KEY = "k" * 32  # HMAC key for model announcements in these tests


@pytest.fixture(scope="module")
def trained_states(broker, tmp_path_factory):
    """Two torch state files trained on Phishing (v1: 300 records, v2: all)."""
    from tensorstream.kafka import KafkaConfig

    cfg = KafkaConfig.local(broker.bootstrap_servers)
    d = tmp_path_factory.mktemp("states")
    topic = "delivery-train-src"
    KafkaAdmin(cfg).ensure_topic(topic)
    produce_records(cfg, "river:Phishing", topic)
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={"name": "delivery-train", "mode": "train", "sink": None, "state_dir": str(d),
                                   "source": base.source.model_copy(update={"topic": topic})})
    out = {}
    pipe = Pipeline(spec, cfg)
    pipe.run(max_records=300, timeout=120)
    out["v1"] = str(d / "v1.safetensors")
    pipe.save_state(out["v1"])
    pipe = Pipeline(spec, cfg)  # resumes from its checkpoint
    pipe.run(until_end=True, timeout=120)
    out["v2"] = str(d / "v2.safetensors")
    pipe.save_state(out["v2"])
    return out


def _infer_spec(topic: str, name: str, **update):
    base = example_spec("phishing.yaml")
    return base.model_copy(update={
        "name": name, "mode": "infer",
        "source": base.source.model_copy(update={"topic": topic}),
        "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
        "batch": base.batch.model_copy(update={"max_size": 16, "max_wait_ms": 5}),
        **update,
    })


def _offsets_of(preds) -> list[int]:
    return [json.loads(p.value)["source"]["offset"] for p in preds]


def test_inference_worker_killed_and_restarted_misses_nothing(broker, kafka_config, topic_factory, trained_states,
                                                               tmp_path, group_id):
    topic = topic_factory(1, prefix="infer-crash")
    spec = _infer_spec(topic, f"infer-crash-{topic[-6:]}",
                       model=example_spec("phishing.yaml").model.model_copy(update={"weights": trained_states["v2"]}))
    spec_path = write_spec(spec, tmp_path / "spec.yaml")
    n = 3000
    produce_records(kafka_config, "river:Phishing", topic)
    produce_records(kafka_config, "river:Phishing", topic)
    produce_records(kafka_config, "river:Phishing", topic, limit=n - 2500)
    log = tmp_path / "worker.log"
    KafkaAdmin(kafka_config).ensure_topic(spec.sink.topic)
    p = start_run(spec_path, broker.bootstrap_servers, log=log)
    # Kill it mid-stream: once some predictions are out.
    with KafkaSource(kafka_config, group_id, [spec.sink.topic]) as out:
        first = drain(out, 200, timeout=60)
        assert len(first) >= 200
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        with KafkaSource(kafka_config, spec.group_id, [topic]) as probe:
            committed = probe.committed([(topic, 0)])[(topic, 0)] or 0
        # --allow-empty: the worker may have finished the stream before it was killed
        p = start_run(spec_path, broker.bootstrap_servers, "--until-end", "--allow-empty", log=log)
        assert p.wait(120) == 0, log.read_text()[-2000:]
        rest = drain(out, None, timeout=30, idle=3)
    offsets = _offsets_of(first + rest)
    assert set(offsets) == set(range(n)), "every input has at least one prediction"
    dups = {o for o in offsets if offsets.count(o) > 1}
    assert all(o >= committed for o in dups), "duplicates only after the last commit"
    print(f"committed at kill: {committed}; duplicates: {len(dups)}")


def test_hot_swap_between_batches_drops_and_repeats_nothing(broker, kafka_config, topic_factory, trained_states,
                                                            group_id, monkeypatch):
    monkeypatch.setenv("TENSORSTREAM_MODELS_HMAC_KEY", KEY)
    topic = topic_factory(1, prefix="swap")
    name = f"swap-{topic[-6:]}"
    base = example_spec("phishing.yaml")
    spec = _infer_spec(topic, name, versions=base.versions.model_copy(update={"watch": True}))
    reg = ModelRegistry(kafka_config, name)
    reg.publish("v1", trained_states["v1"])
    pipe = Pipeline(spec, kafka_config)
    import threading

    n = 2000
    result = {}
    t = threading.Thread(target=lambda: result.update(r=pipe.run(max_records=n, timeout=120)))
    t.start()
    # A steady input rate while versions change underneath.
    from tensorstream.data.datasets import open_source

    recs = [orjson.dumps(r) for r in open_source("river:Phishing")]
    with KafkaSink(kafka_config) as sink:
        for i in range(n):
            sink.produce(topic, recs[i % len(recs)], key=str(i).encode())
            if i == 100:  # the worker is up (joined, answering with v1) before versions change
                sink.flush()
                deadline = time.monotonic() + 60
                while pipe.records < 50 and time.monotonic() < deadline:
                    time.sleep(0.05)
            if i == 700:
                reg.publish("v2", trained_states["v2"])
            if i == 1000:  # tampered: signed with another key -> rejected
                evil = ModelRegistry(kafka_config, name, "x" * 32)
                evil.publish("evil", trained_states["v1"])
                evil.close()
            if i == 1200:  # right signature, but the weights file changed after announcing -> rejected
                bad = Path(trained_states["v1"]).with_name("v3.safetensors")
                bad.write_bytes(Path(trained_states["v1"]).read_bytes())
                reg.publish("v3", str(bad), sha256=file_sha256(str(bad)))
                bad.write_bytes(Path(trained_states["v2"]).read_bytes())
            if i % 50 == 0:
                sink.flush()
                time.sleep(0.02)
        sink.flush()
    t.join(150)
    reg.close()
    r = result["r"]
    assert r.records == n and r.predictions == n
    assert r.versions_seen[:2] == ["v1", "v2"] and "evil" not in r.versions_seen and "v3" not in r.versions_seen
    assert pipe.rejected_versions >= 1  # v3's hash mismatch (evil never passes signature verification)
    assert pipe.versions.watcher is not None
    with KafkaSource(kafka_config, group_id, [spec.sink.topic]) as src:
        preds = drain(src, n, timeout=60)
    by_offset = sorted((json.loads(p.value)["source"]["offset"], json.loads(p.value)["model_version"]) for p in preds)
    assert [o for o, _ in by_offset] == list(range(n)), "no record dropped or answered twice"
    versions = [v for _, v in by_offset]
    switch = versions.index("v2")
    assert set(versions[:switch]) == {"v1"} and set(versions[switch:]) == {"v2"}, "one switch, in order"
    # The switch is at a micro-batch boundary: the headers of the same batch agree.
    headers = {json.loads(p.value)["source"]["offset"]: dict(p.headers)["model.version"].decode() for p in preds}
    assert headers[switch] == "v2" and headers[switch - 1] == "v1"


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.lists(st.binary(max_size=64), min_size=5, max_size=15))
def test_bad_input_goes_to_the_dlq_and_valid_records_flow(garbage, broker, kafka_config, topic_factory, group_id):
    from tensorstream.codecs import encode_frame
    from tensorstream.data.datasets import open_source

    topic = topic_factory(1, prefix="bad")
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={
        "name": f"bad-{topic[-6:]}", "source": base.source.model_copy(update={"topic": topic}),
        "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
        "dead_letter": base.dead_letter.model_copy(update={"max_rate": 1.0})})
    good = [orjson.dumps(r) for r in open_source("river:Phishing", limit=200)]
    frame = encode_frame({"x": __import__("numpy").ones(3, "float32")})
    bad = [b"{not json", b'{"is_popular": "high", "y": true}', b'{"is_popular": 1e999, "y": true}',
           frame[: len(frame) // 2], b'{"y": "maybe", "is_popular": 0.5}', b'"just a string"', *garbage]
    # Garbage that happens to be a valid JSON object of numbers would be a (strange) valid record.
    with KafkaSink(kafka_config) as sink:
        for i, g in enumerate(good):
            sink.produce(topic, g)
            if i % 15 == 0 and bad:
                sink.produce(topic, bad.pop())
        for b in bad:
            sink.produce(topic, b)
        sink.flush()
    total_bad = 6 + len(garbage)
    r = Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    assert r.records == 200 + total_bad
    assert r.predictions + r.bad == r.records
    assert r.predictions >= 200
    with KafkaSource(kafka_config, group_id, [f"{spec.name}.dlq"]) as src:
        dlq = drain(src, r.bad, timeout=30)
    assert len(dlq) == r.bad >= 6
    for d in dlq:
        h = dict(d.headers)
        assert h["error.type"].decode() in {"decode_error", "wrong_type", "non_finite", "missing_field",
                                            "unknown_label", "not_a_record", "wrong_shape"}
        assert h["error.message"] and int(h["source.offset"]) >= 0


def test_too_many_bad_records_stop_the_pipeline_loudly(kafka_config, topic_factory):
    topic = topic_factory(1, prefix="broken")
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={"name": f"broken-{topic[-6:]}", "source": base.source.model_copy(
        update={"topic": topic}), "sink": base.sink.model_copy(update={"topic": topic + ".pred"})})
    produce_records(kafka_config, "river:Phishing", topic, limit=50)
    with KafkaSink(kafka_config) as sink:
        for _ in range(400):
            sink.produce(topic, b"\x00garbage")
        sink.flush()
    pipe = Pipeline(spec, kafka_config)
    with pytest.raises(PipelineError, match="max_rate"):
        pipe.run(until_end=True, timeout=120)
    with KafkaSource(kafka_config, spec.group_id, [topic]) as probe:
        committed = probe.committed([(topic, 0)])[(topic, 0)] or 0
    assert committed < 450, "the broken window was not committed"


def test_sigterm_finishes_checkpoints_commits_and_exits_0(broker, kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix="term")
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={
        "name": f"term-{topic[-6:]}", "mode": "train", "sink": None, "state_dir": str(tmp_path / "state"),
        "source": base.source.model_copy(update={"topic": topic}),
        "checkpoint": base.checkpoint.model_copy(update={"every_records": 100_000, "every_seconds": 3600})})
    produce_records(kafka_config, "river:Phishing", topic)
    log = tmp_path / "run.log"
    p = start_run(write_spec(spec, tmp_path / "s.yaml"), broker.bootstrap_servers, log=log)
    deadline = time.monotonic() + 60
    while b"assigned" not in (log.read_bytes() if log.exists() else b"") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0, log.read_text()[-2000:]
    from tensorstream.checkpoint import CheckpointStore

    _, info = CheckpointStore(spec.checkpoint_url).latest()
    with KafkaSource(kafka_config, spec.group_id, [topic]) as probe:
        committed = probe.committed([(topic, 0)])[(topic, 0)]
    assert info.n_learned > 0 and committed == info.offsets[(topic, 0)] == info.n_learned


def test_broker_outage_is_survived(tmp_path):
    """The broker stops for ~10 s and comes back empty (in-memory): the worker logs it,
    does not crash or spin, and processes new records afterwards."""
    import psutil

    from tensorstream.kafka import EmbeddedBroker, KafkaAdmin, KafkaConfig

    b = EmbeddedBroker().start()
    try:
        cfg = KafkaConfig.local(b.bootstrap_servers)
        base = example_spec("phishing.yaml")
        spec = base.model_copy(update={"name": "outage", "state_dir": str(tmp_path / "state"),
                                       "checkpoint": base.checkpoint.model_copy(update={"every_seconds": 1})})
        produce_records(cfg, "river:Phishing", spec.source.topic, limit=300)
        log = tmp_path / "run.log"
        # The embedded broker forgets idempotent producer ids when it restarts (README: known limits).
        p = start_run(write_spec(spec, tmp_path / "s.yaml"), b.bootstrap_servers, log=log,
                      env={"TENSORSTREAM_IDEMPOTENCE": "false"})
        deadline = time.monotonic() + 60
        while b"checkpoint" not in (log.read_bytes() if log.exists() else b"") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.poll() is None, log.read_text()[-2000:]
        b.stop()
        proc = psutil.Process(p.pid)
        proc.cpu_percent()
        time.sleep(10)
        cpu = proc.cpu_percent()  # over the outage
        assert p.poll() is None, "the worker survived the outage"
        assert cpu < 50, f"no busy loop during the outage ({cpu:.0f}% CPU)"
        b.start()  # same port, empty broker: recreate the topics, send new records
        admin = KafkaAdmin(cfg)
        admin.ensure_topic(spec.source.topic)
        admin.ensure_topic(spec.sink.topic)
        produce_records(cfg, "river:Phishing", spec.source.topic, limit=100)
        with KafkaSource(cfg, "outage-check", [spec.sink.topic]) as out:
            after = drain(out, 100, timeout=90)
        assert len(after) >= 100, "\n".join(l for l in log.read_text().splitlines() if "refused" not in l)[-6000:]
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(60)
    finally:
        b.stop()
