"""Throughput of ``train_step`` and ``predict`` per backend, in records/s.

An MLP [8 -> 32 -> 2] (classification, Adam) at batch sizes 1, 32 and 256.
Each backend runs in its own process, so one framework's thread pool never
competes with the other's::

    PYTHONPATH=src python benchmarks/bench_backends.py [--seconds 1.0]

Thread counts are the frameworks' defaults; set OMP_NUM_THREADS (torch) to try
others. Figures from a loaded machine are not comparable to an idle one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from tensorstream.backends import BACKENDS, make_backend
from tensorstream.spec import ModelSpec

BATCHES = (1, 32, 256)


def _rate(fn, batch: int, seconds: float) -> float:
    for _ in range(3):  # warm-up: tracing, allocator, lazy imports
        fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls * batch / elapsed


def bench(name: str, seconds: float, compile: bool = False) -> dict[str, float]:
    backend = make_backend(name)
    backend.build(ModelSpec(kind="mlp", hidden=[32], compile=compile), 8, 2, "classification")
    rng = np.random.default_rng(0)
    out = {}
    for batch in BATCHES:
        x = rng.normal(size=(batch, 8)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        out[f"train_step b={batch}"] = _rate(lambda: backend.train_step(x, y), batch, seconds)
        out[f"predict b={batch}"] = _rate(lambda: backend.predict(x), batch, seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per figure")
    parser.add_argument("--compile", action="store_true", help="torch.compile / XLA")
    parser.add_argument("--only", choices=BACKENDS, help=argparse.SUPPRESS)  # the per-backend child process
    args = parser.parse_args()
    if args.only:
        print(json.dumps(bench(args.only, args.seconds, args.compile)))
        return
    results = {}
    for name in BACKENDS:
        cmd = [sys.executable, __file__, "--only", name, "--seconds", str(args.seconds)]
        child = subprocess.run(cmd + ["--compile"] * args.compile, capture_output=True, text=True, check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{'records/s':<20}" + "".join(f"{n:>14}" for n in BACKENDS))
    for key in results[BACKENDS[0]]:
        print(f"{key:<20}" + "".join(f"{results[n][key]:>14,.0f}" for n in BACKENDS))


if __name__ == "__main__":
    main()
