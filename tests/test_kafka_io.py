"""Kafka I/O against the real embedded broker over TCP."""

from __future__ import annotations

import threading
import time

import pytest

from kafkautil import drain
from tensorstream.kafka import DeliveryError, KafkaConfig, KafkaSink, KafkaSource


def _produce(cfg: KafkaConfig, topic: str, n: int, start: int = 0) -> None:
    with KafkaSink(cfg) as sink:
        for i in range(start, start + n):
            sink.produce(topic, b"value-%d" % i, key=b"key-%d" % i, headers=[("i", str(i).encode())])
        sink.flush()


def test_raw_bytes_round_trip(kafka_config, topic_factory, group_id):
    topic = topic_factory(1)
    payloads = [bytes(range(256)) * 3, b"", b"\x00" * 17, "ünïcode".encode()]
    with KafkaSink(kafka_config) as sink:
        for i, p in enumerate(payloads):
            sink.produce(topic, p, key=str(i).encode(), headers={"h": b"\xff\x00"})
        sink.flush()
        assert sink.delivered == len(payloads)
    with KafkaSource(kafka_config, group_id, [topic]) as src:
        got = drain(src, len(payloads))
    assert [r.value or b"" for r in got] == payloads
    assert [r.key for r in got] == [b"0", b"1", b"2", b"3"]
    assert [r.offset for r in got] == [0, 1, 2, 3]
    assert got[0].headers == [("h", b"\xff\x00")]


def test_commit_then_resume_sees_every_record_once(kafka_config, topic_factory, group_id):
    topic = topic_factory(3)
    _produce(kafka_config, topic, 300)
    first: list = []
    with KafkaSource(kafka_config, group_id, [topic]) as src:
        first = drain(src, 120)
        # Commit exactly what we keep: the next offset after the last kept record per partition.
        first = first[:120]
        nxt: dict = {}
        for r in first:
            nxt[(r.topic, r.partition)] = max(nxt.get((r.topic, r.partition), 0), r.offset + 1)
        # Records past the kept ones on each partition are "not processed": drop them.
        src.commit(nxt)
        assert src.committed(nxt.keys()) == nxt
    with KafkaSource(kafka_config, group_id, [topic]) as src:
        second = drain(src, 300 - 120, timeout=30)
    seen = [(r.partition, r.offset) for r in first + second]
    assert len(seen) == 300
    assert len(set(seen)) == 300
    values = sorted(int(r.value.split(b"-")[1]) for r in first + second)
    assert values == list(range(300))


def test_two_consumers_split_partitions(kafka_config, topic_factory, group_id):
    topic = topic_factory(4)
    _produce(kafka_config, topic, 400)
    results: dict[int, list] = {0: [], 1: []}
    srcs = [KafkaSource(kafka_config, group_id, [topic]) for _ in range(2)]
    stop = time.monotonic() + 25

    def run(i: int) -> None:
        while time.monotonic() < stop and sum(len(v) for v in results.values()) < 400:
            results[i].extend(srcs[i].poll_batch(100, 0.2))

    # Both join before either reads everything: start them together.
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assigned = [set(s.assigned) for s in srcs]
    for s in srcs:
        s.close()
    all_recs = results[0] + results[1]
    keys = [(r.partition, r.offset) for r in all_recs]
    assert len(keys) == len(set(keys)) == 400, "no overlap and no gap"
    assert assigned[0] and assigned[1], f"both members got partitions: {assigned}"
    assert not (assigned[0] & assigned[1])
    assert assigned[0] | assigned[1] == {(topic, p) for p in range(4)}


def test_failed_delivery_is_reported_message_too_large(kafka_config, topic_factory):
    topic = topic_factory(1)
    sink = KafkaSink(kafka_config)
    sink.produce(topic, b"ok")
    sink.produce(topic, b"x" * 3_000_000)  # over librdkafka's default message.max.bytes
    with pytest.raises(DeliveryError) as ei:
        sink.flush()
    assert "too large" in str(ei.value).lower()
    assert ei.value.failures[0].topic == topic
    assert sink.delivered == 1


def test_produce_many_delivers_and_reports_failures(kafka_config, topic_factory, group_id):
    topic = topic_factory(1)
    sink = KafkaSink(kafka_config)
    ok = [(f"v{i}".encode(), f"k{i}".encode(), [("h", str(i).encode())], 1_700_000_000_000 + i) for i in range(50)]
    assert sink.produce_many(topic, ok) == 50
    sink.flush()
    assert (sink.produced, sink.delivered, sink.pending) == (50, 50, 0)
    sink.produce_many(topic, [(b"x" * 3_000_000, None, None, 0), (b"last", None, None, 0)])
    with pytest.raises(DeliveryError) as ei:
        sink.flush()
    assert "too large" in str(ei.value).lower() and sink.delivered == 51
    sink.close()
    with KafkaSource(kafka_config, group_id, [topic]) as src:
        got = drain(src, 51)
    assert [r.value for r in got] == [v for v, *_ in ok] + [b"last"]
    assert [r.key for r in got[:50]] == [k for _, k, *_ in ok]
    assert got[7].headers == [("h", b"7")] and got[7].timestamp_ms == 1_700_000_000_007


def test_failed_delivery_is_reported_invalid_topic(kafka_config):
    sink = KafkaSink(kafka_config, **{"message.timeout.ms": 3000})
    sink.produce("no such topic!", b"v")  # illegal name: cannot exist
    with pytest.raises(DeliveryError):
        sink.flush(timeout=15)


def test_end_offsets_count_batched_records(kafka_config, admin, topic_factory):
    topic = topic_factory(3)
    _produce(kafka_config, topic, 250)
    ends = admin.end_offsets(topic)
    assert sum(ends.values()) == 250


def test_start_offsets_override_committed(kafka_config, topic_factory, group_id):
    topic = topic_factory(1)
    _produce(kafka_config, topic, 20)
    with KafkaSource(kafka_config, group_id, [topic], start_offsets=lambda tp: 15) as src:
        got = drain(src, 5)
    assert [r.offset for r in got] == [15, 16, 17, 18, 19]


def test_pause_and_resume(kafka_config, topic_factory, group_id):
    topic = topic_factory(1)
    _produce(kafka_config, topic, 10)
    with KafkaSource(kafka_config, group_id, [topic]) as src:
        got = drain(src, 10)
        assert len(got) == 10
        src.pause()
        _produce(kafka_config, topic, 5, start=10)
        assert drain(src, None, timeout=2, idle=1) == []
        src.resume()
        assert len(drain(src, 5)) == 5


def test_dropped_clients_are_freed_without_the_cyclic_gc(kafka_config, topic_factory, group_id):
    """A client's callbacks must not keep their owner alive: `KafkaAdmin(cfg).ensure_topic(t)` and
    friends would otherwise leave librdkafka handles reconnecting (and logging) until a GC pass."""
    import gc
    import weakref

    from tensorstream.kafka import KafkaAdmin

    topic = topic_factory(1)
    gc.collect()
    gc.disable()
    try:
        admin = KafkaAdmin(kafka_config)
        admin.ensure_topic(topic)
        sink = KafkaSink(kafka_config)
        sink.produce(topic, b"x")
        sink.flush()
        src = KafkaSource(kafka_config, group_id, [topic])
        src.poll_batch(1, 0.1)
        refs = [weakref.ref(o) for o in (admin, sink, src)]
        del admin, sink, src
        assert [r() is None for r in refs] == [True, True, True]
    finally:
        gc.enable()
