"""The delivery engine with fakes: the commit order, sticky failures, refusals, forced stops,
dead letters that fit. (The same engine against the real broker: tests/test_faults.py.)"""

from __future__ import annotations

import doctest
import hashlib
import importlib
import threading
import time

import pytest

from tensorstream.delivery import (
    BadRateGuard,
    CommitRefused,
    DeadLetterError,
    DeadLetters,
    DeliveryEngine,
    DeliveryFailed,
    RunAborted,
    RunControl,
)
from tensorstream.kafka import DeliveryError, DeliveryTimeout, FailedDelivery, Record


class FakeSink:
    """Records calls; ``fail_flush`` makes flush raise a DeliveryError, ``stuck`` a DeliveryTimeout."""

    def __init__(self, calls: list[str]):
        self.calls = calls
        self.fail_flush = False
        self.stuck = False
        self.pending = 0
        self.produced: list[tuple] = []

    def flush(self, timeout: float = 30.0) -> None:
        self.calls.append("flush")
        if self.fail_flush:
            raise DeliveryError([FailedDelivery("out", None, "Broker: Message size too large")])
        if self.stuck:
            time.sleep(min(timeout, 0.05))
            raise DeliveryTimeout([FailedDelivery("*", None, "1 record(s) still undelivered")])

    def produce(self, topic, value, key=None, headers=None):
        self.produced.append((topic, value, key, headers))


def _engine(calls: list[str], *, persist: bool = True, **kw):
    sink = FakeSink(calls)

    def do_persist(offsets):
        calls.append(f"persist {sorted(offsets.items())}")
        return "ckpt"

    def do_commit(offsets):
        calls.append(f"commit {sorted(offsets.items())}")

    engine = DeliveryEngine(sink=sink, committer=do_commit, persist=do_persist if persist else None,
                            resume_from_positions=persist, **kw)
    return engine, sink


def _recs(tp, offsets):
    return [Record(tp[0], tp[1], o, None, b"v", None, None) for o in offsets]


def test_commit_order_is_flush_then_persist_then_commit():
    calls: list[str] = []
    engine, _ = _engine(calls)
    engine.advance(_recs(("t", 0), range(5)))
    outcome = engine.commit()
    assert calls == ["flush", "persist [(('t', 0), 5)]", "commit [(('t', 0), 5)]"]
    assert outcome.persisted == "ckpt" and outcome.committed
    calls.clear()
    assert not engine.commit().committed and calls == []  # nothing new: nothing at all


def test_a_failed_flush_is_sticky_on_every_path():
    calls: list[str] = []
    engine, sink = _engine(calls)
    engine.advance(_recs(("t", 0), range(3)))
    sink.fail_flush = True
    with pytest.raises(DeliveryFailed, match="too large"):
        engine.commit()
    sink.fail_flush = False  # even if later flushes succeed (the failed record is gone for good)
    engine.advance(_recs(("t", 0), range(3, 6)))
    for path in (engine.commit, lambda: engine.persist_and_commit(), engine.flush):
        with pytest.raises(DeliveryFailed):
            path()
    engine.on_revoke([("t", 0)])  # a rebalance or close(): must not commit either
    assert not any(c.startswith(("persist", "commit")) for c in calls), calls
    assert "not committed" in engine.summary()


def test_a_failed_persist_is_sticky_and_commits_nothing():
    calls: list[str] = []

    def broken(offsets):
        calls.append("persist")
        raise OSError("disk full")

    engine = DeliveryEngine(sink=FakeSink(calls), committer=lambda o: calls.append("commit"), persist=broken)
    engine.advance(_recs(("t", 0), range(3)))
    with pytest.raises(DeliveryFailed, match="disk full"):
        engine.commit()
    with pytest.raises(DeliveryFailed):
        engine.commit()
    assert "commit" not in calls and calls.count("persist") == 1


def test_a_refused_commit_is_retried_without_persisting_again():
    calls: list[str] = []
    refuse = [True]

    def committer(offsets):
        calls.append(f"commit {sorted(offsets.items())}")
        if refuse[0]:
            raise CommitRefused("Broker: Unknown member")

    engine = DeliveryEngine(sink=FakeSink(calls), committer=committer,
                            persist=lambda o: calls.append("persist") or "c", resume_from_positions=True)
    engine.advance(_recs(("t", 0), range(4)))
    assert not engine.commit().committed  # refused: logged, not a failure
    assert engine.failure is None and engine.refused == 1
    refuse[0] = False
    assert engine.commit().committed  # owed: committed now, from the durable offsets, no second checkpoint
    assert calls == ["flush", "persist", "commit [(('t', 0), 4)]", "flush", "commit [(('t', 0), 4)]"]


def test_training_resumes_every_assignment_from_the_models_position():
    engine, _ = _engine([], positions={("t", 0): 100})
    assert engine.start_offset(("t", 0)) == 100  # the restored checkpoint's offset, not the group's
    engine.advance(_recs(("t", 0), range(100, 150)))
    assert engine.start_offset(("t", 0)) == 150  # after a revoke + re-assign: where the model is now
    engine.on_revoke([("t", 0)])
    assert engine.start_offset(("t", 0)) == 150 and engine.durable[("t", 0)] == 150
    infer, _ = _engine([], persist=False)
    infer.advance(_recs(("t", 0), range(3)))
    assert infer.start_offset(("t", 0)) is None  # inference: the group's committed offset
    infer.on_revoke([("t", 0)])
    assert ("t", 0) not in infer.positions  # a revoked partition is the new owner's


