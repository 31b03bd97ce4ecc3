"""``tensorstream run --ranks N``: a local job of N rank processes."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from tensorstream.pipeline.distributed.context import ENV
from tensorstream.pipeline.workers import supervise

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- local launcher
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (for a local job)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def launch_ranks(n: int, run_args: Sequence[str], *, rank0_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", grace_s: float = 10.0) -> int:
    """``tensorstream run RUN_ARGS`` as ranks 0..n-1 of one local job; wait for them.

    Sets ``TENSORSTREAM_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/``WORKERS``
    (free loopback ports). SIGINT/SIGTERM are forwarded (the ranks stop together and
    checkpoint). When a rank fails, the others cannot finish their collectives: they
    get SIGTERM, then SIGKILL after ``grace_s``. Returns the first non-zero exit code.
    """
    ports = free_ports(n + 1, host)
    base = {**os.environ, **(env or {}), ENV + "WORLD_SIZE": str(n), ENV + "MASTER_ADDR": host,
            ENV + "MASTER_PORT": str(ports[0]), ENV + "WORKERS": ",".join(f"{host}:{p}" for p in ports[1:])}
    procs = [subprocess.Popen([sys.executable, "-m", "tensorstream", "run", *run_args, *(rank0_args if i == 0 else ())],
                              env={**base, ENV + "RANK": str(i)}) for i in range(n)]
    log.info("started %d ranks: %s", n, [p.pid for p in procs])
    return supervise(procs, stop_all_on_failure_s=grace_s)
