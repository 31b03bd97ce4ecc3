"""Run one pipeline spec on each framework variant, through the real broker, one after another.

Variants: PyTorch eager, PyTorch ``torch.compile``, TensorFlow ``tf.function``
and TensorFlow XLA (``model.compile: true``). Every variant reads the same
records from the same source topic (a fresh consumer group each, from the
earliest offset) and runs twice, each time in a freshly spawned process (so
peak memory is that variant's alone, and no framework state is shared):

1. **train**: the spec's own mode (test-then-train), then ``Pipeline.save_state``;
2. **infer**: ``mode: infer`` on the same records, from that saved state
   (``model.weights``).

Runs are sequential, never concurrent, with ``model.threads: 1``, so one run's
thread pools never compete with another's. Inside each child a thread samples
the process RSS every 0.5 s. Accuracy is scored twice: by the pipeline's own
prequential metrics, and independently from the predictions topic joined to
the source topic's labels by offset (overall, windowed, before/after a drift).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tensorstream.kafka import KafkaAdmin, KafkaConfig
from tensorstream.spec import PipelineSpec, SinkSpec

#: RSS sampling period in the child processes, in seconds
RSS_PERIOD_S = 0.5
#: latency quantiles kept per run (for the CDF plots): 0, 0.5, ..., 100 percent
LATENCY_QUANTILES = np.linspace(0.0, 100.0, 201)


@dataclass(frozen=True)
class Variant:
    key: str
    backend: str
    compile: bool
    title: str


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("torch", "torch", False, "PyTorch eager"),
    Variant("torch-compile", "torch", True, "PyTorch torch.compile"),
    Variant("tensorflow", "tensorflow", False, "TensorFlow tf.function"),
    Variant("tensorflow-xla", "tensorflow", True, "TensorFlow XLA (jit_compile)"),
)}


@dataclass
class BenchStream:
    """One stream to benchmark: a base spec and where its records come from."""

    key: str  # short name, used in file names
    title: str
    spec: PipelineSpec
    produce: str | None = None  # fill the source topic from this first (river:NAME or a file)
    records: int | None = None  # cap on the records read (and produced)
    drift_at: int | None = None  # record index of a known drift (plots mark it)


@dataclass
class BenchResult:
    meta: dict[str, Any]
    streams: list[dict[str, Any]] = field(default_factory=list)
    verbosity: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "streams": self.streams, "verbosity": self.verbosity}


def parse_variants(text: str) -> list[Variant]:
    """``"torch,tensorflow-xla"`` -> variants, in the order given.

    >>> [v.key for v in parse_variants("tensorflow, torch")]
    ['tensorflow', 'torch']
    >>> parse_variants("jax")
    Traceback (most recent call last):
    ...
    ValueError: unknown variant(s) ['jax']: choose from torch, torch-compile, tensorflow, tensorflow-xla
    """
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in VARIANTS]
    if bad or not keys:
        raise ValueError(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    return [VARIANTS[k] for k in dict.fromkeys(keys)]


def demo_streams(records: int | None, tag: str) -> list[BenchStream]:
    """The demo's streams (drifting Agrawal, Phishing) on fresh topics, capped at ``records``."""
    from tensorstream.cli.demo import STREAMS
    from tensorstream.examples import example_spec

    out = []
    for s in STREAMS:
        base = example_spec(s.example)
        n = min(records, s.records) if records else s.records
        spec = base.model_copy(update={
            "source": base.source.model_copy(update={"topic": f"{base.source.topic}.bench-{tag}"})})
        drift = s.drift_at if s.drift_at is not None and s.drift_at < n else None
        out.append(BenchStream(base.name, s.title, spec, s.source, n, drift))
    return out


