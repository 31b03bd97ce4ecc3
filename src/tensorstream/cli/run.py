"""``tensorstream run``: one pipeline (or N workers, or N ranks) with a live progress line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tensorstream.cli.common import (
    STOP_GRACE_S,
    BootstrapOpt,
    DashboardOpt,
    DashboardPortOpt,
    MetricsHostOpt,
    MetricsPortOpt,
    RunDirOpt,
    announce,
    console,
    fail,
    kafka_settings,
    observers,
    out,
    resolve_bootstrap,
    stop_signals,
)


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object on stdout.")] = False,
    allow_empty: Annotated[bool, typer.Option(
        "--allow-empty", help="With --until-end: a run that read no record is a success (else it fails).")] = False,
) -> None:
    """Run a pipeline: train, infer or both, with a live progress line. Ctrl-C stops cleanly.

    Progress goes to stderr; the results (counts and metrics) to stdout, as JSON with --json.
    A first Ctrl-C / SIGTERM finishes the batch in hand, checkpoints and commits; a second forces the stop.
    """
    from tensorstream.backends.check import check_model
    from tensorstream.delivery import RunControl
    from tensorstream.spec import SpecError, load_spec

    # Signals from the start: a SIGTERM during start-up (imports, group join) is a request to stop, not a crash.
    control = RunControl(grace_s=STOP_GRACE_S)
    engine: list[Any] = []
    with stop_signals(control, summary=lambda: engine[0].summary() if engine else ""):
        try:
            spec = load_spec(spec_path, backend=backend)  # validated before any connection
            check_model(spec)  # a user model: imported, built and checked in seconds (ModelCheckError)
        except SpecError as e:
            fail(str(e), code=2)
        if workers > 1:
            _run_workers(spec, spec_path, workers, bootstrap_servers, backend=backend, until_end=until_end,
                         max_records=max_records, timeout=timeout)
            return
        if ranks > 1:
            _run_ranks(spec, spec_path, ranks, bootstrap_servers, backend=backend, produce_from=produce_from,
                       limit=limit, until_end=until_end, max_records=max_records, timeout=timeout,
                       result_json=result_json, save_state=save_state, state_dir=state_dir)
            return
        _run_one(spec, control, engine, bootstrap_servers=bootstrap_servers, produce_from=produce_from, limit=limit,
                 until_end=until_end, max_records=max_records, timeout=timeout, result_json=result_json,
                 save_state=save_state, state_dir=state_dir, metrics_port=metrics_port, metrics_host=metrics_host,
                 dashboard=dashboard, dashboard_port=dashboard_port, run_dir=run_dir, as_json=as_json,
                 allow_empty=allow_empty)


def _run_one(spec: Any, control: Any, engine: list[Any], *, bootstrap_servers: str | None, produce_from: str | None,
             limit: int | None, until_end: bool, max_records: int | None, timeout: float | None,
             result_json: Path | None, save_state: str | None, state_dir: str | None, metrics_port: int | None,
             metrics_host: str, dashboard: bool, dashboard_port: int, run_dir: Path | None, as_json: bool,
             allow_empty: bool = False) -> None:
    from tensorstream.backends.check import ModelCheckError
    from tensorstream.checkpoint import CheckpointError, StateFileError
    from tensorstream.data.produce import produce_records
    from tensorstream.kafka.admin import KafkaConnectError
    from tensorstream.pipeline import Pipeline, PipelineError, Progress

    servers = resolve_bootstrap(bootstrap_servers, allow_embedded=True)
    tmp_state = None
    if state_dir:
        spec = spec.model_copy(update={"state_dir": state_dir})
    elif servers is None:  # the embedded broker's data does not outlive the run: neither do checkpoints
        import tempfile

        tmp_state = tempfile.TemporaryDirectory(prefix="tensorstream-run-")
        spec = spec.model_copy(update={"state_dir": tmp_state.name})
    with kafka_settings(servers) as cfg:
        if produce_from:
            # keyed state wants a key's records on one partition: key them by the state key field
            key = spec.features.key if spec.features.key and not spec.features.key.startswith("@") else None
            produce_records(cfg, produce_from, spec.source.topic, limit=limit, key_field=key,
                            progress=not console.quiet)
        status = console.status(f"[bold]{spec.name}[/] ({spec.backend}, {spec.mode}): joining the group ...")
        views = observers(dashboard, dashboard_port, run_dir)
        key = f"{spec.name}/{spec.backend}"

        def show(p: Progress) -> None:
            m = p.metrics
            metric = (f"acc {m['accuracy']:.4f} (window {m.get('accuracy_window', float('nan')):.4f})"
                      if "accuracy" in m else (f"MAE {m['mae']:.4f}" if "mae" in m else ""))
            lag = "?" if p.lag is None else f"{p.lag:,}"
            status.update(f"[bold]{spec.name}[/] ({p.backend}): {p.records:,} records  "
                          f"{p.records_per_s:,.0f} rec/s  lag {lag}  {metric}")
            views.progress(key, p)

        try:
            pipe = Pipeline(spec, cfg, on_progress=show, metrics_port=metrics_port, metrics_host=metrics_host,
                            control=control)
        except (StateFileError, CheckpointError) as e:
            fail(str(e))
        except ModelCheckError as e:  # a user model built from a checkpoint or model.weights
            fail(str(e), code=2)
        except OSError as e:  # the metrics port is taken
            fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {e.strerror or e}")
        engine.append(pipe.engine)
        if pipe.obs.url:
            announce(f"metrics: {pipe.obs.url}", url=pipe.obs.url)
        with status:
            try:
                result = pipe.run(until_end=until_end, max_records=max_records, timeout=timeout)
                views.result(key, result)
            except (PipelineError, KafkaConnectError, ModelCheckError) as e:  # ModelCheckError: at the first record
                views.error(key, str(e))
                fail(str(e), code=getattr(e, "exit_code", 2 if isinstance(e, ModelCheckError) else 1))
            finally:
                views.close()
                pipe.obs.close()
    print_result(result, as_json=as_json)
    if until_end and result.records == 0 and not allow_empty:
        starts = {f"{t}[{p}]": o for (t, p), o in pipe.start_positions.items()}
        fail(f"read no record from {spec.source.topic!r} (--until-end): it is empty, or group {spec.group_id} had "
             f"already processed it to its end (started at {starts or 'nothing assigned'}). Use another "
             "source.group_id (or state_dir) to start over, or --allow-empty if an empty run is fine.")
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


def print_result(result: Any, *, as_json: bool = False) -> None:
    """The run's figures on stdout: one JSON object with ``as_json``, else ``name value`` lines
    (counts as integers, rates and metrics with 4 decimals)."""
    counts = {"records": result.records, "predictions": result.predictions, "dead_letters": result.bad}
    # inference learns nothing: its learner's metrics are the loaded model's, from its training: not shown
    shown = {} if result.mode == "infer" else result.metrics
    metrics = {k: (int(v) if k.startswith("n_") and float(v).is_integer() else v) for k, v in shown.items()}
    if as_json:
        out.print_json(json.dumps({**counts, "records_per_s": result.records_per_s, "metrics": metrics,
                                   "model_version": result.model_version, "first_bad": result.first_bad},
                                  default=str))
        return
    console.print(f"[green]done[/]: {result.records:,} records, {result.predictions:,} predictions, "
                  f"{result.bad:,} dead letters, {result.records_per_s:,.0f} rec/s")
    for k, v in {**counts, "records_per_s": result.records_per_s, **metrics}.items():
        text = v if isinstance(v, int) else (f"{v:.1f}" if k == "records_per_s" else f"{v:.4f}")
        out.print(f"{k:<20} {text}", highlight=False, soft_wrap=True)
    out.print(f"{'model_version':<20} {result.model_version}", highlight=False, soft_wrap=True)


def _run_workers(spec: Any, spec_path: Path, n: int, bootstrap: str | None, **flags: Any) -> None:
    from tensorstream.pipeline.workers import run_workers

    if spec.trains:
        fail("--workers > 1 is for mode 'infer': N trainers would learn N diverging models; for data-parallel "
              "training (the frameworks' own engines) use --ranks N (docs/distributed.md)")
    with kafka_settings(resolve_bootstrap(bootstrap, allow_embedded=True)) as cfg:
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
    from tensorstream.data.produce import produce_records

    if not spec.trains:
        fail("--ranks is for training (mode 'train' or 'train+infer'); inference scales out with --workers N")
    if (spec.distributed.engine or spec.backend) == "none":
        fail("--ranks > 1, but the spec sets distributed.engine: none")
    servers = resolve_bootstrap(bootstrap, allow_embedded=True)
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
