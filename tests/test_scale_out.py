"""Scale-out inference: workers in one consumer group share a 6-partition topic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from kafkautil import drain
from procutil import start_run, write_spec
from tensorstream.examples import example_spec
from tensorstream.kafka import KafkaAdmin, KafkaSource
from tensorstream.pipeline import Pipeline
from tensorstream.data.produce import produce_records

PARTITIONS = 6


@pytest.fixture(scope="module")
def state_file(broker, tmp_path_factory):
    from tensorstream.kafka import KafkaConfig

    cfg = KafkaConfig.local(broker.bootstrap_servers)
    d = tmp_path_factory.mktemp("scale")
    base = example_spec("phishing.yaml")
    KafkaAdmin(cfg).ensure_topic("scale-train")
    produce_records(cfg, "river:Phishing", "scale-train")
    spec = base.model_copy(update={"name": "scale-train", "mode": "train", "sink": None, "state_dir": str(d),
                                   "source": base.source.model_copy(update={"topic": "scale-train"})})
    pipe = Pipeline(spec, cfg)
    pipe.run(until_end=True, timeout=120)
    path = str(d / "model.safetensors")
    pipe.save_state(path)
    return path


def _spec(topic: str, state: str):
    base = example_spec("phishing.yaml")
    return base.model_copy(update={
        "name": f"scale-{topic[-6:]}", "mode": "infer",
        "source": base.source.model_copy(update={"topic": topic}),
        "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
        "model": base.model.model_copy(update={"weights": state}),
        "batch": base.batch.model_copy(update={"max_size": 32, "max_wait_ms": 5})})


def _prediction_offsets(kafka_config, topic: str, n: int, group: str) -> Counter:
    with KafkaSource(kafka_config, group, [topic]) as src:
        preds = drain(src, n, timeout=90)
        preds += drain(src, None, timeout=5, idle=2)  # and any duplicates after the first n
    return Counter((json.loads(p.value)["source"]["partition"], json.loads(p.value)["source"]["offset"])
                   for p in preds)


def _produce_spread(kafka_config, topic: str, n: int) -> None:
    """n Phishing records keyed user-<i>: keys spread them over the partitions."""
    import orjson

    from tensorstream.data.datasets import open_source
    from tensorstream.kafka import KafkaSink

    recs = list(open_source("river:Phishing"))
    with KafkaSink(kafka_config) as sink:
        for i in range(n):
            sink.produce(topic, orjson.dumps(recs[i % 1250]), key=f"user-{i}".encode())
        sink.flush()


def _wait_for(log, text: bytes, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(text) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear {count} times in {log}")


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_share_partitions_exactly_once_in_steady_state(workers, broker, kafka_config, topic_factory,
                                                               state_file, tmp_path, group_id):
    topic = topic_factory(PARTITIONS, prefix="scale")
    spec = _spec(topic, state_file)
    KafkaAdmin(kafka_config).ensure_topic(spec.sink.topic)
    n = 3000
    _produce_spread(kafka_config, topic, n)
    path = write_spec(spec, tmp_path / "spec.yaml")
    env = {**os.environ, "TENSORSTREAM_SESSION_TIMEOUT_MS": "3000", "TENSORSTREAM_HEARTBEAT_INTERVAL_MS": "300",
           "OMP_NUM_THREADS": "1"}
    # All workers join before records flow: start them, then wait for the group to settle.
    p = subprocess.Popen([sys.executable, "-m", "tensorstream", "run", str(path), "-b", broker.bootstrap_servers,
                          "--workers", str(workers), "--timeout", "45"], env=env, start_new_session=True)
    try:
        counts = _prediction_offsets(kafka_config, spec.sink.topic, n, group_id)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(60) == 0
    assert sum(1 for _ in counts) == n, "every record has a prediction"
    dups = sum(c - 1 for c in counts.values())
    # Steady state means: no member change while records flow. Group joins at start can
    # move partitions once (the first member may begin before the others arrive):
    # duplicates are then confined to the uncommitted window, and counted here.
    print(f"{workers} workers: {dups} duplicate predictions")
    assert dups <= 32 * PARTITIONS


def test_adding_and_removing_workers_loses_nothing(broker, kafka_config, topic_factory, state_file, tmp_path,
                                                   group_id):
    topic = topic_factory(PARTITIONS, prefix="elastic")
    spec = _spec(topic, state_file)
    KafkaAdmin(kafka_config).ensure_topic(spec.sink.topic)
    path = write_spec(spec, tmp_path / "spec.yaml")
    log = tmp_path / "workers.log"
    w1 = start_run(path, broker.bootstrap_servers, log=log)
    w2 = start_run(path, broker.bootstrap_servers, log=log)
    _wait_for(log, b"assigned", 1)
    _produce_spread(kafka_config, topic, 2500)
    time.sleep(2)
    w3 = start_run(path, broker.bootstrap_servers, log=log)  # add a worker mid-stream
    _produce_spread(kafka_config, topic, 2500)
    _wait_for(log, b"assigned", 3)  # the group rebalanced to include it
    time.sleep(2)
    os.killpg(w1.pid, signal.SIGTERM)  # remove one gracefully
    assert w1.wait(60) == 0
    os.killpg(w2.pid, signal.SIGKILL)  # and lose one abruptly
    w2.wait()
    _produce_spread(kafka_config, topic, 2500)
    n = 7500
    counts = _prediction_offsets(kafka_config, spec.sink.topic, n, group_id)
    os.killpg(w3.pid, signal.SIGTERM)
    w3.wait(60)
    assert sum(1 for _ in counts) == n, "nothing lost across joins, a graceful leave and a crash"
    dups = sum(c - 1 for c in counts.values())
    print(f"duplicates after join/leave/crash: {dups} of {n}")
