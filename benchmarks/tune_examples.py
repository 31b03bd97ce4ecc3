"""Prequential accuracy of the example specs on River's datasets, in memory.

    PYTHONPATH=src python benchmarks/tune_examples.py phishing torch
    PYTHONPATH=src python benchmarks/tune_examples.py bananas tensorflow --set batch.max_size=4 model.optimizer.lr=0.01

``--set key.path=value`` overrides spec fields (YAML-parsed values) to try
hyperparameters without editing the YAML; ``--grid`` takes the same form with
semicolon-separated values and runs every combination. ``replay=K`` and
``replay_buffer=N`` set the OnlineLearner's experience replay (not a spec field
yet), e.g. ``--set replay=32``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import yaml

from tensorstream.backends import make_backend
from tensorstream.learn import OnlineLearner
from tensorstream.spec import parse_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "tensorstream" / "examples"
#: OnlineLearner options the examples need that the spec cannot carry yet
LEARNER_OPTIONS = {"bananas": {"replay": 32, "replay_buffer": 1000}}


def dataset(name: str, n: int | None = None) -> list[dict[str, Any]]:
    """River's dataset as JSON-like records ``{**x, "y": y}`` (string keys)."""
    from river import datasets
    from river.datasets import synth

    if name == "phishing":
        stream = datasets.Phishing()
    elif name == "bananas":
        stream = datasets.Bananas()
    elif name == "agrawal_drift":
        stream = synth.ConceptDriftStream(
            synth.Agrawal(classification_function=0, seed=42),
            synth.Agrawal(classification_function=2, seed=42),
            position=5000, width=500, seed=42,
        )
        n = n or 10_000
    elif name == "sea_drift":
        stream = synth.ConceptDriftStream(
            synth.SEA(variant=0, seed=42), synth.SEA(variant=3, seed=42), position=5000, width=500, seed=42
        )
        n = n or 10_000
    else:
        raise SystemExit(f"unknown dataset {name}")
    out = []
    for i, (x, y) in enumerate(stream):
        if n is not None and i >= n:
            break
        out.append({**{str(k): v for k, v in x.items()}, "y": y})
    return out


def run(spec_data: dict[str, Any], backend: str, records: list[dict[str, Any]]) -> tuple[dict[str, float], float]:
    data = dict(spec_data)
    # replay / replay_buffer are OnlineLearner options (not spec fields yet)
    kwargs = {k: data.pop(k) for k in ("replay", "replay_buffer") if k in data}
    spec = parse_spec({**data, "backend": backend})
    learner = OnlineLearner(spec, make_backend(backend), **kwargs)
    size = spec.batch.max_size
    t0 = time.perf_counter()
    for i in range(0, len(records), size):
        learner.process(records[i : i + size])
    return learner.snapshot(), time.perf_counter() - t0


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[last] = value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("backends", nargs="*", default=["torch", "tensorflow"])
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--grid", nargs="*", default=[])
    args = ap.parse_args()
    base = yaml.safe_load((EXAMPLES / f"{args.name}.yaml").read_text())
    base.update(LEARNER_OPTIONS.get(args.name, {}))
    for kv in args.set:
        k, _, v = kv.partition("=")
        _set(base, k, yaml.safe_load(v))
    grid = [(k, [yaml.safe_load(x) for x in v.split(";")]) for k, _, v in (g.partition("=") for g in args.grid)]
    records = dataset(args.name)
    for combo in itertools.product(*(vals for _, vals in grid)):
        data = yaml.safe_load(yaml.safe_dump(base))
        for (k, _), v in zip(grid, combo, strict=True):
            _set(data, k, v)
        for backend in args.backends:
            snap, secs = run(data, backend, records)
            label = " ".join(f"{k}={v}" for (k, _), v in zip(grid, combo, strict=True))
            print(
                f"{args.name:14s} {backend:10s} {label} acc={snap['accuracy']:.4f} "
                f"acc_window={snap['accuracy_window']:.4f} n={int(snap['n_scored'])} {secs:.1f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
