"""``tensorstream run --workers N``: N local inference processes in one consumer group.

Partitions are the unit of parallelism: the group spreads them over the
workers, and a worker that joins or leaves triggers a rebalance in which each
worker commits what it has delivered for the partitions it loses. On a cluster,
start one ``tensorstream run`` per host or pod instead: this is a convenience
for one machine.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)


def run_workers(n: int, run_args: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    """Start ``n`` ``tensorstream run`` children with ``run_args``; forward SIGINT/SIGTERM; wait.

    Returns the first non-zero exit code of a child (0 if all succeeded).
    """
    procs = [subprocess.Popen([sys.executable, "-m", "tensorstream", "run", *run_args],
                              env={**os.environ, **(env or {}), "TENSORSTREAM_WORKER_INDEX": str(i)})
             for i in range(n)]
    log.info("started %d workers: %s", n, [p.pid for p in procs])

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # each worker finishes its batch, commits, leaves the group

    prev = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c), 0)