def test_admit_drops_revoked_partitions_and_follows_a_reset_partition(caplog):
    engine, _ = _engine([], positions={("t", 0): 50})
    batch = _recs(("t", 0), range(50, 53)) + _recs(("t", 1), range(3))
    assert [(r.partition, r.offset) for r in engine.admit(batch, {("t", 0)})] == [(0, 50), (0, 51), (0, 52)]
    # offsets went back (the broker lost the topic): new data, learned, and said so
    again = engine.admit(_recs(("t", 0), range(0, 5)), {("t", 0)})
    assert len(again) == 5 and engine.positions[("t", 0)] == 0
    assert "went back" in caplog.text


def test_group_members_commit_only_their_partitions():
    calls: list[str] = []
    owned = {("t", 0)}
    engine, _ = _engine(calls, persist=False, owned=lambda: owned)
    engine.advance(_recs(("t", 0), range(3)) + _recs(("t", 1), range(7)))
    engine.commit()
    assert calls[-1] == "commit [(('t', 0), 3)]"


def test_a_forced_stop_ends_a_stuck_flush_and_commits_nothing():
    calls: list[str] = []
    control = RunControl(grace_s=0.3)
    engine, sink = _engine(calls, control=control)
    engine.advance(_recs(("t", 0), range(3)))
    sink.stuck = True  # the broker is gone: records stay queued
    control.request_stop("SIGTERM")
    t = time.monotonic()
    with pytest.raises(RunAborted):
        engine.commit()
    assert time.monotonic() - t < 2.0, "the grace period bounds the wait"
    assert control.aborted
    assert engine.commit().committed is False  # aborted: no more waiting, persisting or committing
    assert not any(c.startswith(("persist", "commit")) for c in calls)


def test_a_second_signal_aborts_at_once_and_runs_the_watchdog():
    control = RunControl(grace_s=60)
    fired = threading.Event()
    control.on_abort(lambda c: fired.set())
    control.request_stop("SIGINT")
    assert control.wait_left() > 50
    control.request_abort("second SIGINT")
    control.request_abort("third SIGINT")
    assert fired.is_set() and control.wait_left() == 0
    with pytest.raises(RunAborted):
        control.check()


def test_a_deadline_stops_by_itself():
    control = RunControl(grace_s=1)
    control.set_deadline(0.05)
    assert not control.stopping
    time.sleep(0.08)
    assert control.stopping and "--timeout" in control.reason


def test_transactions_commit_outputs_and_offsets_together_or_fail_sticky():
    seen: list[dict] = []
    engine = DeliveryEngine(transaction=lambda offsets: seen.append(dict(offsets)))
    engine.advance(_recs(("t", 0), range(4)))
    assert engine.commit().committed and seen == [{("t", 0): 4}]

    def broken(offsets):
        raise RuntimeError("transaction aborted: fenced")

    engine = DeliveryEngine(transaction=broken)
    engine.advance(_recs(("t", 0), range(4)))
    with pytest.raises(DeliveryFailed, match="fenced"):
        engine.commit()
    with pytest.raises(DeliveryFailed):
        engine.commit()


# -- dead letters -------------------------------------------------------------------------
def _rec(value: bytes, key: bytes | None = b"k", headers=None) -> Record:
    return Record("in", 2, 77, key, value, headers, None)


def test_small_dead_letters_carry_the_record_and_the_reason():
    sink = FakeSink([])
    dlq = DeadLetters(sink, "p.dlq")
    dlq.send(_rec(b"{bad", headers=[("trace", b"1")]), "decode_error", "not JSON")
    topic, value, key, headers = sink.produced[0]
    h = dict(headers)
    assert (topic, value, key) == ("p.dlq", b"{bad", b"k")
    assert h["trace"] == b"1" and h["error.type"] == b"decode_error" and h["source.offset"] == b"77"
    assert "dlq.truncated" not in h and dlq.first.startswith("in[2]@77: decode_error")


@pytest.mark.parametrize("size", [2_000_000, 5_000_000])
def test_dead_letters_over_the_limit_are_truncated_with_what_identifies_the_original(size):
    sink = FakeSink([])
    dlq = DeadLetters(sink, "p.dlq", max_bytes=1_000_000)
    value = bytes(range(256)) * (size // 256)
    dlq.send(_rec(value, key=b"x" * 400_000, headers=[("big", b"h" * 600_000)]), "decode_error", "e" * 10_000)
    _, out, key, headers = sink.produced[0]
    h = dict(headers)
    total = len(out) + len(key) + sum(len(k) + len(v) for k, v in headers)
    assert total <= 1_000_000 - 256, "the dead letter fits the producer's limit"
    assert h["dlq.truncated"] == b"true" and int(h["dlq.original.size"]) == len(value)
    assert h["dlq.original.sha256"].decode() == hashlib.sha256(value).hexdigest()
    assert out == value[:len(out)] and len(out) > 0, "a prefix of the original"
    assert h["dlq.headers.dropped"] == b"1" and "big" not in h  # the 600 kB header could not stay
    assert h["dlq.key.truncated"] == b"true" and len(key) < 400_000
    assert len(h["error.message"]) <= 4096 and h["source.partition"] == b"2"
    assert dlq.truncated == 1


def test_the_bad_rate_guard_quotes_the_first_reason():
    g = BadRateGuard(max_rate=0.5, min_records=10, topic="p.dlq")
    g.observe(8, 1)
    with pytest.raises(DeadLetterError, match="first: in\\[0\\]@3: decode_error"):
        g.observe(8, 8, "in[0]@3: decode_error: not JSON")


@pytest.mark.parametrize("module", ["engine", "deadletters", "control"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"tensorstream.delivery.{module}"))
    assert result.failed == 0 and result.attempted > 0
