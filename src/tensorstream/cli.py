"""The ``tensorstream`` command line (typer + rich).

Every command that talks to Kafka takes ``--bootstrap-servers`` (env
``TENSORSTREAM_BOOTSTRAP_SERVERS``). Without it, commands use the broker that
``tensorstream broker`` is running on this machine, if any; ``demo`` and ``run``
start an embedded broker themselves.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tensorstream import __version__

app = typer.Typer(
    name="tensorstream",
    help="Streaming machine learning on Kafka-protocol brokers (PyTorch and TensorFlow).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

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


def _announce(text: str, **fields: Any) -> None:
    from tensorstream.observe.logging import announce

    announce(text, **fields)


def _observers(dashboard: bool, dashboard_port: int, run_dir: Path | None) -> Any:
    from tensorstream.observe import Observers
    from tensorstream.observe.logging import json_logs

    try:
        views = Observers(dashboard=dashboard, dashboard_port=dashboard_port, run_dir=run_dir, json_logs=json_logs())
    except OSError as e:
        _fail(f"cannot serve the dashboard on 127.0.0.1:{dashboard_port}: {e.strerror or e}")
    if views.url:
        _announce(f"dashboard: {views.url}", url=views.url)
    return views


STATE_FILE = Path(os.environ.get("TENSORSTREAM_HOME", Path.home() / ".tensorstream")) / "broker.json"


def _fail(msg: str, code: int = 1) -> None:
    if console.quiet:  # --quiet / --log-format json: errors still go out, as a log record
        logging.getLogger("tensorstream").error(msg)
    else:
        console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _running_local_broker() -> str | None:
    """The address written by a running ``tensorstream broker``, if its process lives."""
    try:
        info = json.loads(STATE_FILE.read_text())
        os.kill(info["pid"], 0)
        return info["bootstrap_servers"]
    except (OSError, ValueError, KeyError):
        return None


def _resolve_bootstrap(bootstrap: str | None, *, allow_embedded: bool = False) -> str | None:
    if bootstrap:
        return bootstrap
    local = _running_local_broker()
    if local:
        console.print(f"[dim]using the local broker at {local}[/]")
        return local
    if allow_embedded:
        return None
    _fail("no Kafka broker: pass --bootstrap-servers (or set TENSORSTREAM_BOOTSTRAP_SERVERS), "
          "or start one with `tensorstream broker` in another terminal")
    return None  # unreachable


@contextmanager
def kafka_settings(bootstrap: str | None, *, allow_embedded: bool = True) -> Iterator[Any]:
    """Yield a KafkaConfig; start an embedded broker when none is configured."""
    from tensorstream.kafka import BrokerError, EmbeddedBroker, KafkaConfig

    servers = _resolve_bootstrap(bootstrap, allow_embedded=allow_embedded)
    if servers is not None:
        local = servers.startswith(("127.", "localhost"))
        cfg = KafkaConfig.from_env(servers)
        if local and cfg.session_timeout_ms is None:
            cfg = cfg.model_copy(update={"session_timeout_ms": 6000, "heartbeat_interval_ms": 500})
        yield cfg
        return
    try:
        broker = EmbeddedBroker().start()
    except BrokerError as e:
        _fail(str(e))
    console.print(f"[dim]started the embedded broker at {broker.bootstrap_servers} (in memory)[/]")
    try:
        yield KafkaConfig.local(broker.bootstrap_servers)
    finally:
        broker.stop()


def _setup_logging(verbose: bool, log_format: str = "text", quiet: bool = False) -> None:
    from tensorstream.observe.logging import configure, human_output

    configure(verbose=verbose, fmt=log_format, quiet=quiet)
    console.quiet = not human_output()  # no rich progress or chatter; errors still go out (_fail)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    log_format: Annotated[str, typer.Option(
        "--log-format", help="text, or json: one JSON object per log line on stderr, progress included "
                             "(for production log shippers; no live displays).")] = "text",
    quiet: Annotated[bool, typer.Option("--quiet", help="Only warnings and errors: no progress displays.")] = False,
) -> None:
    if log_format not in ("text", "json"):
        _fail(f"--log-format {log_format!r}: use text or json", code=2)
    _setup_logging(verbose, log_format, quiet)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = a free one).")] = 9092,
) -> None:
    """Run the embedded Kafka-protocol broker (Tansu, in memory) in the foreground; Ctrl-C stops it."""
    from tensorstream.kafka import BrokerError, EmbeddedBroker

    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)  # before anything is printed: callers may stop us at once
    b = EmbeddedBroker(port=port or None)
    try:
        b.start()
    except BrokerError as e:
        _fail(str(e))
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps({"pid": os.getpid(), "bootstrap_servers": b.bootstrap_servers}))
    console.print(f"[green]broker ready[/] at [bold]{b.bootstrap_servers}[/] (in memory; data is lost on stop). "
                  "Ctrl-C to stop.")
    out.print(b.bootstrap_servers)
    try:
        while not stop and b.running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        died = not b.running and not stop
        b.stop()
        STATE_FILE.unlink(missing_ok=True)
    if died:
        _fail(f"the broker exited unexpectedly; log tail:\n{b.log_tail()}")
    console.print("broker stopped")


@app.command()
def produce(
    source: Annotated[str, typer.Argument(help="river:NAME[?k=v], or a .csv / .jsonl / .parquet file.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Target topic (created if missing).")],
    bootstrap_servers: BootstrapOpt = None,
    encoding: Annotated[str, typer.Option(help="json or frame (tensor frames of the numeric fields).")] = "json",
    rate: Annotated[float, typer.Option(help="Records per second (0 = as fast as possible).")] = 0.0,
    limit: Annotated[int | None, typer.Option(help="Stop after N records (required for endless generators).")] = None,
    key_field: Annotated[str | None, typer.Option(help="Record field used as the message key.")] = None,
    partitions: Annotated[int, typer.Option(help="Partitions when the topic is created.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Replay a dataset or file into a topic, at a rate or as fast as possible."""
    from tensorstream.produce import ProduceError, produce_records

    servers = _resolve_bootstrap(bootstrap_servers)
    with kafka_settings(servers) as cfg:
        try:
            stats = produce_records(cfg, source, topic, encoding=encoding, rate=rate, limit=limit,
                                    key_field=key_field, partitions=partitions, progress=not quiet)
        except (ProduceError, FileNotFoundError, ValueError) as e:
            _fail(str(e))
    console.print(f"produced [bold]{stats.records}[/] records to {topic} in {stats.seconds:.2f}s "
                  f"({stats.records / max(stats.seconds, 1e-9):,.0f} rec/s)")


