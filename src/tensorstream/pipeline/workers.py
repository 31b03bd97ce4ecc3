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
    return supervise(procs)


def supervise(procs: list[subprocess.Popen], *, stop_all_on_failure_s: float | None = None) -> int:
    """Wait for child ``tensorstream run`` processes; forward SIGINT/SIGTERM to them (each finishes its
    batch, commits and leaves); kill what is left on the way out. Returns the first non-zero exit code.

    ``stop_all_on_failure_s``: when one child fails, SIGTERM the others, and stop waiting for them this
    many seconds later (data-parallel ranks cannot finish their collectives without it).
    """

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    prev = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            if (stop_all_on_failure_s is not None and failed_at is None
                    and any(p.returncode not in (None, 0) for p in procs)):
                failed_at = time.monotonic()
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > (stop_all_on_failure_s or 0):
                break
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
