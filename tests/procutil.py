"""Run pipelines as real processes (for crash, signal and outage tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tensorstream.spec import PipelineSpec


def write_spec(spec: PipelineSpec, path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


STARTED: list[subprocess.Popen] = []


def kill_leftovers() -> None:
    """SIGKILL every child a test started and did not reap (a failed test must not leak workers)."""
    import signal

    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def start_run(spec_path: Path, bootstrap: str, *args: str, env: dict[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen:
    """``tensorstream run SPEC -b BOOTSTRAP ARGS`` in a child process (its own session)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
                # A SIGKILLed member stays in the group until its session times out:
                # keep that short so restarts rejoin quickly.
                "TENSORSTREAM_SESSION_TIMEOUT_MS": "3000", "TENSORSTREAM_HEARTBEAT_INTERVAL_MS": "300",
                **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL
    p = subprocess.Popen([sys.executable, "-m", "tensorstream", "-v", "run", str(spec_path),
                          "-b", bootstrap, *args], env=full_env, stdout=out, stderr=out,
                         start_new_session=True)
    STARTED.append(p)
    return p