def variant_spec(base: PipelineSpec, variant: Variant, stage: str, tag: str, *, kind: str | None = None,
                 weights: str | None = None, state_dir: str | None = None) -> PipelineSpec:
    """The spec one child runs: the base spec on ``variant``'s framework, its own group, sink and state."""
    infer = stage == "infer"
    model = base.model.model_copy(update={
        "compile": variant.compile, "threads": 1, "kind": kind or base.model.kind,
        "weights": weights if infer else None,
    })
    sink_base = base.sink.topic if base.sink else f"{base.name}.predictions"
    sink = None
    if infer or base.mode == "train+infer":
        sink = SinkSpec(topic=f"{sink_base}.bench-{tag}.{variant.key}{'.infer' if infer else ''}")
    data = base.model_dump()
    data.update(
        name=f"{base.name}-bench-{tag}-{variant.key}{'-infer' if infer else ''}",
        backend=variant.backend,
        mode="infer" if infer else base.mode,
        model=model.model_dump(),
        sink=sink.model_dump() if sink else None,
        # every variant reads the same records: a fresh group from the first offset
        source={**base.source.model_dump(), "group_id": None, "auto_offset_reset": "earliest"},
    )
    if state_dir is not None and "state_dir" in PipelineSpec.model_fields:
        data["state_dir"] = state_dir  # checkpoints go to the report directory, not ./.tensorstream
    return PipelineSpec.model_validate(data)


# --------------------------------------------------------------------- child


def _child(job: dict[str, Any], q: Any) -> None:  # runs in a spawned process
    import psutil

    created = psutil.Process().create_time()
    log = open(job["log"], "ab", buffering=0)  # framework chatter goes to the log, not the live display
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
                       "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                       # compile in this process: its memory is counted, no worker pool competes
                       "TORCHINDUCTOR_COMPILE_THREADS": "1"})
    samples: list[tuple[float, float, int]] = []
    holder: dict[str, Any] = {}
    stop = threading.Event()

    def sample() -> None:
        proc = psutil.Process()
        while True:
            pipe = holder.get("pipe")
            samples.append((round(time.time() - created, 3), proc.memory_info().rss / 2**20,
                            int(pipe.records) if pipe is not None else 0))
            if stop.wait(RSS_PERIOD_S):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        import importlib

        from tensorstream.bench.timed import TimedPipeline

        spec = PipelineSpec.model_validate_json(job["spec"])
        t = time.perf_counter()
        importlib.import_module(f"tensorstream.backends.{spec.backend}")
        import_s = time.perf_counter() - t

        def progress(p: Any) -> None:
            q.put(("progress", {"records": p.records, "rate": p.records_per_s,
                                "accuracy": p.metrics.get("accuracy")}))

        t = time.perf_counter()
        pipe = TimedPipeline(spec, job["kafka"], on_progress=progress)  # infer: loads and builds the model here
        construct_s = time.perf_counter() - t
        holder["pipe"] = pipe
        ready_s = time.time() - created
        result = pipe.run(until_end=True, max_records=job["max_records"], timeout=job["timeout"])
        if job.get("save_state"):
            pipe.save_state(job["save_state"])
        stop.set()
        sampler.join(2)
        out = result.to_dict()
        lat = pipe.latencies_ms()
        out.update(
            stage=job["stage"], import_s=import_s, construct_s=construct_s, startup_s=ready_s,
            first_prediction_s=pipe.first_prediction_s, steady_records_per_s=pipe.steady_records_per_s,
            latency_quantiles_ms=np.percentile(lat, LATENCY_QUANTILES).round(4).tolist() if len(lat) else [],
            rss_samples=samples,
            history=[list(h) for h in out.get("history", [])],
        )
        q.put(("result", out))
    except BaseException as e:  # surfaced in the report, never a silent hang
        stop.set()
        q.put(("error", f"{type(e).__name__}: {e}"))
        raise


# -------------------------------------------------------------------- parent


class _Display:
    """Live progress: one line per run (stream / variant / stage)."""

    def __init__(self, console: Any | None):
        self.console = console
        self.progress = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description:<44}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>9} rec/s"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                console=console, transient=False)

    def __enter__(self) -> _Display:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def add(self, description: str, total: int | None) -> Any:
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, rate="", info="starting")

    def update(self, task: Any, **kw: Any) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, **kw)

    def print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)


