"""Produce and consume throughput through the embedded broker (loopback TCP).

    python benchmarks/bench_kafka.py [--records 100000]

Baseline measured in the same run: raw confluent-kafka Producer/Consumer loops
with the same settings, so the ratio is the cost of tensorstream's wrappers
(KafkaSink delivery tracking, KafkaSource Record objects), not the broker's speed.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from confluent_kafka import Consumer, Producer

from tensorstream.kafka import EmbeddedBroker, KafkaAdmin, KafkaConfig, KafkaSink, KafkaSource


def produce_ours(cfg: KafkaConfig, topic: str, n: int, payload: bytes) -> float:
    t = time.perf_counter()
    sink = KafkaSink(cfg)
    for _ in range(n):
        sink.produce(topic, payload)
    sink.close()
    return n / (time.perf_counter() - t)


def produce_raw(cfg: KafkaConfig, topic: str, n: int, payload: bytes) -> float:
    t = time.perf_counter()
    p = Producer({**cfg.client_settings(), "enable.idempotence": True, "linger.ms": 5})
    for _ in range(n):
        while True:
            try:
                p.produce(topic, payload)
                break
            except BufferError:
                p.poll(0.05)
    p.flush()
    return n / (time.perf_counter() - t)


def _wait_assigned_then_time(poll, n: int) -> float:
    got = 0
    t = None
    while got < n:
        k = poll()
        if k and t is None:
            t = time.perf_counter()  # exclude the group join
        got += k
    return got / (time.perf_counter() - t)


def consume_ours(cfg: KafkaConfig, topic: str, n: int) -> float:
    src = KafkaSource(cfg, f"bench-{uuid.uuid4().hex[:8]}", [topic])
    try:
        return _wait_assigned_then_time(lambda: len(src.poll_batch(1000, 0.5)), n)
    finally:
        src.close()


def consume_raw(cfg: KafkaConfig, topic: str, n: int) -> float:
    c = Consumer({**cfg.consumer_settings(), "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])

    def poll() -> int:
        return sum(1 for m in c.consume(1000, 0.5) if m.error() is None)

    try:
        return _wait_assigned_then_time(poll, n)
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"records per run: {args.records}, repeats: {args.repeats} (median shown)")
    print(f"{'case':<28}{'ours msg/s':>14}{'raw msg/s':>14}{'ratio':>8}{'ours MB/s':>11}")
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig.local(broker.bootstrap_servers)
        admin = KafkaAdmin(cfg)
        for size in (100, 4096):
            payload = b"x" * size
            prod = {"ours": [], "raw": []}
            cons = {"ours": [], "raw": []}
            for _ in range(args.repeats):
                topics = {}
                for who, fn in (("raw", produce_raw), ("ours", produce_ours)):
                    topics[who] = f"bench-{size}-{uuid.uuid4().hex[:6]}"
                    admin.ensure_topic(topics[who], 1)
                    prod[who].append(fn(cfg, topics[who], args.records, payload))
                cons["raw"].append(consume_raw(cfg, topics["raw"], args.records))
                cons["ours"].append(consume_ours(cfg, topics["ours"], args.records))
            for what, d in (("produce", prod), ("consume", cons)):
                o, r = statistics.median(d["ours"]), statistics.median(d["raw"])
                print(f"{what + f' {size} B':<28}{o:>14,.0f}{r:>14,.0f}{o / r:>8.2f}{o * size / 1e6:>11.1f}")


if __name__ == "__main__":
    main()
