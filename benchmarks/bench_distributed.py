"""Distributed online training: records/s with 1 rank vs 2 ranks, per framework.

    python benchmarks/bench_distributed.py [--records 20000] [--backends torch,tensorflow] [--repeat 1]

Every configuration runs as real ``tensorstream run`` processes against the
embedded broker, on a 2-partition topic of Agrawal records (record i on
partition i % 2; no drift), test-then-train, no sink:

- ``1 rank, batch 16``: the baseline (one process reads both partitions);
- ``2 ranks, 8 each``: the same union batch of 16 per step: the same training;
- ``2 ranks, 16 each``: each rank keeps the baseline's batch (union 32 per step),
  which is how data parallelism is meant to scale.

``rec/s`` is the job's records over the time from its first record to its end
(rank 0's clock; process start-up excluded); ``wall s`` includes start-up
(imports, rendezvous). The accuracy column is a sanity check, not a comparison:
one rank reading two partitions sees them interleaved by fetch timing, a
different record order than the ranks' union batches. The collectives' latency is measured separately: the
same backends' ``all_reduce`` of an 8-element int64 vector between 2
processes, round trips per second. A distributed step costs about 5 of them
(step vector, 2 for the feature sync, row count, the gradients).
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
from pathlib import Path

ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}


def _spec(backend: str, topic: str, state: str, name: str, batch: int):
    from tensorstream.examples import example_spec

    base = example_spec("agrawal_drift.yaml", backend=backend)
    return base.model_copy(update={
        "name": name, "mode": "train", "sink": None, "state_dir": state,
        "source": base.source.model_copy(update={"topic": topic}),
        "batch": base.batch.model_copy(update={"max_size": batch, "max_wait_ms": 3000}),
        "checkpoint": base.checkpoint.model_copy(update={"every_records": 100_000, "every_seconds": 3600}),
    })


def run_job(bootstrap: str, backend: str, topic: str, ranks: int, batch: int, workdir: Path) -> dict:
    import yaml

    name = f"b-{backend}-{ranks}x{batch}-{time.time_ns() % 10**9}"
    spec = _spec(backend, topic, str(workdir / "state"), name, batch)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False))
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "tensorstream", "--quiet", "run", str(path), "-b", bootstrap, "--until-end",
           "--result-json", str(out), "--timeout", "900"]
    if ranks > 1:
        cmd += ["--ranks", str(ranks)]
    t = time.perf_counter()
    with open(workdir / f"{name}.log", "wb") as log:
        code = subprocess.run(cmd, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    if code:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{(workdir / f'{name}.log').read_text()[-3000:]}")
    r = json.loads(out.read_text())
    return {"rps": r["records_per_s"], "wall": wall, "acc": r["metrics"]["accuracy"], "records": r["records"]}


def _allreduce_worker(backend: str, rank: int, port: int, ports: str, n: int) -> None:
    """One rank of the all-reduce latency probe (a child process)."""
    import numpy as np

    from tensorstream.backends import make_backend

    b = make_backend({"torch": "torch-ddp", "tensorflow": "tensorflow-multiworker"}[backend])
    b.connect(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, workers=ports.split(","),
              timeout_s=120, threads=1)
    v = np.arange(8, dtype=np.int64)
    for _ in range(20):  # warm up (TF traces, gloo connects)
        b.all_reduce(v)
    t = time.perf_counter()
    for _ in range(n):
        b.all_reduce(v)
    if rank == 0:
        print(json.dumps({"per_s": n / (time.perf_counter() - t)}), flush=True)
    b.all_reduce(v)
    b.close()


def allreduce_rate(backend: str, n: int = 300) -> float:
    from tensorstream.pipeline.distributed import free_ports

    ports = free_ports(3)
    workers = ",".join(f"127.0.0.1:{p}" for p in ports[1:])
    procs = [subprocess.Popen([sys.executable, __file__, "--_allreduce", backend, str(r), str(ports[0]), workers,
                               str(n)], env={**os.environ, **ENV}, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    out = procs[0].communicate(timeout=300)[0]
    procs[1].wait(60)
    return json.loads(out.strip().splitlines()[-1])["per_s"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_allreduce":
        backend, rank, port, workers, n = sys.argv[2:7]
        _allreduce_worker(backend, int(rank), int(port), workers, int(n))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--backends", default="torch,tensorflow")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the median is shown)")
    args = ap.parse_args()

    import orjson

    from tensorstream.data.datasets import open_source
    from tensorstream.kafka import EmbeddedBroker, KafkaAdmin, KafkaConfig, KafkaSink

    configs = [(1, 16), (2, 8), (2, 16)]
    rows = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        cfg = KafkaConfig.local(broker.bootstrap_servers)
        topic = "bench-dist"
        KafkaAdmin(cfg).ensure_topic(topic, 2)
        with KafkaSink(cfg) as sink:
            for i, rec in enumerate(open_source("river:synth.Agrawal?seed=7", args.records)):
                sink.produce(topic, orjson.dumps(rec), key=f"k{i}".encode(), partition=i % 2)
            sink.flush()
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            results: dict = {c: [] for c in configs}
            for _ in range(args.repeat):
                for ranks, batch in configs:  # interleaved: the machine's load drifts
                    results[(ranks, batch)].append(run_job(broker.bootstrap_servers, backend, topic, ranks, batch,
                                                           Path(tmp)))
            base = statistics.median(r["rps"] for r in results[(1, 16)])
            for ranks, batch in configs:
                rs = results[(ranks, batch)]
                rps = statistics.median(r["rps"] for r in rs)
                rows.append((backend, ranks, batch, rps, rps / base, statistics.median(r["wall"] for r in rs),
                             statistics.median(r["acc"] for r in rs)))
            rows.append((backend, "all-reduce", None, allreduce_rate(backend), None, None, None))

    load = os.getloadavg()[0]
    print(f"\n{args.records} Agrawal records, 2 partitions; {os.cpu_count()} CPUs, load average {load:.1f}\n")
    print(f"{'framework':<11} {'ranks':>10} {'batch/rank':>10} {'rec/s':>9} {'vs 1 rank':>9} {'wall s':>7} "
          f"{'accuracy':>8}")
    for backend, ranks, batch, rps, ratio, wall, acc in rows:
        if ranks == "all-reduce":
            print(f"{backend:<11} {'all-reduce':>10} {'8 x int64':>10} {rps:>9,.0f}  round trips/s (2 processes)")
            continue
        print(f"{backend:<11} {ranks:>10} {batch:>10} {rps:>9,.0f} {ratio:>8.2f}x {wall:>7.1f} {acc:>8.4f}")


if __name__ == "__main__":
    main()