def _run_child(ctx: Any, job: dict[str, Any], display: _Display, task: Any, total: int | None) -> dict[str, Any]:
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, q), daemon=True)
    proc.start()
    deadline = time.monotonic() + job["timeout"] + 120  # + imports, group join, compile
    result: dict[str, Any] | None = None
    try:
        while result is None:
            try:
                kind, payload = q.get(timeout=0.5)
            except queue.Empty:
                if not proc.is_alive():
                    result = {"error": f"worker exited with code {proc.exitcode}; see {job['log']}"}
                elif time.monotonic() > deadline:
                    result = {"error": f"timed out after {job['timeout']:.0f}s"}
                continue
            if kind == "progress":
                acc = payload.get("accuracy")
                display.update(task, completed=payload["records"], rate=f"{payload['rate']:,.0f}",
                               info=f"acc {acc:.4f}" if acc is not None else "")
            elif kind == "result":
                result = payload
            else:
                result = {"error": payload}
    finally:
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    if "error" in result:
        display.update(task, info=f"[red]{result['error'][:60]}[/]")
    else:
        display.update(task, completed=result["records"], total=total or result["records"],
                       rate=f"{result['records_per_s']:,.0f}", info="done")
    return result


def _consumer(cfg: KafkaConfig) -> Any:
    from confluent_kafka import Consumer

    return Consumer({**cfg.client_settings(), "group.id": f"tensorstream.bench.reader.{uuid.uuid4().hex[:8]}",
                     "enable.partition.eof": True, "enable.auto.commit": False, "auto.offset.reset": "earliest"})


def read_topic(cfg: KafkaConfig, topic: str, *, until: dict[int, int] | None = None,
               timeout: float = 120.0) -> Iterator[Any]:
    """Every message of ``topic`` from the first offset to its end (or below ``until[partition]``).

    Assigned, not subscribed: no group join, so reading back is quick.
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    n = KafkaAdmin(cfg).list_topics().get(topic)
    if n is None:
        return
    parts = set(range(n)) if until is None else {p for p in range(n) if until.get(p, 0) > 0}
    c = _consumer(cfg)
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout
        while parts and time.monotonic() < deadline:
            for m in c.consume(1000, 0.2):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        parts.discard(m.partition())
                    continue
                if until is not None and m.offset() >= until.get(m.partition(), 0):
                    parts.discard(m.partition())
                    continue
                yield m
    finally:
        c.close()


def topic_records(cfg: KafkaConfig, topic: str) -> int:
    """Records in ``topic`` now (end minus start offsets, all partitions)."""
    admin = KafkaAdmin(cfg)
    info = admin.describe(topic)
    ends = admin.end_offsets(topic)
    return sum(ends[(topic, p)] - lo for p, (lo, _) in info.watermarks.items())


def check_predictions(cfg: KafkaConfig, spec: PipelineSpec, sink_topic: str, drift_at: int | None,
                      window: int) -> dict[str, Any]:
    """Score the predictions topic against the source topic's labels, joined by source offset."""
    from tensorstream.codecs import get_codec

    preds: dict[tuple[int, int], Any] = {}
    for m in read_topic(cfg, sink_topic):
        p = orjson.loads(m.value())
        preds[(p["source"]["partition"], p["source"]["offset"])] = p.get("label")
    if not preds or spec.label is None:
        return {"checked": len(preds)}
    until: dict[int, int] = {}
    for part, off in preds:
        until[part] = max(until.get(part, 0), off + 1)
    codec = get_codec(spec.source.codec, **spec.source.codec_options())
    hits: dict[tuple[int, int], bool] = {}
    for m in read_topic(cfg, spec.source.topic, until=until):
        key = (m.partition(), m.offset())
        if key not in preds:
            continue
        try:
            truth = codec.decode(m.value()).get(spec.label.field)
            hits[key] = bool(preds[key] is not None and truth is not None and preds[key] == truth)
        except Exception:  # an undecodable record was dead-lettered, not predicted
            continue
    ordered = [hits[k] for k in sorted(hits)]
    out: dict[str, Any] = {"checked": len(ordered)}
    if ordered:
        out["accuracy"] = float(np.mean(ordered))
        out["accuracy_window"] = float(np.mean(ordered[-window:]))
    single = len(until) == 1
    if drift_at is not None and single:
        before = [v for (_, off), v in hits.items() if off < drift_at]
        after = [v for (_, off), v in hits.items() if off >= drift_at]
        if before:
            out["before_drift"] = float(np.mean(before))
        if after:
            out["after_drift"] = float(np.mean(after))
    return out


