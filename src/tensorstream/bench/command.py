"""``tensorstream bench``: the typer command (registered in ``tensorstream.cli``).

Importing this module is cheap (typer only): ``tensorstream --help`` must not
pay for torch, tensorflow or matplotlib.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", envvar="TENSORSTREAM_BOOTSTRAP_SERVERS",
                 help="Kafka bootstrap servers. Default: the local `tensorstream broker`, else an embedded one."),
]


def bench(
    spec_path: Annotated[Path | None, typer.Argument(metavar="[PIPELINE.yaml]", help="The pipeline spec to compare.")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Bench the demo's streams (drifting Agrawal, Phishing).")] = False,
    bootstrap_servers: BootstrapOpt = None,
    records: Annotated[int | None, typer.Option(min=1, help="Cap the records per stream (and produced).")] = None,
    variants: Annotated[str, typer.Option(
        help="Comma-separated: torch, torch-compile, tensorflow, tensorflow-xla.")] = "torch,torch-compile,tensorflow,tensorflow-xla",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report directory (default reports/bench-<timestamp>/).")] = None,
    produce_from: Annotated[str | None, typer.Option(
        "--produce", help="First replay this source (river:NAME or a file) into the spec's source topic.")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        help="Model per framework for user factories: torch=pkg.mod:make_torch (repeatable).")] = None,
    drift_at: Annotated[int | None, typer.Option(help="Mark a known drift at this record index in the plots.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per run.")] = 1800.0,
) -> None:
    """Compare PyTorch (eager, compiled) and TensorFlow (tf.function, XLA) on the same pipeline and records.

    Each variant trains, then infers from its trained state, each in its own process, one after another;
    writes report.md, PNG plots and results.json.
    """
    from tensorstream.cli.common import console, fail, kafka_settings, out

    if demo == (spec_path is not None):
        fail("give a PIPELINE.yaml or --demo (one of them)", code=2)
    from tensorstream.bench.runner import BenchStream, demo_streams, parse_variants, run_bench

    try:
        chosen = parse_variants(variants)
    except ValueError as e:
        fail(str(e), code=2)
    kinds: dict[str, str] = {}
    for item in kind or []:
        backend, sep, factory = item.partition("=")
        if not sep or backend not in ("torch", "tensorflow") or ":" not in factory:
            fail(f"--kind {item!r}: use torch=pkg.module:factory or tensorflow=pkg.module:factory", code=2)
        kinds[backend] = factory
    tag = time.strftime("%Y%m%d-%H%M%S")
    if demo:
        streams = demo_streams(records, tag)
    else:
        from tensorstream.spec import SpecError, load_spec

        try:
            spec = load_spec(spec_path)  # type: ignore[arg-type]
        except SpecError as e:
            fail(str(e), code=2)
        if spec.mode == "infer" or spec.label is None:
            fail("bench trains each variant first: the spec needs mode train or train+infer and a label", code=2)
        if spec.model.kind not in ("linear", "mlp"):
            # a user factory builds one framework's model: the other framework needs its own --kind
            kinds.setdefault(spec.backend, spec.model.kind)
            dropped = [v.key for v in chosen if v.backend not in kinds]
            chosen = [v for v in chosen if v.backend in kinds]
            if dropped:
                console.print(f"[yellow]skipping {', '.join(dropped)}[/]: model.kind {spec.model.kind!r} builds a "
                              f"{spec.backend} model; give the other framework's factory with --kind BACKEND=pkg.mod:fn")
            if not chosen:
                fail("no variant left to run", code=2)
        streams = [BenchStream(spec.name, spec.name, spec, produce_from, records, drift_at)]
    out_dir = out_dir or Path("reports") / f"bench-{tag}"
    command = " ".join(["tensorstream", *(shlex.quote(a) for a in sys.argv[1:])])
    from tensorstream.bench.report import summary_table, write_report

    t0 = time.perf_counter()
    with kafka_settings(bootstrap_servers) as cfg:
        try:
            result = run_bench(cfg, streams, chosen, out_dir, console=console, timeout=timeout, kinds=kinds,
                               command=command, tag=tag)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
    report = write_report(result.to_dict(), out_dir)
    out.print(summary_table(result.to_dict()))
    out.print(f"report: [bold]{report}[/] (plots and results.json beside it); {time.perf_counter() - t0:.0f}s")
    if any("error" in (r.get(st) or {}) for s in result.streams for r in s["variants"].values()
           for st in ("train", "infer")):
        raise typer.Exit(1)
