"""Soak: a long train+infer run; memory growth and throughput over time.

    python benchmarks/bench_soak.py [--records 1000000] [--every 100000] [--backends torch,tensorflow]

Records: River's Agrawal generator (seed 42), produced to the embedded broker
first; then the ``agrawal_drift`` example spec (``train+infer``: test-then-train
and one prediction per record to the predictions topic, spec-default
checkpoints, ``model.threads: 1``) reads them all, each backend in its own
process. A line is printed about every ``--every`` records: records/s over the
last interval and the pipeline process's RSS (plus the broker's, for
information: it holds every record in memory).

Targets: RSS growth < 50 MB from the first line (warm-up done: imports, model
build, allocator pools) to the highest later line; no throughput decay: the
median rate of the last three intervals >= 0.9x that of the first three (medians,
because a shared machine's neighbours move single intervals a lot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SOURCE = "river:synth.Agrawal?seed=42"
TARGET_RSS_MB = 50.0
TARGET_DECAY = 0.9


def child(backend: str, bootstrap: str, topic: str, n: int, every: int, batch: int | None) -> None:
    import psutil

    from tensorstream.bench.timed import TimedPipeline
    from tensorstream.examples import example_spec
    from tensorstream.kafka import KafkaConfig

    base = example_spec("agrawal_drift.yaml", backend=backend)
    update: dict[str, Any] = {
        "name": f"soak-{backend}-{uuid.uuid4().hex[:6]}", "state_dir": tempfile.mkdtemp(prefix="tensorstream-soak-"),
        "source": base.source.model_copy(update={"topic": topic}),
        "sink": base.sink.model_copy(update={"topic": f"{topic}.pred.{backend}"}),
        "model": base.model.model_copy(update={"threads": 1}),
    }
    if batch:
        update["batch"] = base.batch.model_copy(update={"max_size": batch})
    spec = base.model_copy(update=update)
    proc = psutil.Process()
    mark = {"next": every, "records": 0, "t": None}

    def progress(p: Any) -> None:
        if not pipe.source.assigned:  # the report after the run closed: its interval would include the close
            return
        now = time.perf_counter()
        if mark["t"] is None and p.records:
            mark["t"], mark["records"] = now, p.records
        if p.records >= mark["next"]:
            rate = (p.records - mark["records"]) / max(now - mark["t"], 1e-9)
            print(json.dumps({"records": p.records, "rate": rate, "rss_mb": proc.memory_info().rss / 2**20,
                              "accuracy": p.metrics.get("accuracy"), "elapsed_s": p.elapsed_s}), flush=True)
            mark.update(records=p.records, t=now)
            while mark["next"] <= p.records:
                mark["next"] += every

    cfg = KafkaConfig.local(bootstrap)
    pipe = TimedPipeline(spec, cfg, on_progress=progress)
    res = pipe.run(max_records=n, until_end=True)
    print(json.dumps({"done": True, "records": res.records, "steady_rate": pipe.steady_records_per_s,
                      "rss_mb": proc.memory_info().rss / 2**20, "peak_rss_mb": res.peak_rss_mb,
                      "checkpoints": getattr(res, "checkpoints", None), "accuracy": res.metrics.get("accuracy"),
                      "p50_ms": res.latency_p50_ms, "p99_ms": res.latency_p99_ms}), flush=True)


def summarize(lines: list[dict[str, Any]]) -> tuple[float, float]:
    """(RSS growth in MB: highest line - first line, throughput: median of last 3 / first 3 intervals)."""
    import statistics

    if len(lines) < 2:
        return float("nan"), float("nan")
    growth = max(r["rss_mb"] for r in lines) - lines[0]["rss_mb"]
    k = min(3, len(lines) // 2)
    first = statistics.median(r["rate"] for r in lines[:k])
    last = statistics.median(r["rate"] for r in lines[-k:])
    return growth, last / first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000)
    ap.add_argument("--batch", type=int, help="override the spec's batch.max_size (8)")
    ap.add_argument("--backends", default="torch,tensorflow")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bootstrap, args.topic, args.records, args.every, args.batch)
        return

    import psutil

    from tensorstream.bench.machine import describe, machine_info
    from tensorstream.kafka import EmbeddedBroker, KafkaConfig
    from tensorstream.data.produce import produce_records

    info = machine_info()
    print(f"machine: {describe(info)}")
    results: dict[str, Any] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig.local(broker.bootstrap_servers)
        broker_proc = psutil.Process(broker.pid)
        t = time.perf_counter()
        produce_records(cfg, SOURCE, "soak", limit=args.records)
        print(f"produced {args.records:,} records of {SOURCE} in {time.perf_counter() - t:.0f}s; "
              f"spec agrawal_drift (train+infer, batch {args.batch or 8})")
        for backend in args.backends.split(","):
            print(f"\n{backend}: {'records':>10}{'rec/s':>10}{'RSS MB':>9}{'growth':>9}{'broker MB':>11}{'accuracy':>10}")
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--child", backend, "--bootstrap", broker.bootstrap_servers,
                   "--topic", "soak", "--records", str(args.records), "--every", str(args.every),
                   *(["--batch", str(args.batch)] if args.batch else [])]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            assert proc.stdout is not None
            lines: list[dict[str, Any]] = []
            final: dict[str, Any] = {}
            for raw in proc.stdout:
                rec = json.loads(raw)
                if rec.get("done"):
                    final = rec
                    continue
                rec["broker_rss_mb"] = broker_proc.memory_info().rss / 2**20
                lines.append(rec)
                growth = rec["rss_mb"] - lines[0]["rss_mb"]
                print(f"{'':<{len(backend) + 2}}{rec['records']:>10,}{rec['rate']:>10,.0f}{rec['rss_mb']:>9,.0f}"
                      f"{growth:>+9.1f}{rec['broker_rss_mb']:>11,.0f}{rec['accuracy']:>10.4f}", flush=True)
            if proc.wait() != 0:
                raise SystemExit(f"{backend} soak child failed")
            wall = time.perf_counter() - t0
            growth, decay = summarize(lines)
            ok_mem = "met" if growth < TARGET_RSS_MB else "MISSED"
            ok_rate = "met" if decay >= TARGET_DECAY else "MISSED"
            print(f"  {backend}: {final['records']:,} records in {wall:.0f}s (steady {final['steady_rate']:,.0f} rec/s); "
                  f"RSS {lines[0]['rss_mb'] if lines else 0:,.0f} MB at the first line, at most "
                  f"{max((r['rss_mb'] for r in lines), default=0):,.0f} MB later, {final['rss_mb']:,.0f} MB after the run "
                  f"(growth {growth:+.1f} MB: {ok_mem}, target < {TARGET_RSS_MB:g}); rate, last 3 / first 3 "
                  f"intervals {decay:.2f}x ({ok_rate}, target >= {TARGET_DECAY}); checkpoints {final['checkpoints']}; "
                  f"accuracy {final['accuracy']:.4f}")
            results[backend] = {"lines": lines, "final": final, "wall_s": wall, "rss_growth_mb": growth,
                                "rate_last_over_first": decay, "target_rss": ok_mem, "target_rate": ok_rate}
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "records": args.records, "results": results,
                                         "target_rss_mb": TARGET_RSS_MB, "target_decay": TARGET_DECAY}, indent=2))


if __name__ == "__main__":
    main()