def run_bench(cfg: KafkaConfig, streams: list[BenchStream], variants: list[Variant], out_dir: Path, *,
              console: Any | None = None, timeout: float = 1800.0, kinds: dict[str, str] | None = None,
              command: str = "", tag: str | None = None) -> BenchResult:
    """Run every stream on every variant (train, then infer), one process at a time; results in ``out_dir``."""
    from tensorstream.bench.machine import machine_info
    from tensorstream.bench.verbosity import verbosity
    from tensorstream.data.produce import produce_records

    kinds = kinds or {}
    tag = tag or time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    (out_dir / "states").mkdir(parents=True, exist_ok=True)
    meta = machine_info()
    meta.update(command=command, bootstrap_servers=cfg.bootstrap_servers, tag=tag,
                variants=[v.key for v in variants], timeout_s=timeout)
    bench = BenchResult(meta)
    ctx = mp.get_context("spawn")
    with _Display(console) as display:
        for stream in streams:
            spec = stream.spec
            topic = spec.source.topic
            if stream.produce:
                display.print(f"[bold]{stream.title}[/]: producing {stream.records or 'all'} records "
                              f"from {stream.produce} to '{topic}'")
                produce_records(cfg, stream.produce, topic, limit=stream.records)
            try:
                available = topic_records(cfg, topic)
            except KeyError:
                raise ValueError(f"source topic {topic!r} does not exist: produce records first (--produce)") from None
            total = min(available, stream.records) if stream.records else available
            if total == 0:
                raise ValueError(f"source topic {topic!r} is empty: produce records first (--produce)")
            entry: dict[str, Any] = {"key": stream.key, "title": stream.title, "topic": topic, "records": total,
                                     "drift_at": stream.drift_at, "metrics_window": spec.metrics_window,
                                     "batch": spec.batch.model_dump(), "mode": spec.mode,
                                     "model": spec.model.model_dump(include={"kind", "hidden", "activation"}),
                                     "variants": {}}
            for v in variants:
                kind = kinds.get(v.backend) or spec.model.kind
                row: dict[str, Any] = {"title": v.title, "backend": v.backend, "compile": v.compile, "kind": kind}
                entry["variants"][v.key] = row
                state = out_dir / "states" / f"{stream.key}-{v.key}.safetensors"
                for stage in ("train", "infer"):
                    if stage == "infer" and "error" in row.get("train", {}):
                        row["infer"] = {"error": "skipped: training failed"}
                        continue
                    vspec = variant_spec(spec, v, stage, tag, kind=kind,
                                         weights=str(state.resolve()) if stage == "infer" else None,
                                         state_dir=str((out_dir / "pipeline-state").resolve()))
                    job = {"spec": vspec.model_dump_json(), "kafka": cfg, "stage": stage,
                           "max_records": stream.records, "timeout": timeout,
                           "save_state": str(state) if stage == "train" else None,
                           "log": str(out_dir / "logs" / f"{stream.key}-{v.key}-{stage}.log")}
                    task = display.add(f"{stream.key} · {v.key} · {stage}", total)
                    row[stage] = _run_child(ctx, job, display, task, total)
                    if stage == "train" and vspec.sink is not None and "error" not in row[stage]:
                        row["sink"] = vspec.sink.topic
            for v in variants:
                row = entry["variants"][v.key]
                if row.get("sink"):
                    row["check"] = check_predictions(cfg, spec, row["sink"], stream.drift_at, spec.metrics_window)
            bench.streams.append(entry)
            for v in variants:
                kind = entry["variants"][v.key]["kind"]
                vkey = f"{v.backend}:{kind}"
                if vkey not in bench.verbosity:
                    try:
                        bench.verbosity[vkey] = verbosity(v.backend, kind)
                    except Exception as e:  # a factory that cannot be read still gets its timings reported
                        bench.verbosity[vkey] = {"backend": v.backend, "source": kind, "error": str(e)}
    (out_dir / "results.json").write_bytes(orjson.dumps(bench.to_dict(), option=orjson.OPT_INDENT_2
                                                        | orjson.OPT_SERIALIZE_NUMPY))
    return bench
