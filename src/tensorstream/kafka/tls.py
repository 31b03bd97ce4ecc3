"""A real TLS endpoint in front of a plaintext broker (stunnel), for local TLS runs and tests.

The embedded Tansu broker's own TLS does not work in the shipped build (the
handshakes time out), so TLS is terminated by Debian's ``stunnel4`` instead:
clients speak TLS to stunnel, stunnel forwards plaintext to the broker over
loopback, and the broker *advertises* the stunnel port, so every connection a
client opens after bootstrap (metadata names the brokers) goes through TLS too.

>>> with TlsBroker(cert_file="server.pem", key_file="server.key") as b:   # doctest: +SKIP
...     cfg = KafkaConfig(bootstrap_servers=b.bootstrap_servers,
...                       security_protocol="SSL", ssl_ca_location="ca.pem")

``client_ca_file`` turns on mutual TLS (stunnel requires and verifies a client
certificate signed by that CA). Both processes die with their parent (Linux
``PR_SET_PDEATHSIG``) and are stopped in order by ``stop()``/``__exit__``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tensorstream.kafka.broker import BrokerError, EmbeddedBroker, _die_with_parent, _port_in_use, free_port

__all__ = ["TlsBroker", "TlsProxy", "find_stunnel"]


def find_stunnel() -> str:
    """The stunnel binary (Debian package ``stunnel4``)."""
    for name in ("stunnel4", "stunnel"):
        path = shutil.which(name)
        if path:
            return path
    raise BrokerError("stunnel is not installed: apt-get install stunnel4 (scripts/setup.sh --test does)")


class TlsProxy:
    """stunnel terminating TLS on ``host:port`` and forwarding to ``target`` (``host:port``)."""

    def __init__(self, target: str, cert_file: str | Path, key_file: str | Path, *, port: int | None = None,
                 host: str = "127.0.0.1", client_ca_file: str | Path | None = None, start_timeout: float = 10.0):
        self.target = target
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file else None
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_tail(self, n: int = 20) -> str:
        log = Path(self._dir.name) / "stunnel.log" if self._dir else None
        if log is None or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])

    def _config(self, log: Path) -> str:
        lines = [
            "foreground = yes",
            "pid =",  # no pid file: we own the process
            f"output = {log}",
            "debug = 4",  # warnings + handshake failures, not every connection
            "[kafka]",
            f"accept = {self.address}",
            f"connect = {self.target}",
            f"cert = {self.cert_file}",
            f"key = {self.key_file}",
            "sslVersionMin = TLSv1.2",
        ]
        if self.client_ca_file is not None:
            lines += [f"CAfile = {self.client_ca_file}", "verifyChain = yes", "requireCert = yes"]
        return "\n".join(lines) + "\n"

    def start(self) -> TlsProxy:
        if self.running:
            return self
        binary = find_stunnel()
        for f in (self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])):
            if not f.is_file():
                raise BrokerError(f"TLS proxy: {f} does not exist")
        if _port_in_use(self.host, self.port):
            raise BrokerError(f"cannot start the TLS proxy: port {self.address} is taken")
        self._dir = tempfile.TemporaryDirectory(prefix="tensorstream-stunnel-")
        conf = Path(self._dir.name) / "stunnel.conf"
        conf.write_text(self._config(Path(self._dir.name) / "stunnel.log"))
        self._proc = subprocess.Popen(
            [binary, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code, tail = self._proc.returncode, self.log_tail()
                self._proc = None
                self._cleanup()
                raise BrokerError(f"stunnel exited at start (code {code}); log tail:\n{tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise BrokerError(f"stunnel did not listen on {self.address} within {self.start_timeout:.0f}s; "
                          f"log tail:\n{tail}")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TlsBroker:
    """An embedded broker reachable only through TLS (stunnel) from a client's point of view.

    The broker listens on a loopback port of its own and advertises the TLS
    port; ``bootstrap_servers`` is the TLS port. (The plaintext port stays open
    on loopback: this is for development and tests, not a hardened deployment.)
    """

    def __init__(self, cert_file: str | Path, key_file: str | Path, *, port: int | None = None,
                 client_ca_file: str | Path | None = None, host: str = "127.0.0.1"):
        self.proxy_port = port or free_port(host)
        self.broker = EmbeddedBroker(host=host, advertised_port=self.proxy_port)
        self.proxy = TlsProxy(self.broker.bootstrap_servers, cert_file, key_file, port=self.proxy_port,
                              host=host, client_ca_file=client_ca_file)

    @property
    def bootstrap_servers(self) -> str:
        return self.proxy.address

    def start(self) -> TlsBroker:
        self.broker.start()
        try:
            self.proxy.start()
        except BaseException:
            self.broker.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.proxy.stop()
        finally:
            self.broker.stop()

    def __enter__(self) -> TlsBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.proxy.stop()
        self.broker.__exit__(*exc)  # stops it and removes its log