@app.command()
def consume(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    bootstrap_servers: BootstrapOpt = None,
    group: Annotated[str | None, typer.Option(help="Consumer group (default: a fresh one, nothing committed).")] = None,
    decode: Annotated[str, typer.Option(help="json, frame or raw.")] = "json",
    max_records: Annotated[int | None, typer.Option("--max", "-n", help="Stop after N records.")] = None,
    timeout: Annotated[float, typer.Option(help="Stop after this many seconds with no new record.")] = 5.0,
    count: Annotated[bool, typer.Option("--count", help="Print only the number of records.")] = False,
    commit: Annotated[bool, typer.Option(help="Commit offsets of what was read (with --group).")] = False,
) -> None:
    """Print (or count) records from a topic, from the beginning: for debugging and tests."""
    from tensorstream.consume import consume_records

    servers = _resolve_bootstrap(bootstrap_servers)
    with kafka_settings(servers) as cfg:
        n = 0
        try:
            for line in consume_records(cfg, topic, group=group, decode=decode, max_records=max_records,
                                        idle_timeout=timeout, commit=commit):
                n += 1
                if not count:
                    out.print(line, markup=False, highlight=False, soft_wrap=True)
        except ValueError as e:
            _fail(str(e))
    if count:
        out.print(n)


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="PIPELINE.yaml", help="The pipeline spec.")],
    bootstrap_servers: BootstrapOpt = None,
    backend: Annotated[str | None, typer.Option(help="Override the spec's backend: torch or tensorflow.")] = None,
    produce_from: Annotated[str | None, typer.Option(
        "--produce", help="First replay this source (river:NAME or a file) into the source topic.")] = None,
    limit: Annotated[int | None, typer.Option(help="With --produce: records to produce.")] = None,
    until_end: Annotated[bool, typer.Option("--until-end", help="Stop when the source topic is read to its end.")] = False,
    max_records: Annotated[int | None, typer.Option(help="Stop after N records.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after N seconds.")] = None,
    result_json: Annotated[Path | None, typer.Option(help="Write the run's result (metrics, rates) here.")] = None,
    save_state: Annotated[str | None, typer.Option(
        help="At the end, write the learner state (safetensors) here: use it as model.weights for mode infer.")] = None,
    state_dir: Annotated[str | None, typer.Option(
        help="Where checkpoints live (overrides the spec's state_dir). Default with the embedded broker: "
             "a temporary directory, since the broker's data does not outlive the run either.")] = None,
    metrics_port: MetricsPortOpt = None,
    metrics_host: MetricsHostOpt = "127.0.0.1",
    dashboard: DashboardOpt = False,
    dashboard_port: DashboardPortOpt = 0,
    run_dir: RunDirOpt = None,
    workers: Annotated[int, typer.Option(
        help="Inference only: start N worker processes in one consumer group (partitions are shared).")] = 1,
    ranks: Annotated[int, typer.Option(
        help="Training: start N local ranks of one data-parallel job (torch.distributed / tf.distribute; rank r "
             "reads partitions p % N == r; docs/distributed.md).")] = 1,
) -> None:
    """Run a pipeline: train, infer or both, with a live progress line. Ctrl-C stops cleanly."""
    from tensorstream.spec import SpecError, load_spec

    # A SIGTERM during start-up (imports, group join) is a request to stop, not a crash.
    early_stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _f: early_stop.append(signum))

    try:
        spec = load_spec(spec_path, backend=backend)  # validated before any connection
    except SpecError as e:
        _fail(str(e), code=2)
    if workers > 1:
        _run_workers(spec, spec_path, workers, bootstrap_servers, backend=backend, until_end=until_end,
                     max_records=max_records, timeout=timeout)
        return
    if ranks > 1:
        _run_ranks(spec, spec_path, ranks, bootstrap_servers, backend=backend, produce_from=produce_from,
                   limit=limit, until_end=until_end, max_records=max_records, timeout=timeout,
                   result_json=result_json, save_state=save_state, state_dir=state_dir)
        return
    from tensorstream.pipeline import Pipeline, Progress
    from tensorstream.produce import produce_records

    servers = _resolve_bootstrap(bootstrap_servers, allow_embedded=True)
    embedded = servers is None
    tmp_state = None
    if state_dir:
        spec = spec.model_copy(update={"state_dir": state_dir})
    elif embedded:
        import tempfile

        tmp_state = tempfile.TemporaryDirectory(prefix="tensorstream-run-")
        spec = spec.model_copy(update={"state_dir": tmp_state.name})
    with kafka_settings(servers) as cfg:
        if produce_from:
            produce_records(cfg, produce_from, spec.source.topic, limit=limit, progress=not console.quiet)
        status = console.status(f"[bold]{spec.name}[/] ({spec.backend}, {spec.mode}): joining the group ...")
        views = _observers(dashboard, dashboard_port, run_dir)
        key = f"{spec.name}/{spec.backend}"

        def show(p: Progress) -> None:
            m = p.metrics
            metric = (f"acc {m['accuracy']:.4f} (window {m.get('accuracy_window', float('nan')):.4f})"
                      if "accuracy" in m else (f"MAE {m['mae']:.4f}" if "mae" in m else ""))
            lag = "?" if p.lag is None else f"{p.lag:,}"
            status.update(f"[bold]{spec.name}[/] ({p.backend}): {p.records:,} records  "
                          f"{p.records_per_s:,.0f} rec/s  lag {lag}  {metric}")
            views.progress(key, p)

        from tensorstream.checkpoint import CheckpointError, StateFileError
        from tensorstream.pipeline import PipelineError

        try:
            pipe = Pipeline(spec, cfg, on_progress=show, metrics_port=metrics_port, metrics_host=metrics_host)
        except (StateFileError, CheckpointError) as e:
            _fail(str(e))
        except OSError as e:  # the metrics port is taken
            _fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {e.strerror or e}")
        if pipe.obs.url:
            _announce(f"metrics: {pipe.obs.url}", url=pipe.obs.url)

        def graceful(signum: int, _frame: object) -> None:
            # First SIGTERM/Ctrl-C: finish the batch, checkpoint, commit, exit 0. A second Ctrl-C aborts.
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            console.print("[yellow]stopping: finishing the batch in hand, then checkpoint and commit ...[/]")
            pipe.stop()

        prev = {sig: signal.signal(sig, graceful) for sig in (signal.SIGTERM, signal.SIGINT)}
        if early_stop:
            pipe.stop()
        with status:
            try:
                result = pipe.run(until_end=until_end, max_records=max_records, timeout=timeout)
                views.result(key, result)
            except PipelineError as e:
                views.error(key, str(e))
                _fail(str(e))
            finally:
                for sig, handler in prev.items():
                    signal.signal(sig, handler)
                views.close()
                pipe.obs.close()
    console.print(f"[green]done[/]: {result.records:,} records, {result.predictions:,} predictions, "
                  f"{result.bad:,} dead letters, {result.records_per_s:,.0f} rec/s")
    for k, v in result.metrics.items():
        console.print(f"  {k:<18} {v:.4f}")
    if result_json:
        result_json.write_text(json.dumps(result.to_dict(), indent=2))
    if result.last_checkpoint:
        console.print(f"last checkpoint: {result.last_checkpoint} in {spec.checkpoint_url}"
                      + (" (temporary: pass --state-dir to keep it)" if tmp_state else ""))
    if save_state:
        pipe.save_state(save_state)
        console.print(f"state written to {save_state}")
    if tmp_state is not None:
        tmp_state.cleanup()


