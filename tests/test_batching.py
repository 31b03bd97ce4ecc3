"""The micro-batcher's calls into the source (a fake: the real one is exercised by every pipeline test)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from tensorstream.kafka import KafkaConfig
from tensorstream.observe.metrics import LATENCY_BUCKETS, BatchHistogram
from tensorstream.pipeline.batching import IDLE_POLL_S, next_batch
from tensorstream.pipeline.runner import DEFAULT_FETCH_WAIT_MS, _fetch_wait


class FakeSource:
    """``poll_batch`` as librdkafka's consume: up to n of what has arrived; ``arrivals`` come one per call."""

    def __init__(self, queued: int, arrivals: list[int] | None = None) -> None:
        self.queued = queued
        self.arrivals = list(arrivals or [])
        self.calls: list[tuple[int, float]] = []
        self.assigned = {("t", 0)}
        self.at_eof: set = set()
        self.next_offset = 0

    @property
    def at_end(self) -> bool:
        return bool(self.assigned) and self.at_eof >= self.assigned

    def poll_batch(self, n: int, timeout: float) -> list[int]:
        self.calls.append((n, timeout))
        if timeout > 0 and self.arrivals:
            self.queued += self.arrivals.pop(0)
        k = min(n, self.queued)
        self.queued -= k
        out = list(range(self.next_offset, self.next_offset + k))
        self.next_offset += k
        return out


def test_a_full_batch_already_fetched_is_taken_without_waiting():
    src = FakeSource(queued=100)
    assert next_batch(src, 32, 0.02) == list(range(32))
    assert src.calls == [(32, 0)]


def test_a_partial_batch_waits_at_most_max_wait_not_for_a_full_batch():
    # 5 records here: take them, then top up for at most max_wait (not librdkafka's "n or timeout").
    src = FakeSource(queued=5, arrivals=[3])
    batch = next_batch(src, 32, 0.02)
    assert batch == list(range(8))
    assert src.calls[0] == (32, 0)
    assert all(t <= 0.02 for _, t in src.calls[1:]), src.calls


def test_an_adaptive_batch_closes_when_nothing_more_is_buffered():
    src = FakeSource(queued=5, arrivals=[3, 3, 3])
    assert next_batch(src, 32, 0.5, adaptive=True) == list(range(5))  # not the 3 that arrive later
    assert src.calls == [(32, 0)]
    src = FakeSource(queued=100)
    assert next_batch(src, 32, 0.5, adaptive=True) == list(range(32))  # under load: full batches


def test_an_idle_source_returns_the_first_record_as_soon_as_it_comes():
    src = FakeSource(queued=0, arrivals=[1])
    batch = next_batch(src, 32, 0.0)  # max_wait 0: no top-up wait at all
    assert batch == [0]
    assert src.calls == [(32, 0), (1, IDLE_POLL_S), (31, 0)]


def test_nothing_at_all_is_an_empty_batch_after_one_idle_poll():
    src = FakeSource(queued=0)
    assert next_batch(src, 32, 0.02) == []
    assert src.calls == [(32, 0), (1, IDLE_POLL_S)]


def test_fetch_wait_default_spec_and_config():
    cfg = KafkaConfig.local("127.0.0.1:1")
    assert _fetch_wait(None, cfg) == {"fetch.wait.max.ms": DEFAULT_FETCH_WAIT_MS}
    assert _fetch_wait(7, cfg) == {"fetch.wait.max.ms": 7}
    tuned = KafkaConfig.local("127.0.0.1:1", extra={"fetch.wait.max.ms": 3})
    assert _fetch_wait(None, tuned) == {}  # the config's own setting stands
    assert _fetch_wait(7, tuned) == {"fetch.wait.max.ms": 7}  # the spec is more specific


def test_batch_histogram_exposes_what_a_prometheus_histogram_would():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.exponential(0.05, 1000), [0.0, 0.001, 0.0025, 10.0, 1e6]])  # bounds included
    mine, ref = CollectorRegistry(), CollectorRegistry()
    h = BatchHistogram("lat_seconds", "Latency.", ("pipeline",), ("p",), LATENCY_BUCKETS, mine)
    for chunk in np.array_split(values, 7):
        h.observe_many(chunk)
    h.observe_many(np.zeros(0))
    r = Histogram("lat_seconds", "Latency.", ("pipeline",), registry=ref, buckets=LATENCY_BUCKETS).labels("p")
    for v in values:
        r.observe(float(v))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in mine.collect() for s in m.samples}
    want = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in ref.collect() for s in m.samples
            if not s.name.endswith("_created")}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert abs(got[k] - v) <= 1e-9 * max(1.0, abs(v)), (k, got[k], v)


def test_batch_histogram_one_at_a_time_equals_many_at_once():
    values = [0.0, 0.001, 0.0025, 0.004, 10.0, 1e6, 0.05]  # bucket bounds included
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = BatchHistogram("h_seconds", "d", ("pipeline",), ("p",), LATENCY_BUCKETS, one)
    h2 = BatchHistogram("h_seconds", "d", ("pipeline",), ("p",), LATENCY_BUCKETS, many)
    for v in values:
        h1.observe_one(v)
    h2.observe_many(np.array(values))
    for le in [*map(str, LATENCY_BUCKETS), "+Inf"]:
        labels = {"pipeline": "p", "le": le}
        assert one.get_sample_value("h_seconds_bucket", labels) == many.get_sample_value("h_seconds_bucket", labels)
    assert one.get_sample_value("h_seconds_sum", {"pipeline": "p"}) == pytest.approx(sum(values))
