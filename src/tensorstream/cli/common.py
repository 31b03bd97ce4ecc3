"""What every command shares: consoles, failing with one sentence, finding the broker, signals.

Command modules (``cli/*.py``, ``bench/command.py``, ``observe/commands.py``,
``vision/commands.py``) import from here; ``cli/__init__.py`` registers them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console



def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        # Piped or captured: there is no width to fit, and rich's default of 80 columns would cut
        # table cells ("unava…"). Tables take their natural width instead.
        c = Console(stderr=stderr, width=1000)
    return c


console = _console(stderr=True)
out = _console()

BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", envvar="TENSORSTREAM_BOOTSTRAP_SERVERS",
                 help="Kafka bootstrap servers (host:port[,host:port]). Default: the local `tensorstream broker`."),
]

# Observability options of `run` and `demo` (see tensorstream.observe and docs/observability.md).
MetricsPortOpt = Annotated[int | None, typer.Option(
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 = a free port; demo: one port per backend "
         "from here).")]
MetricsHostOpt = Annotated[str, typer.Option(help="Interface for --metrics-port (0.0.0.0: every interface).")]
DashboardOpt = Annotated[bool, typer.Option("--dashboard", help="Serve the live dashboard on 127.0.0.1 and print "
                                                                "its URL.")]
DashboardPortOpt = Annotated[int, typer.Option(help="Port of --dashboard (0 = a free one).")]
RunDirOpt = Annotated[Path | None, typer.Option(
    help="Record metrics.jsonl + result.json here, for `tensorstream report` and `tensorstream dashboard`.")]


def announce(text: str, **fields: Any) -> None:
    from tensorstream.observe.logging import announce

    announce(text, **fields)


def observers(dashboard: bool, dashboard_port: int, run_dir: Path | None) -> Any:
    from tensorstream.observe import Observers
    from tensorstream.observe.logging import json_logs

    try:
        views = Observers(dashboard=dashboard, dashboard_port=dashboard_port, run_dir=run_dir, json_logs=json_logs())
    except OSError as e:
        fail(f"cannot serve the dashboard on 127.0.0.1:{dashboard_port}: {e.strerror or e}")
    if views.url:
        announce(f"dashboard: {views.url}", url=views.url)
    return views


def fail(msg: str, code: int = 1) -> NoReturn:
    if console.quiet:  # --quiet / --log-format json: errors still go out, as a log record
        logging.getLogger("tensorstream").error(msg)
    else:
        console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)  # one line, whatever the width
    raise typer.Exit(code)


def running_local_broker() -> str | None:
    """The address of the newest ``tensorstream broker`` running on this machine (see ``kafka/local.py``)."""
    from tensorstream.kafka.local import LocalBrokers

    return LocalBrokers().find()


def resolve_bootstrap(bootstrap: str | None, *, allow_embedded: bool = False) -> str | None:
    if bootstrap:
        return bootstrap
    local = running_local_broker()
    if local:
        console.print(f"[dim]using the local broker at {local}[/]")
        return local
    if allow_embedded:
        return None
    fail("no Kafka broker: pass --bootstrap-servers (or set TENSORSTREAM_BOOTSTRAP_SERVERS), "
          "or start one with `tensorstream broker` in another terminal")
    return None  # unreachable


#: how long commands wait for a configured broker to answer before saying it is unreachable
PREFLIGHT_S = 5.0


@contextmanager
def kafka_settings(bootstrap: str | None, *, allow_embedded: bool = True) -> Iterator[Any]:
    """Yield a KafkaConfig; start an embedded broker when none is configured."""
    from tensorstream.kafka import BrokerError, EmbeddedBroker, KafkaConfig

    servers = resolve_bootstrap(bootstrap, allow_embedded=allow_embedded)
    if servers is not None:
        local = servers.startswith(("127.", "localhost"))
        cfg = KafkaConfig.from_env(servers)
        if local and cfg.session_timeout_ms is None:
            cfg = cfg.model_copy(update={"session_timeout_ms": 6000, "heartbeat_interval_ms": 500})
        from tensorstream.kafka.preflight import BrokerUnreachable, check_broker

        try:  # one sentence within seconds, instead of a client retrying (and logging) forever
            check_broker(cfg, timeout=PREFLIGHT_S)
        except BrokerUnreachable as e:
            fail(str(e))
        yield cfg
        return
    try:
        broker = EmbeddedBroker().start()
    except BrokerError as e:
        fail(str(e))
    console.print(f"[dim]started the embedded broker at {broker.bootstrap_servers} (in memory)[/]")
    try:
        yield KafkaConfig.local(broker.bootstrap_servers)
    finally:
        broker.stop()


def setup_logging(verbose: bool, log_format: str = "text", quiet: bool = False) -> None:
    from tensorstream.observe.logging import configure, human_output

    configure(verbose=verbose, fmt=log_format, quiet=quiet)
    console.quiet = not human_output()  # no rich progress or chatter; errors still go out (_fail)
    if verbose and log_format == "text":  # TensorFlow's start-up lines, here and in child processes
        from tensorstream.backends.frameworks import FRAMEWORK_LOGS_ENV

        os.environ.setdefault(FRAMEWORK_LOGS_ENV, "1")




#: after the first SIGINT/SIGTERM (or --timeout), the last flush and commit may take this long
STOP_GRACE_S = 5.0
#: after a forced stop, the process is gone at the latest this much later, even if a client is stuck
ABORT_EXIT_S = 4.0


@contextmanager
def stop_signals(control: Any, summary: Callable[[], str] = lambda: "") -> Iterator[None]:
    """SIGINT/SIGTERM while a pipeline runs: the first asks for a graceful stop (finish the batch,
    persist, commit: bounded by ``control.grace_s``), the second forces it.

    A forced stop commits nothing more; if the process is not gone ``ABORT_EXIT_S``
    seconds later (a Kafka client waiting in C code for a broker that forgot our
    records), it exits with code 130, saying what was not committed.
    """

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not control.stopping:
            console.print(f"[yellow]{name}: stopping: finishing the batch in hand, then checkpoint and commit "
                          f"(within {control.grace_s:g}s; {name} again forces it) ...[/]")
            control.request_stop(name)
        else:
            console.print(f"[red]{name} again: forced stop; nothing more is committed[/]")
            control.request_abort(f"second {name}")

    def watchdog(_control: Any) -> None:
        def exit_now() -> None:
            detail = summary()
            msg = f"forced exit ({control.reason}); {detail}" if detail else f"forced exit ({control.reason})"
            logging.getLogger("tensorstream").error(msg)
            console.print(f"[bold red]error:[/] {msg}", highlight=False)
            os._exit(130)  # a client stuck in C code would otherwise hold the process for minutes

        t = threading.Timer(ABORT_EXIT_S, exit_now)
        t.daemon = True
        t.start()

    control.on_abort(watchdog)
    prev = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h)


def load_spec_or_fail(spec_path: Path, state_dir: str | None = None, **overrides: Any) -> Any:
    """The spec at ``spec_path`` (``overrides`` replace top-level keys, e.g. ``backend``), with ``state_dir``
    if given; a spec that does not validate is one ``error:`` line and exit 2."""
    from tensorstream.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path, **overrides)
    except SpecError as e:
        fail(str(e), code=2)
    return spec.model_copy(update={"state_dir": state_dir}) if state_dir else spec