def _run_workers(spec: Any, spec_path: Path, n: int, bootstrap: str | None, **flags: Any) -> None:
    from tensorstream.pipeline.workers import run_workers

    if spec.trains:
        _fail("--workers > 1 is for mode 'infer': N trainers would learn N diverging models; for data-parallel "
              "training (the frameworks' own engines) use --ranks N (docs/distributed.md)")
    with kafka_settings(_resolve_bootstrap(bootstrap, allow_embedded=True)) as cfg:
        args = [str(spec_path), "-b", cfg.bootstrap_servers]
        if flags["backend"]:
            args += ["--backend", flags["backend"]]
        if flags["until_end"]:
            args.append("--until-end")
        for name in ("max_records", "timeout"):
            if flags[name] is not None:
                args += [f"--{name.replace('_', '-')}", str(flags[name])]
        console.print(f"starting {n} workers in group {spec.group_id} on {cfg.bootstrap_servers}")
        code = run_workers(n, args)
    if code:
        raise typer.Exit(code)


def _run_ranks(spec: Any, spec_path: Path, n: int, bootstrap: str | None, **flags: Any) -> None:
    """``run --ranks N``: one local data-parallel training job (pipeline/distributed.py)."""
    import tempfile

    from tensorstream.pipeline.distributed import launch_ranks
    from tensorstream.produce import produce_records

    if not spec.trains:
        _fail("--ranks is for training (mode 'train' or 'train+infer'); inference scales out with --workers N")
    if (spec.distributed.engine or spec.backend) == "none":
        _fail("--ranks > 1, but the spec sets distributed.engine: none")
    servers = _resolve_bootstrap(bootstrap, allow_embedded=True)
    # Every rank must see rank 0's checkpoints: with the embedded broker, one temporary state dir for all.
    tmp = tempfile.TemporaryDirectory(prefix="tensorstream-ranks-") if not flags["state_dir"] and not servers else None
    with kafka_settings(servers) as cfg:
        if flags["produce_from"]:
            produce_records(cfg, flags["produce_from"], spec.source.topic, limit=flags["limit"],
                            progress=not console.quiet)
        args = [str(spec_path), "-b", cfg.bootstrap_servers]
        if flags["backend"]:
            args += ["--backend", flags["backend"]]
        if flags["state_dir"] or tmp is not None:
            args += ["--state-dir", flags["state_dir"] or tmp.name]  # type: ignore[union-attr]
        if flags["until_end"]:
            args.append("--until-end")
        for name in ("max_records", "timeout"):
            if flags[name] is not None:
                args += [f"--{name.replace('_', '-')}", str(flags[name])]
        rank0 = []  # the job's result and state: rank 0 holds the totals
        if flags["result_json"]:
            rank0 += ["--result-json", str(flags["result_json"])]
        if flags["save_state"]:
            rank0 += ["--save-state", flags["save_state"]]
        console.print(f"starting {n} ranks ({spec.distributed.engine or spec.backend} engine) on "
                      f"{cfg.bootstrap_servers}")
        code = launch_ranks(n, args, rank0_args=rank0)
    if tmp is not None:
        tmp.cleanup()
    if code:
        raise typer.Exit(code)


