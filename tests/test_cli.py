"""The command line against the real broker, and interop with kcat (a client nobody here wrote)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorstream.cli import app

runner = CliRunner()


def _cli(*args: str) -> str:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_produce_then_consume_json(broker, topic_factory):
    topic = topic_factory(1)
    _cli("produce", "river:Phishing", "-t", topic, "-b", broker.bootstrap_servers, "--limit", "50", "-q")
    lines = _cli("consume", topic, "-b", broker.bootstrap_servers, "-n", "50").strip().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 50
    assert [r["offset"] for r in recs] == list(range(50))
    assert set(recs[0]["value"]) >= {"is_popular", "y"}


def test_produce_frames_and_count(broker, topic_factory):
    topic = topic_factory(2)
    _cli("produce", "river:drift.sea", "-t", topic, "-b", broker.bootstrap_servers, "--limit", "120",
         "--encoding", "frame", "-q")
    assert _cli("consume", topic, "-b", broker.bootstrap_servers, "--count", "--timeout", "1").strip() == "120"
    first = json.loads(_cli("consume", topic, "-b", broker.bootstrap_servers, "-n", "1", "--decode", "frame"))
    assert len(first["value"]["x"]) == 3 and first["value"]["y"] in (True, False)


def test_produce_from_files_with_rate(broker, topic_factory, tmp_path: Path):
    rows = [{"a": i, "b": i * 0.5, "id": f"r{i}"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("a,b,id\n" + "\n".join(f"{r['a']},{r['b']},{r['id']}" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for ext in ("jsonl", "csv", "parquet"):
        topic = topic_factory(1)
        _cli("produce", str(tmp_path / f"d.{ext}"), "-t", topic, "-b", broker.bootstrap_servers,
             "--key-field", "id", "--rate", "400", "-q")
        got = [json.loads(x) for x in _cli("consume", topic, "-b", broker.bootstrap_servers, "-n", "20").splitlines()]
        assert [g["value"] for g in got] == rows, ext
        assert [g["key"] for g in got] == [r["id"] for r in rows]


def test_clear_errors(broker):
    res = runner.invoke(app, ["produce", "river:synth.Agrawal", "-t", "x", "-b", broker.bootstrap_servers])
    assert res.exit_code == 1 and "--limit" in res.output
    res = runner.invoke(app, ["produce", "nope.csv", "-t", "x", "-b", broker.bootstrap_servers])
    assert res.exit_code == 1 and "no such file" in res.output


@pytest.fixture(scope="module")
def kcat_env(tmp_path_factory):
    """kcat, run against the librdkafka that confluent-kafka ships.

    Debian's kcat links librdkafka 2.0.2, which cannot parse the embedded
    broker's ApiVersions v3 response (a known limit, see the README); the
    same kcat binary with the newer librdkafka works.
    """
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.fail("kcat is not installed: `apt-get install kcat` (scripts/setup.sh does it)")
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    lib = next(libs.glob("librdkafka*.so*"))
    d = tmp_path_factory.mktemp("rdkafka")
    (d / "librdkafka.so.1").symlink_to(lib)
    return kcat, {**os.environ, "LD_LIBRARY_PATH": str(d)}


def test_kcat_produces_tensorstream_consumes(broker, topic_factory, kcat_env):
    kcat, env = kcat_env
    topic = topic_factory(1)
    lines = "".join(json.dumps({"i": i, "s": "é"}) + "\n" for i in range(30))
    subprocess.run([kcat, "-b", broker.bootstrap_servers, "-t", topic, "-P", "-K", "|"], env=env, check=True,
                   input="".join(f"k{i}|{json.dumps({'i': i, 's': 'é'})}\n" for i in range(30)).encode(), timeout=60)
    got = [json.loads(x) for x in _cli("consume", topic, "-b", broker.bootstrap_servers, "-n", "30").splitlines()]
    assert [g["value"] for g in got] == [json.loads(x) for x in lines.splitlines()]
    assert [g["key"] for g in got] == [f"k{i}" for i in range(30)]


def test_tensorstream_produces_kcat_consumes(broker, topic_factory, kcat_env):
    kcat, env = kcat_env
    topic = topic_factory(1)
    _cli("produce", "river:Phishing", "-t", topic, "-b", broker.bootstrap_servers, "--limit", "25", "-q")
    res = subprocess.run([kcat, "-b", broker.bootstrap_servers, "-t", topic, "-C", "-e", "-q", "-f", "%o %s\n"],
                         env=env, check=True, capture_output=True, timeout=60)
    rows = res.stdout.decode().strip().splitlines()
    assert len(rows) == 25
    from tensorstream.data.datasets import open_source

    expected = list(open_source("river:Phishing", limit=25))
    for i, row in enumerate(rows):
        off, _, value = row.partition(" ")
        assert int(off) == i
        assert json.loads(value) == expected[i]


def test_broker_command_runs_and_stops(tmp_path):
    env = {**os.environ, "TENSORSTREAM_HOME": str(tmp_path)}
    p = subprocess.Popen([sys.executable, "-m", "tensorstream", "broker", "--port", "0"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        addr = p.stdout.readline().strip()
        assert addr.startswith("127.0.0.1:")
        state = json.loads((tmp_path / "brokers" / f"{p.pid}.json").read_text())
        assert state["bootstrap_servers"] == addr
    finally:
        p.terminate()
        p.wait(20)
    assert p.returncode == 0
    assert not (tmp_path / "brokers" / f"{p.pid}.json").exists()


def test_one_brokers_exit_does_not_hide_another(tmp_path):
    """Two local brokers: stopping the newer one leaves the older one discoverable (was: any stopping broker
    deleted the one shared state file, and `run` then started an empty broker and read nothing)."""
    from tensorstream.kafka.local import LocalBrokers

    env = {**os.environ, "TENSORSTREAM_HOME": str(tmp_path)}
    procs, addrs = [], []
    try:
        for _ in range(2):
            p = subprocess.Popen([sys.executable, "-m", "tensorstream", "broker", "--port", "0"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            addrs.append(p.stdout.readline().strip())
        registry = LocalBrokers(tmp_path)
        assert registry.find() == addrs[1], "the newest"
        procs[1].terminate()
        procs[1].wait(20)
        assert registry.find() == addrs[0], "the other broker is still found"
        out = subprocess.run([sys.executable, "-m", "tensorstream", "consume", "nothing-here", "--timeout", "1",
                              "--count"], env=env, capture_output=True, text=True, timeout=60)
        assert f"using the local broker at {addrs[0]}" in out.stderr
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)
