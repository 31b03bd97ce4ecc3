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


def newest_checkpoint(url: str) -> str:
    """The newest checkpoint's id ("" if none): ids sort by creation; retention prunes old ones."""
    try:
        return max((n for n in os.listdir(url) if n[:1].isdigit()), default="")
    except FileNotFoundError:
        return ""


def kill_at_random_points(spec_path: Path, bootstrap: str, url: str, *, kills: int, rng, log: Path,
                          wait_s: float = 120, finish_s: float = 300) -> int:
    """Start ``run --until-end``, wait until it wrote a checkpoint of its own (mid-stream, learning),
    SIGKILL it at a random moment (mid-batch, mid-checkpoint, mid-commit: anywhere); ``kills`` times.
    Then run it to the end of the stream (must exit 0). Returns how many kills happened."""
    import signal
    import time

    done = 0
    while done < kills:
        before = newest_checkpoint(url)
        p = start_run(spec_path, bootstrap, "--until-end", log=log)
        deadline = time.monotonic() + wait_s
        while newest_checkpoint(url) <= before and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if p.poll() is not None:
            break  # it finished the stream before it could be killed
        time.sleep(rng.uniform(0.0, 0.15))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        done += 1
    p = start_run(spec_path, bootstrap, "--until-end", log=log)
    assert p.wait(finish_s) == 0, log.read_text()[-3000:]
    return done
