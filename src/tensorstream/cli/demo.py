"""``tensorstream demo``: the same pipelines on PyTorch and TensorFlow, side by side.

Streams River datasets into an embedded broker (a drifting Agrawal stream and
Phishing), runs each pipeline once per backend in two processes at the same
time (one core each), shows live progress, and ends with a table per backend.
Accuracy before/after the drift is computed from the *predictions topic*
(joined to the labels by source offset), an independent check of the
pipeline's own prequential metric.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tensorstream.cli.common import (
    BootstrapOpt,
    DashboardOpt,
    DashboardPortOpt,
    MetricsPortOpt,
    RunDirOpt,
    console,
    fail,
    kafka_settings,
    observers,
    out,
)
from tensorstream.data.datasets import LABEL_FIELD, open_source
from tensorstream.data.produce import produce_records
from tensorstream.examples import example_spec
from tensorstream.kafka import KafkaConfig, KafkaSource
from tensorstream.spec import PipelineSpec

BACKENDS = ("torch", "tensorflow")


@dataclass(frozen=True)
class DemoStream:
    title: str
    example: str  # spec file in tensorstream/examples
    source: str  # produce source
    records: int
    drift_at: int | None
    #: source topic instead of the example spec's (predictions: "<topic>.predictions.<backend>")
    topic: str | None = None


STREAMS = (
    DemoStream("Agrawal, function 0 -> 2 at 5000", "agrawal_drift.yaml", "river:drift.agrawal", 10_000, 5000),
    DemoStream("Phishing", "phishing.yaml", "river:Phishing", 1250, None),
)


def _worker(spec_json: bytes, bootstrap: str, key: str, q: Any,
            metrics_port: int | None = None) -> None:  # runs in a child process
    # One core per process: the two backends run side by side on a 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    from tensorstream.pipeline import Pipeline

    spec = PipelineSpec.model_validate_json(spec_json)
    try:
        pipe = Pipeline(spec, KafkaConfig.local(bootstrap),
                        on_progress=lambda p: q.put(("progress", key, p.__dict__)), metrics_port=metrics_port)
        result = pipe.run(until_end=True, timeout=600)
        q.put(("result", key, result.to_dict()))
    except Exception as e:  # surfaced in the parent's table, never a silent hang
        q.put(("error", key, f"{type(e).__name__}: {e}"))


def _accuracy_by_segment(cfg: KafkaConfig, topic: str, labels: list[Any], drift_at: int | None,
                         expected: int) -> dict[str, float]:
    """Read the predictions topic and score it against the true labels, by source offset."""
    hits: dict[int, bool] = {}
    with KafkaSource(cfg, f"tensorstream.demo.check.{topic}", [topic]) as src:
        deadline = time.monotonic() + 60
        while len(hits) < expected and time.monotonic() < deadline:
            for r in src.poll_batch(1000, 0.5):
                p = orjson.loads(r.value)
                hits[p["source"]["offset"]] = p["label"] == labels[p["source"]["offset"]]
    out = {"checked": float(len(hits))}
    if hits:
        out["accuracy"] = sum(hits.values()) / len(hits)
    if drift_at is not None:
        before = [v for k, v in hits.items() if k < drift_at]
        after = [v for k, v in hits.items() if k >= drift_at]
        if before:
            out["before"] = sum(before) / len(before)
        if after:
            out["after"] = sum(after) / len(after)
    return out


def _table(rows: dict[str, dict[str, Any]], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("pipeline", "backend", "records", "rec/s", "lag", "accuracy", "window acc."):
        t.add_column(col, justify="right" if col not in ("pipeline", "backend") else "left")
    for key, r in rows.items():
        name, backend = key.rsplit("/", 1)
        m = r.get("metrics", {})
        t.add_row(name, backend, f"{r.get('records', 0):,}", f"{r.get('records_per_s', 0):,.0f}",
                  "-" if r.get("lag") is None else f"{r['lag']:,}",
                  f"{m.get('accuracy', float('nan')):.4f}", f"{m.get('accuracy_window', float('nan')):.4f}")
        if "error" in r:
            t.add_row(name, backend, f"[red]{r['error']}[/]", "", "", "", "")
    return t


def run_demo(cfg: KafkaConfig, console: Console, *, streams: tuple[DemoStream, ...] = STREAMS,
             backends: tuple[str, ...] = BACKENDS, observers: Any = None,
             metrics_port: int | None = None) -> dict[str, dict[str, Any]]:
    """Run every stream on every backend; returns the results keyed ``"<pipeline>/<backend>"``.

    ``observers`` (a :class:`tensorstream.observe.Observers`) gets every progress
    message the workers send (the live dashboard, a run directory); with
    ``metrics_port`` each backend's worker serves ``/metrics`` on its own port
    (``metrics_port + i``; 0 = free ports), printed before the run.
    """
    # Checkpoints go to a throwaway dir: every demo run starts from an untrained model.
    with tempfile.TemporaryDirectory(prefix="tensorstream-demo-") as state_dir:
        return _run_demo(cfg, console, streams, backends, state_dir, observers, metrics_port)


def _metrics_ports(base: int | None, n: int) -> list[int | None]:
    if base is None:
        return [None] * n
    if base:
        return [base + i for i in range(n)]
    import socket

    ports = []
    for _ in range(n):  # free ports now; a worker binds its own a moment later
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def _run_demo(cfg: KafkaConfig, console: Console, streams: tuple[DemoStream, ...], backends: tuple[str, ...],
              state_dir: str, observers: Any = None, metrics_port: int | None = None) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    ports = _metrics_ports(metrics_port, len(backends))
    if metrics_port is not None:
        from tensorstream.observe.logging import announce

        urls = {b: f"http://127.0.0.1:{p}/metrics" for b, p in zip(backends, ports, strict=True)}
        announce("metrics: " + ", ".join(f"{b} {u}" for b, u in urls.items()), urls=urls)
    ctx = mp.get_context("spawn")  # fresh interpreters: no framework state shared, honest peak memory
    for stream in streams:
        base = example_spec(stream.example)
        if stream.topic:
            base = base.model_copy(update={
                "source": base.source.model_copy(update={"topic": stream.topic}),
                "sink": base.sink.model_copy(update={"topic": f"{stream.topic}.predictions"}),
            })
        console.print(f"\n[bold]{stream.title}[/]: producing {stream.records:,} records to '{base.source.topic}'")
        produce_records(cfg, stream.source, base.source.topic, limit=stream.records, progress=not console.quiet)
        labels = [r[LABEL_FIELD] for r in open_source(stream.source, limit=stream.records)]
        q = ctx.Queue()
        live_rows: dict[str, dict[str, Any]] = {}
        procs = {}
        for backend, port in zip(backends, ports, strict=True):
            spec = base.model_copy(update={
                "backend": backend, "name": f"{base.name}-{backend}",
                "model": base.model.model_copy(update={"threads": 1}),
                "state_dir": state_dir,
                "sink": base.sink.model_copy(update={"topic": f"{base.sink.topic}.{backend}"}),
            })
            key = f"{base.name}/{backend}"
            live_rows[key] = {"records": 0}
            procs[key] = (ctx.Process(target=_worker, args=(spec.model_dump_json().encode(), cfg.bootstrap_servers,
                                                               key, q, port), daemon=True), spec)
            procs[key][0].start()
        done: set[str] = set()
        with Live(_table(live_rows, stream.title), console=console, refresh_per_second=4) as live:
            while len(done) < len(procs):
                try:
                    kind, key, payload = q.get(timeout=1.0)
                except queue.Empty:
                    for key, (p, _) in procs.items():
                        if key not in done and not p.is_alive():
                            live_rows[key]["error"] = f"worker exited with code {p.exitcode}"
                            if observers is not None:
                                observers.error(key, live_rows[key]["error"])
                            done.add(key)
                    continue
                if observers is not None:  # the live dashboard / run directory
                    getattr(observers, kind)(key, payload)
                if kind == "progress":
                    live_rows[key].update(payload)
                elif kind == "result":
                    live_rows[key].update(payload)
                    results[key] = payload
                    done.add(key)
                else:
                    live_rows[key]["error"] = payload
                    results[key] = {"error": payload}
                    done.add(key)
                live.update(_table(live_rows, stream.title))
        if not console.is_terminal:  # rich leaves the last frame without a newline off a terminal
            console.file.write("\n")
        for key, (p, spec) in procs.items():
            p.join(10)
            if key in results and "error" not in results[key]:
                results[key]["check"] = _accuracy_by_segment(cfg, spec.sink.topic, labels, stream.drift_at,
                                                             stream.records)
                results[key]["drift_at"] = stream.drift_at
    return results


SUMMARY_TITLE = "tensorstream demo: PyTorch vs TensorFlow on the same streams"
SUMMARY_NOTE = ("accuracy: prequential (test-then-train); before/after drift: from the predictions topic; "
                "p50/p99: per-record latency in the pipeline")


def summary_table(results: dict[str, dict[str, Any]], *, titled: bool = True) -> Table:
    """The final table, one row per pipeline and backend (``titled``: with its title and note)."""
    t = Table(title=SUMMARY_TITLE if titled else None, title_justify="left",
              caption=SUMMARY_NOTE if titled else None, caption_justify="left")
    cols = ("pipeline", "backend", "accuracy", "before drift", "after drift", "rec/s", "p50 ms", "p99 ms",
            "RSS MB")
    for c in cols:
        t.add_column(c, justify="left" if c in ("pipeline", "backend") else "right")
    for key, r in results.items():
        name, backend = key.rsplit("/", 1)
        if "error" in r:
            t.add_row(name, backend, f"[red]{r['error']}[/]", *[""] * 6)
            continue
        chk = r.get("check", {})

        def f(v: Any, fmt: str = "{:.4f}") -> str:
            return "-" if v is None else fmt.format(v)

        t.add_row(name, backend, f(r["metrics"].get("accuracy")), f(chk.get("before")), f(chk.get("after")),
                  f(r["records_per_s"], "{:,.0f}"), f(r["latency_p50_ms"], "{:.2f}"),
                  f(r["latency_p99_ms"], "{:.2f}"), f(r["peak_rss_mb"], "{:,.0f}"))
    return t


def print_summary(results: dict[str, dict[str, Any]], stdout: Console, *, as_json: bool = False) -> None:
    """The results on ``stdout``: one JSON object (``as_json``), or the table.

    Piped or captured, the title and the note are plain lines of their own: rich would
    wrap a caption to the table's width and pad both with spaces.
    """
    if as_json:
        from tensorstream.observe.logging import _nan_free

        stdout.print(json.dumps(_nan_free(results), default=str), soft_wrap=True, highlight=False, markup=False)
    elif stdout.is_terminal:
        stdout.print(summary_table(results))
    else:
        stdout.print(SUMMARY_TITLE, soft_wrap=True, highlight=False)
        stdout.print(summary_table(results, titled=False))
        stdout.print(SUMMARY_NOTE, soft_wrap=True, highlight=False)


def demo(
    bootstrap_servers: BootstrapOpt = None,
    backends: Annotated[str, typer.Option(help="Comma-separated backends to compare.")] = "torch,tensorflow",
    result_json: Annotated[Path | None, typer.Option(help="Write all results here.")] = None,
    metrics_port: MetricsPortOpt = None,
    dashboard: DashboardOpt = False,
    dashboard_port: DashboardPortOpt = 0,
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object on stdout "
                                                         "instead of the table.")] = False,
) -> None:
    """Stream drifting and real datasets through PyTorch and TensorFlow pipelines side by side.

    Progress goes to stderr; the final table (or JSON with --json) to stdout.
    """
    chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = [b for b in chosen if b not in ("torch", "tensorflow")]
    if bad or not chosen:
        fail(f"unknown backend(s) {bad}: use torch and/or tensorflow")
    t0 = time.perf_counter()
    views = observers(dashboard, dashboard_port, run_dir)
    try:
        with kafka_settings(bootstrap_servers) as cfg:
            results = run_demo(cfg, console, backends=chosen, observers=views, metrics_port=metrics_port)
    finally:
        views.close()
    print_summary(results, out, as_json=as_json)
    console.print(f"finished in {time.perf_counter() - t0:.0f}s; the embedded broker is stopped, nothing left "
                  "running.")
    if result_json:
        result_json.write_text(json.dumps(results, indent=2))
    if any("error" in r for r in results.values()):
        raise typer.Exit(1)