@app.command()
def demo(
    bootstrap_servers: BootstrapOpt = None,
    backends: Annotated[str, typer.Option(help="Comma-separated backends to compare.")] = "torch,tensorflow",
    result_json: Annotated[Path | None, typer.Option(help="Write all results here.")] = None,
    metrics_port: MetricsPortOpt = None,
    dashboard: DashboardOpt = False,
    dashboard_port: DashboardPortOpt = 0,
    run_dir: RunDirOpt = None,
) -> None:
    """Stream drifting and real datasets through PyTorch and TensorFlow pipelines side by side."""
    from tensorstream.demo import run_demo, summary_table

    chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = [b for b in chosen if b not in ("torch", "tensorflow")]
    if bad or not chosen:
        _fail(f"unknown backend(s) {bad}: use torch and/or tensorflow")
    t0 = time.perf_counter()
    views = _observers(dashboard, dashboard_port, run_dir)
    try:
        with kafka_settings(bootstrap_servers) as cfg:
            results = run_demo(cfg, console, backends=chosen, observers=views, metrics_port=metrics_port)
    finally:
        views.close()
    out.print(summary_table(results))
    out.print(f"finished in {time.perf_counter() - t0:.0f}s; the embedded broker is stopped, nothing left running.")
    if result_json:
        result_json.write_text(json.dumps(results, indent=2))
    if any("error" in r for r in results.values()):
        raise typer.Exit(1)


# --- command groups and commands that live in their own modules (one line each) ---
app.command(name="bench")(__import__("tensorstream.bench.command", fromlist=["bench"]).bench)
app.command(name="dashboard")(__import__("tensorstream.observe.commands", fromlist=["dashboard"]).dashboard)
app.command(name="report")(__import__("tensorstream.observe.commands", fromlist=["report"]).report)
app.add_typer(__import__("tensorstream.models_cli", fromlist=["app"]).app, name="models")
app.add_typer(__import__("tensorstream.config_cli", fromlist=["app"]).app, name="config")
app.command(name="export")(__import__("tensorstream.export_cli", fromlist=["export"]).export)
app.add_typer(__import__("tensorstream.vision.commands", fromlist=["app"]).app, name="video")


def run_cli() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
