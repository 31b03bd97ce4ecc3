"""TLS end to end: a real TLS endpoint (stunnel) in front of the embedded broker.

The embedded broker's own TLS does not work in the shipped build, so Debian's
``stunnel4`` terminates TLS and the broker advertises the stunnel port: after
bootstrap, every connection a client opens goes through TLS too. The CA and
certificates are generated here, per test session (``cryptography``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tensorstream.examples import example_spec
from tensorstream.kafka import ConsumeError, KafkaAdmin, KafkaConfig, KafkaSource
from tensorstream.kafka.admin import KafkaConnectError
from tensorstream.kafka.tls import TlsBroker
from tensorstream.pipeline import Pipeline
from tensorstream.data.produce import produce_records
from tensorstream.spec import BatchSpec


# --------------------------------------------------------------------------- a test PKI

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(cn, _name(cn), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, cn: str, *, server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (_builder(cn, ca_cert.subject, key)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:  # librdkafka verifies the broker's host name against the SAN
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _ca("tensorstream test CA")
    server_key, server = _leaf(ca_key, ca, "localhost", server=True)
    client_key, client = _leaf(ca_key, ca, "tensorstream-client", server=False)
    _, other_ca = _ca("some other CA")
    return {
        "ca": _write_cert(ca, d / "ca.pem"),
        "server_cert": _write_cert(server, d / "server.pem"), "server_key": _write_key(server_key, d / "server.key"),
        "client_cert": _write_cert(client, d / "client.pem"), "client_key": _write_key(client_key, d / "client.key"),
        "other_ca": _write_cert(other_ca, d / "other-ca.pem"),
    }


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True  # dead, waiting for a parent (or init) to reap it
        except (ProcessLookupError, FileNotFoundError):
            return True
        try:  # reap it if it is our child (a zombie still answers kill 0)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def tls_broker(pki):
    if shutil.which("stunnel4") is None and shutil.which("stunnel") is None:
        pytest.fail("stunnel is not installed: `apt-get install stunnel4` (scripts/setup.sh --test does it)")
    b = TlsBroker(pki["server_cert"], pki["server_key"])
    with b:
        pids = (b.proxy.pid, b.broker.pid)
        yield b
    assert all(_gone(p) for p in pids), "stunnel and the broker are stopped with the context"


def _tls(b: TlsBroker, ca: Path, **kw) -> KafkaConfig:
    return KafkaConfig.local(b.bootstrap_servers, security_protocol="SSL", ssl_ca_location=str(ca), **kw)


# --------------------------------------------------------------------------- tests

def test_broker_advertises_the_tls_port(tls_broker, pki):
    md = AdminClient(_tls(tls_broker, pki["ca"]).client_settings()).list_topics(timeout=10)
    assert [(b.host, b.port) for b in md.brokers.values()] == [("127.0.0.1", tls_broker.proxy_port)]
    assert tls_broker.proxy_port != tls_broker.broker.port


def test_pipeline_runs_over_tls_end_to_end(tls_broker, pki):
    cfg = _tls(tls_broker, pki["ca"])
    base = example_spec("phishing.yaml", backend="torch")
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    spec = base.model_copy(update={
        "name": topic, "source": base.source.model_copy(update={"topic": topic}),
        "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
        "batch": BatchSpec(max_size=16, max_wait_ms=5),
    })
    assert produce_records(cfg, "river:Phishing", topic, limit=300).records == 300
    result = Pipeline(spec, cfg).run(until_end=True, timeout=60)
    assert result.records == 300 == result.predictions and result.bad == 0
    assert result.metrics["accuracy"] >= 0.75, result.metrics
    assert KafkaAdmin(cfg).end_offsets(spec.sink.topic) == {(spec.sink.topic, 0): 300}


def test_wrong_ca_fails_fast_with_a_clear_message(tls_broker, pki):
    bad = _tls(tls_broker, pki["other_ca"])
    t = time.monotonic()
    with pytest.raises(KafkaConnectError, match="certificate verify failed") as err:
        KafkaAdmin(bad).ensure_topic("never-created")
    assert time.monotonic() - t < 5, "fails within seconds, not after the metadata timeout"
    assert "security.protocol=SSL" in str(err.value) and tls_broker.bootstrap_servers in str(err.value)

    spec = example_spec("phishing.yaml", backend="torch")
    t = time.monotonic()
    with pytest.raises(KafkaConnectError, match="certificate verify failed"):
        Pipeline(spec, bad).run(until_end=True, timeout=30)
    assert time.monotonic() - t < 5

    src = KafkaSource(bad, f"g-{uuid.uuid4().hex[:6]}", ["never-created"])
    t = time.monotonic()
    try:
        with pytest.raises(ConsumeError, match="certificate verify failed"):
            while time.monotonic() - t < 10:
                src.poll_batch(10, 0.2)
    finally:
        src.close()
    assert time.monotonic() - t < 5


def test_mutual_tls_needs_the_client_certificate(pki):
    with TlsBroker(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca"]) as b:
        with_cert = _tls(b, pki["ca"], ssl_certificate_location=str(pki["client_cert"]),
                         ssl_key_location=str(pki["client_key"]))
        assert KafkaAdmin(with_cert).ensure_topic("mtls") is True
        t = time.monotonic()
        with pytest.raises(KafkaConnectError, match="certificate required"):
            KafkaAdmin(_tls(b, pki["ca"])).list_topics(timeout=10)
        assert time.monotonic() - t < 5, "the server's TLS alert fails the client fast"


def test_no_orphans_when_the_owner_is_killed(pki, tmp_path):
    """SIGKILL the process holding a TlsBroker: stunnel and the broker die with it."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from tensorstream.kafka.tls import TlsBroker
        b = TlsBroker({str(pki["server_cert"])!r}, {str(pki["server_key"])!r}).start()
        print(b.proxy.pid, b.broker.pid, flush=True)
        time.sleep(60)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = owner.stdout.readline()
        proxy_pid, broker_pid = map(int, line.split())
        os.kill(proxy_pid, 0)
        os.kill(broker_pid, 0)
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
    assert _gone(proxy_pid) and _gone(broker_pid), "no orphan stunnel or broker"
