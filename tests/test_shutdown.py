"""A stop can always be forced: the broker is gone with predictions still queued, and the process
must end within seconds of a second signal, of a first signal's grace period, or of --timeout,
saying what was not committed (it used to ignore SIGTERM, SIGINT and --timeout for minutes)."""

from __future__ import annotations

import os
import signal
import time

import orjson
import pytest

from procutil import start_run, write_spec
from tensorstream.examples import example_spec
from tensorstream.kafka import EmbeddedBroker, KafkaAdmin, KafkaConfig, KafkaSink

#: the CLI's grace period after a first signal, and its exit watchdog after a forced stop (cli/common.py)
GRACE_S, WATCHDOG_S = 5.0, 4.0


def _stuck_run(tmp_path, *args: str, idempotent: bool = False):
    """A trainer+predictor whose broker disappears while it still works through a prefetched backlog:
    its predictions queue up and can never be delivered."""
    b = EmbeddedBroker().start()
    cfg = KafkaConfig.local(b.bootstrap_servers)
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={"name": f"stuck-{tmp_path.name[-8:]}", "state_dir": str(tmp_path / "state"),
                                   "batch": base.batch.model_copy(update={"max_size": 1, "max_wait_ms": 5})})
    admin = KafkaAdmin(cfg)
    admin.ensure_topic(spec.source.topic)
    admin.ensure_topic(spec.sink.topic)
    value = orjson.dumps({f"f{i}": 0.5 for i in range(9)} | {"y": True})
    with KafkaSink(cfg) as sink:  # a backlog the run cannot finish before the broker goes
        sink.produce_many(spec.source.topic, ((value, None, None, 0) for _ in range(100_000)))
    log = tmp_path / "run.log"
    env = {"TENSORSTREAM_IDEMPOTENCE": "true" if idempotent else "false"}
    p = start_run(write_spec(spec, tmp_path / "s.yaml"), b.bootstrap_servers, *args, log=log, env=env)
    deadline = time.monotonic() + 60
    while b"assigned" not in (log.read_bytes() if log.exists() else b"") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # processing: the consumer has prefetched thousands of records
    assert p.poll() is None, _tail(log)
    b.stop()  # gone: what the run predicts from here on can never be delivered
    time.sleep(1.5)
    assert p.poll() is None, "still running (waiting for the broker)\n" + _tail(log)
    return p, log, b


def _wait_exit(p, limit: float) -> float:
    t0 = time.monotonic()
    try:
        p.wait(limit + 20)
    except Exception:  # noqa: BLE001
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return time.monotonic() - t0


def _tail(log) -> str:
    return "\n".join(line for line in log.read_text().splitlines() if "refused" not in line)[-3000:]


def test_a_second_sigterm_forces_the_stop_at_once(tmp_path):
    p, log, b = _stuck_run(tmp_path)
    try:
        os.killpg(p.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGTERM)
        took = _wait_exit(p, WATCHDOG_S + 3)
        assert took <= WATCHDOG_S + 3, f"{took:.1f}s\n{_tail(log)}"
        assert p.returncode not in (0, None), _tail(log)
        text = log.read_text()
        assert "forced" in text and "not committed" in text, _tail(log)
    finally:
        b.stop()


def test_one_sigterm_gives_up_after_the_grace_period(tmp_path):
    p, log, b = _stuck_run(tmp_path, idempotent=True)
    try:
        os.killpg(p.pid, signal.SIGTERM)
        took = _wait_exit(p, GRACE_S + WATCHDOG_S + 3)
        assert took <= GRACE_S + WATCHDOG_S + 3, f"{took:.1f}s\n{_tail(log)}"
        assert p.returncode not in (0, None), _tail(log)
        assert "not committed" in log.read_text(), _tail(log)
    finally:
        b.stop()


@pytest.mark.parametrize("timeout", [15])
def test_timeout_ends_a_stuck_run(tmp_path, timeout):
    t0 = time.monotonic()
    p, log, b = _stuck_run(tmp_path, "--timeout", str(timeout))
    try:
        _wait_exit(p, timeout + GRACE_S + WATCHDOG_S + 10)
        took = time.monotonic() - t0
        # the run's own clock starts a little after ours (imports, group join)
        assert took <= timeout + GRACE_S + WATCHDOG_S + 10, f"{took:.1f}s\n{_tail(log)}"
        assert p.returncode not in (0, None), _tail(log)
        assert "--timeout" in log.read_text(), _tail(log)
    finally:
        b.stop()
