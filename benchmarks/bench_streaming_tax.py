"""The streaming tax: online training through the broker vs the same learner in memory.

    python benchmarks/bench_streaming_tax.py [--repeats 3] [--batches 1,32,256] [--backends torch,tensorflow]
                                             [--learning per_record|mini_batch]

Records: River's Agrawal generator (seed 42), through the ``agrawal_drift``
example spec (6 numeric fields standardised + 3 categorical fields one-hot,
78 features; MLP [64, 32], Adam), ``model.threads: 1``. Per backend (each in
its own process) and batch size, three loops over the same records, in turn
within each repeat so that machine noise hits all three alike:

- **pipeline**: broker -> JSON decode -> features -> test-then-train
  (``Pipeline``, ``mode: train``, no sink), offset commits and checkpoints
  included: what ``tensorstream run`` does;
- **learner**: ``OnlineLearner.process`` on pre-decoded dicts (features, predict,
  metrics, train step), in memory;
- **raw**: the framework alone, on pre-built arrays: the call that does the
  learner's learning (``backend.learn_sequential`` per batch under the default
  per-record learning, ``backend.train_step`` under ``--learning mini_batch``).

The pipeline also runs a second time with checkpoints on time only
(``checkpoint.every_records`` out of reach, so every 30 s); the spec default
(every 50,000 records or 30 s, whichever comes first) checkpoints about every
2-3 s at these rates, and that cost shows as the difference of the two columns.

Rates are steady state: the group join and the first batch (model build,
first-step imports) are excluded from all three. The ratio pipeline/learner is
the cost of streaming (target >= 0.9 at batch 1, 32 and 256); learner/raw
the cost of the learner around the framework (target >= 0.6 at batch 32).

Two figures per loop: wall-clock records/s, and records per CPU-second of the
process (all threads, librdkafka's included; the broker is another process
and is not counted). On a shared machine the wall-clock figure moves with the
neighbours' load; the CPU-time figure much less, so both ratios are printed
(medians of the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

#: records per run, by batch size (enough for several seconds at steady state)
RECORDS = {1: 5_000, 8: 20_000, 32: 50_000, 256: 100_000}
SOURCE = "river:synth.Agrawal?seed=42"
TARGET = 0.9
#: the in-memory learner over the raw framework call, at batch 32 (issue #14)
LEARNER_TARGET = 0.6


def _records_for(batch: int, scale: float) -> int:
    n = RECORDS.get(batch) or max(RECORDS[b] for b in RECORDS if b <= batch)
    return max(batch * 20, int(n * scale) // batch * batch)


def _spec(backend: str, batch: int, state_dir: str, every_records: int | None = None,
          learning: str | None = None) -> Any:
    from tensorstream.examples import example_spec

    base = example_spec("agrawal_drift.yaml", backend=backend)
    extra = {}
    if learning:
        extra["learn"] = base.learn.model_copy(update={"learning": learning})
    if every_records is not None:
        extra["checkpoint"] = base.checkpoint.model_copy(update={"every_records": every_records})
    return base.model_copy(update={**extra,
        "name": f"tax-{backend}-{batch}-{uuid.uuid4().hex[:6]}", "mode": "train", "sink": None,
        "source": base.source.model_copy(update={"topic": "tax"}),
        "batch": base.batch.model_copy(update={"max_size": batch}),
        "model": base.model.model_copy(update={"threads": 1}),
        "state_dir": state_dir,
    })


def _pipeline(spec: Any, cfg: Any, n: int) -> tuple[float, float]:
    from tensorstream.bench.timed import TimedPipeline

    pipe = TimedPipeline(spec, cfg)
    pipe.run(max_records=n, until_end=True, timeout=600)
    assert pipe.records >= n, f"pipeline read {pipe.records} of {n} records"
    return pipe.steady_records_per_s or 0.0, pipe.steady_records_per_cpu_s or 0.0


def _timed(fn: Any, items: list[Any], n: int) -> tuple[float, float]:
    """(records/s, records per CPU-second) of ``fn`` over ``items``, ``n`` records in all."""
    t, c = time.perf_counter(), time.process_time()
    for item in items:
        fn(item)
    return n / (time.perf_counter() - t), n / max(time.process_time() - c, 1e-9)


def _learner(spec: Any, records: list[dict[str, Any]], batch: int) -> tuple[tuple[float, float], Any]:
    from tensorstream.backends import make_backend
    from tensorstream.learn import OnlineLearner

    learner = OnlineLearner(spec, make_backend(spec.backend))
    learner.process(records[:batch])  # builds the model: excluded, as in the pipeline's steady rate
    chunks = [records[i : i + batch] for i in range(batch, len(records), batch)]
    return _timed(learner.process, chunks, len(records) - batch), learner


def _raw(spec: Any, learner: Any, records: list[dict[str, Any]], batch: int) -> tuple[float, float]:
    import numpy as np

    from tensorstream.backends import make_backend

    X, good, _ = learner.features.transform_batch(records, update=False)
    y = np.asarray([records[i]["y"] for i in good], dtype=np.int64)  # classes [0, 1]: value = index
    backend = make_backend(spec.backend)
    backend.build(spec.model, X.shape[1], 2, "classification")
    batches = [(np.ascontiguousarray(X[i : i + batch]), y[i : i + batch]) for i in range(0, len(X), batch)]
    step = backend.learn_sequential if learner.per_record else backend.train_step
    step(*batches[0])
    return _timed(lambda b: step(*b), batches[1:], len(X) - len(batches[0][1]))


def child(backend: str, bootstrap: str, batches: list[int], repeats: int, scale: float,
          learning: str | None = None) -> dict[str, Any]:
    from tensorstream.data.datasets import open_source
    from tensorstream.kafka import KafkaConfig

    cfg = KafkaConfig.local(bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=300)  # quicker joins
    state_dir = tempfile.mkdtemp(prefix="tensorstream-tax-")
    all_records = list(open_source(SOURCE, limit=max(_records_for(b, scale) for b in batches)))
    out: dict[str, Any] = {}
    for batch in batches:
        n = _records_for(batch, scale)
        records = all_records[:n]
        runs: dict[str, list[list[float]]] = {"pipeline": [], "pipeline_ckpt_time": [], "learner": [], "raw": []}
        for _ in range(repeats):  # each entry: [records/s, records per CPU-second]
            runs["pipeline"].append(list(_pipeline(_spec(backend, batch, state_dir, learning=learning), cfg, n)))
            rates, learner = _learner(_spec(backend, batch, state_dir, learning=learning), records, batch)
            runs["learner"].append(list(rates))
            runs["pipeline_ckpt_time"].append(list(_pipeline(_spec(backend, batch, state_dir, 10**12, learning),
                                                             cfg, n)))
            runs["raw"].append(list(_raw(learner.spec, learner, records, batch)))
        out[str(batch)] = {"records": n, "learning": learner.learning if learner.per_record else "mini_batch", **runs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--backends", default="torch,tensorflow")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the records per run")
    ap.add_argument("--learning", choices=("per_record", "mini_batch"), help="learn.learning (default: the spec's)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.bootstrap, batches, args.repeats, args.scale, args.learning)))
        return

    from tensorstream.bench.machine import describe, machine_info
    from tensorstream.kafka import EmbeddedBroker, KafkaConfig
    from tensorstream.data.produce import produce_records

    info = machine_info()
    print(f"machine: {describe(info)}")
    n_max = max(_records_for(b, args.scale) for b in batches)
    print(f"records: {SOURCE}, {n_max:,} produced; per run: "
          + ", ".join(f"batch {b}: {_records_for(b, args.scale):,}" for b in batches)
          + f"; repeats: {args.repeats} (median shown)")
    results: dict[str, Any] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig.local(broker.bootstrap_servers)
        produce_records(cfg, SOURCE, "tax", limit=n_max)
        for backend in args.backends.split(","):
            cmd = [sys.executable, __file__, "--child", backend, "--bootstrap", broker.bootstrap_servers,
                   "--batches", args.batches, "--repeats", str(args.repeats), "--scale", str(args.scale),
                   *(["--learning", args.learning] if args.learning else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{backend} child failed:\n{proc.stderr[-3000:]}")
            results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nmedian of {args.repeats}; wall = records/s, cpu = records per CPU-second of the process")
    print(f"{'backend':<11}{'batch':>6}{'pipeline':>10}{'learner':>10}{'raw':>10}{'pipe/learner':>14}"
          f"{'pipe/learner':>14}{'ckpt 30s':>10}{'learner/raw':>13}  target >= {TARGET} (wall; cpu)")
    print(f"{'':<17}{'wall':>10}{'wall':>10}{'wall':>10}{'wall':>14}{'cpu':>14}{'cpu':>10}{'wall':>13}")
    rows = []

    def med(runs: list[list[float]], k: int) -> float:
        return statistics.median(r[k] for r in runs)

    for backend, per_batch in results.items():
        for batch, r in per_batch.items():
            p, l, w = (med(r[k], 0) for k in ("pipeline", "learner", "raw"))
            pc, lc, ptc = med(r["pipeline"], 1), med(r["learner"], 1), med(r["pipeline_ckpt_time"], 1)
            wall_ok, cpu_ok = p / l >= TARGET, pc / lc >= TARGET
            target = f"{'met' if wall_ok else 'MISSED'}; {'met' if cpu_ok else 'MISSED'}"
            rows.append({"backend": backend, "batch": int(batch), "records": r["records"],
                         "learning": r.get("learning"), "pipeline": p,
                         "learner": l, "raw": w, "pipe_over_learner": p / l, "pipeline_cpu": pc, "learner_cpu": lc,
                         "pipe_over_learner_cpu": pc / lc, "pipe_ckpt_time_over_learner_cpu": ptc / lc,
                         "pipe_over_raw": p / w, "learner_over_raw": l / w, "target": target, "runs": r})
            print(f"{backend:<11}{batch:>6}{p:>10,.0f}{l:>10,.0f}{w:>10,.0f}{p / l:>14.2f}{pc / lc:>14.2f}"
                  f"{ptc / lc:>10.2f}{l / w:>13.2f}  {target}")
    print(f"\ntargets: pipeline (spec defaults) >= {TARGET}x the in-memory learner at every batch size; learner >= "
          f"{LEARNER_TARGET}x raw at batch 32. raw: the framework call that does the learner's learning, on pre-built "
          "arrays. ckpt 30s: the pipeline with checkpoints on time only (every 30 s) instead of every 50,000 records "
          "(the default).")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "target": TARGET,
                                         "learner_target": LEARNER_TARGET}, indent=2))


if __name__ == "__main__":
    main()
