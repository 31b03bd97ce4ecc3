"""Finding the ``tensorstream broker`` running on this machine.

Each running broker writes its own state file, ``$TENSORSTREAM_HOME/brokers/<pid>.json``
(default home: ``~/.tensorstream``), and removes only that file when it stops, so
one broker's exit can never hide another. Discovery takes the newest file whose
process is alive and whose port answers; files of dead processes are removed.

>>> import tempfile
>>> home = Path(tempfile.mkdtemp())
>>> reg = LocalBrokers(home)
>>> reg.find() is None
True
>>> f = reg.register("127.0.0.1:1", pid=os.getpid())
>>> reg.find(check_port=False)
'127.0.0.1:1'
>>> reg.unregister(f); reg.find(check_port=False) is None
True
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def default_home() -> Path:
    return Path(os.environ.get("TENSORSTREAM_HOME", Path.home() / ".tensorstream"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True


def _answers(servers: str, timeout: float = 0.5) -> bool:
    host, _, port = servers.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class LocalBrokers:
    """The registry of local brokers (one state file per broker process)."""

    def __init__(self, home: Path | None = None) -> None:
        self.dir = (home or default_home()) / "brokers"

    def register(self, bootstrap_servers: str, pid: int | None = None) -> Path:
        """Announce a broker of process ``pid`` (default: this one); returns its state file."""
        pid = os.getpid() if pid is None else pid
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{pid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "bootstrap_servers": bootstrap_servers, "started": time.time()}))
        tmp.replace(path)  # atomic: a reader never sees half a file
        return path

    def unregister(self, path: Path) -> None:
        """Remove a state file this process wrote (never another broker's)."""
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if info.get("pid") == os.getpid() or not _alive(int(info.get("pid", -1))):
            path.unlink(missing_ok=True)

    def running(self, check_port: bool = True) -> list[dict]:
        """Live brokers, newest first; state files of dead processes are removed."""
        found = []
        for path in self.dir.glob("*.json") if self.dir.is_dir() else ():
            try:
                info = json.loads(path.read_text())
                pid = int(info["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            if check_port and not _answers(info.get("bootstrap_servers", "")):
                continue
            found.append(info)
        return sorted(found, key=lambda i: i.get("started", 0), reverse=True)

    def find(self, check_port: bool = True) -> str | None:
        """The newest running local broker's address, or None."""
        live = self.running(check_port)
        return live[0]["bootstrap_servers"] if live else None
