"""``tensorstream dashboard`` and ``tensorstream report`` (registered in ``tensorstream.cli``)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer


def _err(msg: str, code: int = 1) -> None:
    from tensorstream.cli.common import fail

    fail(msg, code)


def dashboard(
    sources: Annotated[list[str], typer.Argument(
        metavar="SOURCE...",
        help="Run directories (written by `run --run-dir` / `demo --run-dir`; followed while they grow) "
             "and/or the /metrics URLs of running workers (`run --metrics-port`), e.g. http://127.0.0.1:9100.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = a free one).")] = 8050,
    interval: Annotated[float, typer.Option(help="Seconds between two reads of every source.")] = 1.0,
) -> None:
    """Serve the live dashboard (on 127.0.0.1) for runs recorded or running elsewhere; Ctrl-C stops it."""
    from tensorstream.observe.dashboard import DashboardFeed, DashboardServer, MetricsSource, RunDirSource, follow
    from tensorstream.observe.logging import announce

    feed = DashboardFeed()
    srcs: list[object] = []
    for s in sources:
        if s.startswith(("http://", "https://")):
            srcs.append(MetricsSource(s, feed))
        elif Path(s).is_dir():
            srcs.append(RunDirSource(s, feed))
        else:
            _err(f"{s}: neither a run directory nor an http(s):// /metrics URL", code=2)
    stop = threading.Event()
    server = DashboardServer(feed, port=port)
    try:
        url = server.start()
    except OSError as e:
        _err(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e} (try --port 0)")
        return
    announce(f"dashboard: {url}  (Ctrl-C to stop)", url=url)
    prev = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        follow(srcs, stop, interval)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, prev)
        server.stop()


def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (`run --run-dir`).")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Where the PNGs go (default RUN_DIR/plots).")]
    = None,
) -> None:
    """Render PNG plots of a recorded run: prequential metric, loss, throughput, lag, latency, summaries."""
    from tensorstream.observe.plots import render_report

    try:
        files = render_report(run_dir, out_dir)
    except FileNotFoundError as e:
        _err(str(e), code=2)
        return
    if not files:
        _err(f"{run_dir} has nothing to plot yet")
    for f in files:
        typer.echo(str(f))
