"""torch DataLoader over Kafka, against the real embedded broker (no mock of the client)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import orjson
import pytest
import torch
from confluent_kafka import Consumer, TopicPartition
from torch.utils.data import DataLoader

from tensorstream.bridges.common import OffsetCommitter, split_partitions
from tensorstream.kafka import KafkaConfig, KafkaSink
from tensorstream.data.produce import produce_records
from tensorstream.spec import FeatureSpec, LabelSpec
from tensorstream.torch import BadRecordError, KafkaIterableDataset


def produce_ids(cfg: KafkaConfig, topic: str, ids: range, partitions: int) -> None:
    with KafkaSink(cfg) as sink:
        for i in ids:
            rec = {"id": i, "x": float(i % 7) / 7.0, "y": i % 2}
            sink.produce(topic, orjson.dumps(rec), key=str(i).encode(), partition=i % partitions)
        sink.flush()


def record_ids(records) -> np.ndarray:
    """A ``decode=`` callable: the record ids (module level, so workers can unpickle it)."""
    return np.array([orjson.loads(r.value)["id"] for r in records], dtype=np.int64)


def committed(cfg: KafkaConfig, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({**cfg.consumer_settings(), "group.id": group})
    try:
        res = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {r.partition: r.offset for r in res if r.offset >= 0}  # partitions never committed left out
    finally:
        c.close()


def test_importing_bridges_imports_no_framework():
    code = ("import sys, tensorstream.bridges, tensorstream.bridges.common; "
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_partitions_is_disjoint_and_complete():
    tps = [("a", p) for p in range(5)] + [("b", 0)]
    for n in (1, 2, 3, 7):
        shares = [split_partitions(tps, i, n) for i in range(n)]
        flat = [tp for s in shares for tp in s]
        assert sorted(flat) == sorted(tps) and len(flat) == len(set(flat))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_dataloader_yields_every_record_exactly_once(kafka_config, topic_factory, group_id, workers):
    topic = topic_factory(4)
    n = 403
    produce_ids(kafka_config, topic, range(n), 4)
    ds = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=16, decode=record_ids)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    seen: list[int] = []
    ranges: dict[int, list[tuple[int, int]]] = {}
    for x, y, offsets in loader:
        assert y is None and x.dtype == torch.int64 and offsets.shape[1] == 4
        seen.extend(x.tolist())
        for _, p, first, nxt in offsets.tolist():
            ranges.setdefault(p, []).append((first, nxt))
    assert sorted(seen) == list(range(n))
    # the offset ranges of each partition tile [0, end) with no gap and no overlap
    for p, rs in ranges.items():
        rs.sort()
        assert rs[0][0] == 0 and all(a[1] == b[0] for a, b in zip(rs, rs[1:]))
        assert rs[-1][1] == len(range(p, n, 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_training_resumes_at_first_untrained_record(kafka_config, topic_factory, group_id, workers):
    topic = topic_factory(4)
    n, k, bs = 320, 7, 10
    produce_ids(kafka_config, topic, range(n), 4)
    features = FeatureSpec(numeric=["id", "x"], standardize=False)
    label = LabelSpec(field="y", classes=[0, 1])

    def train(max_steps: int | None) -> list[int]:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        ds = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=bs,
                                  features=features, label=label)
        trained: list[int] = []
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        for step, (x, y, offsets) in enumerate(loader):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trained.extend(int(i) for i in x[:, 0].tolist())
            ds.commit(offsets)  # after the optimizer step: exactly what was trained
            if max_steps is not None and step + 1 == max_steps:
                break  # "killed": the workers have prefetched batches beyond this step
        del loader
        ds.close()
        return trained

    first = train(k)
    assert len(first) == k * bs
    assert sum(committed(kafka_config, group_id, topic, 4).values()) == k * bs
    second = train(None)  # a new dataset and DataLoader in the same group
    assert not set(first) & set(second), "a record was trained twice"
    assert sorted(first + second) == list(range(n)), "a record was skipped"


def test_unbounded_yields_new_records_and_idle_timeout_ends(kafka_config, topic_factory, group_id):
    topic = topic_factory(2)
    produce_ids(kafka_config, topic, range(20), 2)
    ds = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=8, until=None,
                              idle_timeout=1.5, max_wait=0.2, decode=record_ids)
    started = threading.Event()

    def later() -> None:
        started.wait(10)
        time.sleep(0.3)
        produce_ids(kafka_config, topic, range(20, 50), 2)

    t = threading.Thread(target=later)
    t.start()
    seen: list[int] = []
    t0 = time.monotonic()
    for x, _, offsets in ds:
        started.set()
        seen.extend(x.tolist())
        ds.commit(offsets)
    t.join()
    assert sorted(seen) == list(range(50))
    assert time.monotonic() - t0 < 15
    assert sum(committed(kafka_config, group_id, topic, 2).values()) == 50


def test_single_records_and_dataloader_batching(kafka_config, topic_factory, group_id):
    topic = topic_factory(2)
    produce_ids(kafka_config, topic, range(30), 2)
    ds = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=None,
                              features=FeatureSpec(numeric=["id"], standardize=False),
                              label=LabelSpec(field="y", classes=[0, 1]))
    seen: list[int] = []
    for x, y, offsets in DataLoader(ds, batch_size=4):
        assert x.shape[1] == 1 and offsets.shape[-1] == 4
        seen.extend(int(i) for i in x[:, 0])
        ds.commit(offsets)
    assert sorted(seen) == list(range(30))
    assert committed(kafka_config, group_id, topic, 2) == {0: 15, 1: 15}


def test_tensor_frames_decode_without_a_spec(kafka_config, topic_factory, group_id):
    topic = topic_factory(1)
    produce_records(kafka_config, "river:Phishing", topic, encoding="frame", limit=100)
    ds = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=32, codec="frame")
    batches = list(ds)
    assert [len(b.x) for b in batches] == [32, 32, 32, 4]
    assert batches[0].x.dtype == torch.float32 and batches[0].x.shape[1] == 9
    assert batches[0].y.dtype == torch.bool


def test_bad_records_raise_or_go_to_the_dead_letter_topic(kafka_config, topic_factory, group_id):
    topic = topic_factory(1)
    dlq = topic_factory(1, prefix="dlq")
    with KafkaSink(kafka_config) as sink:
        for i in range(10):
            value = b"not json" if i in (3, 7) else orjson.dumps({"a": float(i), "y": i % 2})
            sink.produce(topic, value)
        sink.flush()
    spec = dict(features=FeatureSpec(numeric=["a"], standardize=False), label=LabelSpec(field="y", classes=[0, 1]))
    with pytest.raises(BadRecordError, match="@3: decode_error"):
        list(KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=4, **spec))
    ds = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=4,
                              dead_letter_topic=dlq, **spec)
    xs: list[float] = []
    for x, _, offsets in ds:
        xs.extend(x[:, 0].tolist())
        ds.commit(offsets)
    assert xs == [0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 8.0, 9.0]
    assert committed(kafka_config, group_id, topic, 1) == {0: 10}  # bad records are covered too
    c = Consumer({**kafka_config.consumer_settings(), "group.id": group_id + "-dlq", "enable.partition.eof": True})
    c.assign([TopicPartition(dlq, 0, 0)])
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        got += [m for m in c.consume(10, 0.2) if m.error() is None]
    c.close()
    assert [dict(m.headers())["source.offset"] for m in got] == [b"3", b"7"]
    assert {dict(m.headers())["error.type"] for m in got} == {b"decode_error"}


def test_committer_only_moves_forward(kafka_config, topic_factory, group_id):
    topic = topic_factory(2)
    with OffsetCommitter(kafka_config, group_id, [topic]) as c:
        c.commit(np.array([[0, 0, 0, 10], [0, 1, 0, 4]]))
        c.commit(np.array([[0, 0, 0, 5]]))  # older than what is committed: ignored
        assert c.commit() == {}
        assert c.committed == {(topic, 0): 10, (topic, 1): 4}
    assert committed(kafka_config, group_id, topic, 2) == {0: 10, 1: 4}


def test_start_at_tail_and_explicit_offset_ranges(kafka_config, topic_factory, group_id):
    topic = topic_factory(2)
    produce_ids(kafka_config, topic, range(40), 2)  # partition p holds ids p, p+2, ... at offsets 0..19
    tail = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=8, start=-3,
                                decode=record_ids)
    assert sorted(int(i) for b in tail for i in b.x) == [34, 35, 36, 37, 38, 39]
    # tensorflow-io's from_kafka(topic, partition=1, start=5, stop=9): one partition, one offset range
    window = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=8,
                                  start={(topic, 1): 5}, until={(topic, 1): 9}, decode=record_ids)
    assert [int(i) for b in window for i in b.x] == [11, 13, 15, 17]


def _collect_garbage(_worker_id: int) -> None:
    import gc

    gc.collect()


def test_worker_survives_inherited_kafka_client_garbage(kafka_config, topic_factory, group_id):
    """A live client in a garbage cycle of the parent must not be torn down in a forked worker."""
    topic = topic_factory(1)
    produce_ids(kafka_config, topic, range(20), 1)

    class Cycle:
        pass

    import gc

    ds = KafkaIterableDataset(topic, config=kafka_config, group_id=group_id, batch_size=8, decode=record_ids)
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=_collect_garbage)
    gc.disable()  # keep the garbage uncollected in the parent until the fork
    try:
        leak = Cycle()
        leak.me = leak
        leak.client = Consumer({**kafka_config.consumer_settings(), "group.id": group_id})
        leak.client.assign([TopicPartition(topic, 0, 0)])
        leak.client.consume(1, 1.0)  # its threads are running
        del leak
        it = iter(loader)  # forks the worker, which runs a full collection first
    finally:
        gc.enable()
    assert sorted(int(i) for b in it for i in b.x) == list(range(20))


def test_last_records_and_eof_in_one_poll_are_all_kept():
    """Regression: a poll holding a partition's last records and its EOF marker kept none of them."""
    from confluent_kafka import KafkaError, Message

    from tensorstream.bridges.common import PartitionReader, StreamOptions

    class OnePoll:  # stands in for the consumer's local queue: what consume() hands over
        def __init__(self, polls):
            self.polls = list(polls)

        def consume(self, n, timeout):
            return self.polls.pop(0) if self.polls else []

        def pause(self, tps):
            pass

    data = [Message(topic="t", partition=0, offset=o, value=b"{}") for o in range(6)]
    eof = Message(topic="t", partition=0, offset=6, error=KafkaError(KafkaError._PARTITION_EOF))
    reader = PartitionReader(StreamOptions(topics=["t"], config="127.0.0.1:1", group_id="g", codec="frame"),
                             [("t", 0)])
    reader.ends = {("t", 0): 6}
    reader.consumer = OnePoll([data[:2], data[2:] + [eof]])
    chunks = list(reader.chunks(4))
    assert [m.offset() for c in chunks for m in c] == list(range(6))
