"""The embedded broker launcher: integrity check, clear errors, no orphans."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tensorstream.kafka import BrokerError, EmbeddedBroker, find_broker_binary
from tensorstream.kafka.broker import ENV_BINARY, ENV_BINARY_SHA256


def test_binary_hash_is_verified():
    assert find_broker_binary().is_file()


def test_tampered_binary_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    shutil.copy(find_broker_binary(), fake)
    with fake.open("ab") as f:
        f.write(b"\x00")
    monkeypatch.setenv(ENV_BINARY, str(fake))
    monkeypatch.setenv(ENV_BINARY_SHA256, "0" * 64)
    with pytest.raises(BrokerError, match="integrity check"):
        EmbeddedBroker().start()


def test_override_without_hash_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_BINARY, "/bin/true")
    monkeypatch.delenv(ENV_BINARY_SHA256, raising=False)
    with pytest.raises(BrokerError, match=ENV_BINARY_SHA256):
        find_broker_binary()


def test_port_taken_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(BrokerError, match="is taken"):
            EmbeddedBroker(port=s.getsockname()[1]).start()


def test_broker_that_dies_at_start_shows_its_log(tmp_path, monkeypatch):
    script = tmp_path / "tansu"
    script.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    script.chmod(0o755)
    import hashlib

    monkeypatch.setenv(ENV_BINARY, str(script))
    monkeypatch.setenv(ENV_BINARY_SHA256, hashlib.sha256(script.read_bytes()).hexdigest())
    with pytest.raises(BrokerError, match="(?s)exited at start.*boom: cannot start"):
        EmbeddedBroker().start()


def test_stop_and_restart_on_the_same_port():
    b = EmbeddedBroker().start()
    try:
        port, pid = b.port, b.pid
        b.stop()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        b.start()
        assert b.port == port and b.running
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        b.stop()


def test_no_orphan_when_the_parent_is_killed(tmp_path):
    code = textwrap.dedent("""
        import sys, time
        from tensorstream.kafka import EmbeddedBroker
        b = EmbeddedBroker().start()
        print(b.pid, flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    broker_pid = int(p.stdout.readline())
    assert psutil.pid_exists(broker_pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not psutil.pid_exists(broker_pid) or psutil.Process(broker_pid).status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.1)
    os.kill(broker_pid, signal.SIGKILL)
    pytest.fail("the broker outlived its killed parent")
