"""Peers: deep-river's Classifier and River's logistic regression beside tensorstream.

    python benchmarks/bench_peers.py [--agrawal-records 100000] [--repeats 1] [--backends torch,tensorflow] [--batches 64]
                                     [--learning per_record,mini_batch] [--replay 3]

Two streams, the same records for everyone (written once to JSON-lines files):
River's Phishing (1,250 records) and a 100,000-record Agrawal stream
(``synth.Agrawal(classification_function=0, seed=42)``). Prequential
(test-then-train) accuracy and records/s of:

- **tensorstream, pipeline**: the example spec (``phishing`` / ``agrawal_drift``)
  through the embedded broker (``Pipeline``, ``train+infer``: predictions are
  written to a topic), steady state (group join and first batch excluded);
- **tensorstream, in memory**: ``OnlineLearner.process`` over the same records
  in the spec's batches;
- both again with each ``--batches`` micro-batch size (default 64), beside the
  example spec's batch, in the spec's ``learn.learning`` (default per-record:
  the accuracy of batch 1 at any batch size) and in each ``--learning`` mode
  given (``mini_batch``: the old throughput/accuracy trade of batching), and
  with each ``--replay`` k (``learn.replay``: each per-record step also
  learns k recently learned records: more accuracy per record for little time);
- **River** ``StandardScaler | LogisticRegression`` (``learn_one``/``predict_one``),
  project venv (river 0.26.1);
- **deep-river** 0.3.4 ``Classifier`` with the same MLP as our spec (hidden
  layers, ReLU, Adam, lr 0.01, cross-entropy), one record at a time.

Features are alike for all: numeric fields standardised (running), Agrawal's
categorical codes (elevel, car, zipcode) one-hot. deep-river pins torch<2.6
and river<0.26, so it runs in its own throwaway venv under /tmp, built by this
script: ``pip install --no-deps deep-river==0.3.4``, ``river==0.25.*`` and its
small dependencies from the package index; torch is NOT downloaded: a ``.pth``
file points at a folder of symlinks to the project venv's torch 2.14.1 (and the
packages torch imports), so deep-river runs on the very torch tensorstream
uses. Before measuring, deep-river's own README Classifier example is run with
that torch; its outcome is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

DEEP_RIVER = "deep-river==0.3.4"
RIVER_FOR_DEEP_RIVER = "river==0.25.*"
#: deep-river's other requirements (its METADATA), minus torch (linked) and torchviz (only for .draw()),
#: plus pytest: deep_river/utils/estimator_checks.py imports it at ``import deep_river`` without declaring it
DEEP_RIVER_DEPS = ("pandas<3,>=2.2", "scikit-learn<2,>=1.5.1", "sortedcontainers>=2.4.0", "tqdm~=4.66.5",
                   "numpy<3,>=2.3.4", "pytest")
#: what ``import torch`` needs from the project venv (top-level names in site-packages)
TORCH_LINKS = ("torch", "torchgen", "functorch", "nvidia", "cuda", "triton", "sympy", "mpmath", "networkx", "jinja2",
               "markupsafe", "filelock", "fsspec", "typing_extensions.py")
VENV = Path(tempfile.gettempdir()) / "tensorstream-deep-river-venv"

AGRAWAL_NUMERIC = ("salary", "commission", "age", "hvalue", "hyears", "loan")
AGRAWAL_CATEGORIES = {"elevel": range(5), "car": range(1, 21), "zipcode": range(9)}

# Runs inside the deep-river venv (and, for River, in the project venv): reads a JSON-lines file,
# test-then-train one record at a time, prints one JSON line.
PEER_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from river import compose, linear_model, metrics, preprocessing

    NUMERIC = %(numeric)r
    CATEGORIES = %(categories)r

    def onehot(x):
        return {f"{k}={v}": float(x[k] == v) for k, vals in CATEGORIES.items() for v in vals}

    def model(peer, stream, n_features, hidden):
        if stream == "agrawal":
            prep = compose.TransformerUnion(compose.Select(*NUMERIC) | preprocessing.StandardScaler(),
                                            compose.FuncTransformer(onehot))
        else:
            prep = preprocessing.StandardScaler()
        if peer == "river":
            return prep | linear_model.LogisticRegression()
        import torch
        from torch import nn
        from deep_river.classification import Classifier

        torch.manual_seed(0)
        torch.set_num_threads(1)

        class MLP(nn.Module):
            def __init__(self, n_features):
                super().__init__()
                widths = [n_features, *hidden]
                layers = []
                for a, b in zip(widths[:-1], widths[1:]):
                    layers += [nn.Linear(a, b), nn.ReLU()]
                self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 2))

            def forward(self, x):
                return self.net(x)

        return prep | Classifier(module=MLP(n_features), loss_fn="cross_entropy", optimizer_fn="adam", lr=0.01,
                                 is_class_incremental=True, seed=0)

    def main(peer, stream, path, n_features, hidden):
        records = [json.loads(line) for line in open(path)]
        m = model(peer, stream, n_features, hidden)
        acc = metrics.Accuracy()
        t = time.perf_counter()
        for r in records:
            y = r.pop("y")
            try:
                p = m.predict_one(r)
            except Exception:  # nothing learned yet
                p = None
            acc.update(y, p)
            m.learn_one(r, y)
        secs = time.perf_counter() - t
        print(json.dumps({"records": len(records), "seconds": secs, "records_per_s": len(records) / secs,
                          "accuracy": acc.get()}))

    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]))
''') % {"numeric": AGRAWAL_NUMERIC, "categories": {k: list(v) for k, v in AGRAWAL_CATEGORIES.items()}}

# deep-river 0.3.4's README "Classification" example, verbatim but for the doctest prompts.
README_EXAMPLE = textwrap.dedent('''
    import random, numpy as np
    from river import metrics, datasets, preprocessing, compose
    from deep_river.classification import Classifier
    from torch import nn, manual_seed
    _ = manual_seed(42); random.seed(42); np.random.seed(42)
    first_x, _ = next(iter(datasets.Phishing()))
    n_features = len(first_x)
    class MyModule(nn.Module):
        def __init__(self, n_features):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(n_features, 16),
                nn.ReLU(),
                nn.Linear(16, 2)
            )
        def forward(self, x):
            return self.net(x)
    model = compose.Pipeline(
        preprocessing.StandardScaler(),
        Classifier(
            module=MyModule(n_features),
            loss_fn='cross_entropy',
            optimizer_fn='adam',
            lr=1e-3,
            is_class_incremental=True
        )
    )
    metric = metrics.Accuracy()
    for i, (x, y) in enumerate(datasets.Phishing().take(200)):
        if i > 0:
            y_pred = model.predict_one(x)
            metric.update(y, y_pred)
        model.learn_one(x, y)
    assert 0.5 <= metric.get() <= 1.0
    print(f"Accuracy: {metric.get():.4f}")
    import torch, river, deep_river
    print(f"torch {torch.__version__} from {torch.__file__}; river {river.__version__}; deep-river {deep_river.__version__}")
''')


def _pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args], check=True)


def setup_venv(venv: Path = VENV) -> tuple[Path, list[str]]:
    """A clean venv with deep-river, river 0.25 and the project's torch linked in; returns (python, notes)."""
    py = venv / "bin" / "python"
    notes = []
    ready = py.exists() and subprocess.run([str(py), "-c", "import deep_river, torch"],
                                           capture_output=True).returncode == 0
    if not ready:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(py, RIVER_FOR_DEEP_RIVER, *DEEP_RIVER_DEPS)  # no torch among these requirements
        _pip(py, "--no-deps", DEEP_RIVER)
        project_site = Path(sysconfig.get_paths()["purelib"])
        links = venv / "project-torch"
        links.mkdir(exist_ok=True)
        for name in TORCH_LINKS:
            src = project_site / name
            if src.exists():
                (links / name).unlink(missing_ok=True)
                (links / name).symlink_to(src)
        for dist in project_site.glob("torch-*.dist-info"):  # so importlib.metadata sees torch's version
            (links / dist.name).unlink(missing_ok=True)
            (links / dist.name).symlink_to(dist)
        site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        # appended to sys.path after the venv's own site-packages: the venv's river/numpy win
        (site / "project_torch.pth").write_text(f"{links}\n")
        notes.append(f"created {venv}: {DEEP_RIVER} (--no-deps), {RIVER_FOR_DEEP_RIVER}, {', '.join(DEEP_RIVER_DEPS)}; "
                     f"torch linked from {project_site} via project_torch.pth (nothing downloaded for torch)")
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    notes.append("deep-river venv: " + ", ".join(line for line in freeze.split() if line.lower().split("==")[0] in (
        "deep-river", "deep_river", "river", "numpy", "pandas", "scikit-learn", "torch")))
    return py, notes


def readme_check(py: Path) -> dict[str, Any]:
    proc = subprocess.run([str(py), "-c", README_EXAMPLE], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"ok": proc.returncode == 0, "stdout": proc.stdout.strip(),
            "stderr": proc.stderr.strip()[-2000:] if proc.returncode else ""}


def write_streams(work: Path, agrawal_records: int) -> dict[str, Path]:
    from tensorstream.codecs import encode_json
    from tensorstream.data.datasets import open_source

    paths = {"phishing": work / "phishing.jsonl", "agrawal": work / f"agrawal-{agrawal_records}.jsonl"}
    sources = {"phishing": ("river:Phishing", None),
               "agrawal": ("river:synth.Agrawal?seed=42&classification_function=0", agrawal_records)}
    for key, (src, n) in sources.items():
        with paths[key].open("wb") as f:
            for r in open_source(src, limit=n):
                f.write(encode_json(r) + b"\n")
    return paths


def _spec(stream: str, backend: str, topic: str, state_dir: str, batch: int | None = None,
          learning: str | None = None, replay: int | None = None) -> Any:
    from tensorstream.examples import example_spec

    base = example_spec("phishing.yaml" if stream == "phishing" else "agrawal_drift.yaml", backend=backend)
    if batch is not None:
        base = base.model_copy(update={"batch": base.batch.model_copy(update={"max_size": batch})})
    if learning is not None:
        base = base.model_copy(update={"learn": base.learn.model_copy(update={"learning": learning})})
    if replay is not None:
        base = base.model_copy(update={"learn": base.learn.model_copy(update={"replay": replay})})
    return base.model_copy(update={
        "name": f"peers-{stream}-{backend}-{uuid.uuid4().hex[:6]}", "state_dir": state_dir,
        "source": base.source.model_copy(update={"topic": topic}),
        "sink": base.sink.model_copy(update={"topic": f"{topic}.pred.{uuid.uuid4().hex[:6]}"}),
        "model": base.model.model_copy(update={"threads": 1}),
    })


def child_ours(backend: str, stream: str, path: str, bootstrap: str, topic: str,
               batch: int | None = None, learning: str | None = None, replay: int | None = None) -> dict[str, Any]:
    """Our pipeline through the broker and our in-memory learner, same records, one process."""
    import orjson

    from tensorstream.backends import make_backend
    from tensorstream.bench.timed import TimedPipeline
    from tensorstream.kafka import KafkaConfig
    from tensorstream.learn import OnlineLearner

    sd = tempfile.mkdtemp(prefix="tensorstream-peers-")
    records = [orjson.loads(line) for line in open(path, "rb")]
    cfg = KafkaConfig.local(bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=300)
    pipe = TimedPipeline(_spec(stream, backend, topic, sd, batch, learning, replay), cfg)
    res = pipe.run(until_end=True, timeout=1800)
    spec = _spec(stream, backend, topic, sd, batch, learning, replay)
    learner = OnlineLearner(spec, make_backend(backend))
    b = spec.batch.max_size
    learner.process(records[:b])
    t = time.perf_counter()
    for i in range(b, len(records), b):
        learner.process(records[i : i + b])
    mem_rate = (len(records) - b) / (time.perf_counter() - t)
    return {"pipeline": {"records": res.records, "records_per_s": pipe.steady_records_per_s,
                         "records_per_s_incl_warmup": res.records_per_s, "accuracy": res.metrics.get("accuracy")},
            "memory": {"records": len(records), "records_per_s": mem_rate,
                       "accuracy": learner.snapshot().get("accuracy")}}


def _run_peer(py: Path, peer: str, stream: str, path: Path, n_features: int, hidden: list[int]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PEER_SCRIPT)
    proc = subprocess.run([str(py), f.name, peer, stream, str(path), str(n_features), json.dumps(hidden)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.unlink(f.name)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agrawal-records", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats (accuracy is deterministic)")
    ap.add_argument("--backends", default="torch,tensorflow")
    ap.add_argument("--skip-deep-river", action="store_true")
    ap.add_argument("--batches", default="64",
                    help="more micro-batch sizes for our rows, beside the example spec's (comma-separated; '' for none)")
    ap.add_argument("--learning", default="",
                    help="also these learn.learning modes for the --batches rows (comma-separated, e.g. mini_batch)")
    ap.add_argument("--replay", default="", help="also the --batches rows with these learn.replay values (comma-separated)")
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-learning", help=argparse.SUPPRESS)
    ap.add_argument("--child-replay", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--stream", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_ours(args.child, args.stream, args.path, args.bootstrap, args.topic, args.batch,
                                    args.child_learning, args.child_replay)))
        return

    from tensorstream.bench.machine import describe, machine_info
    from tensorstream.kafka import EmbeddedBroker, KafkaConfig
    from tensorstream.data.produce import produce_records

    info = machine_info()
    print(f"machine: {describe(info)}")
    work = Path(tempfile.mkdtemp(prefix="tensorstream-peers-"))
    paths = write_streams(work, args.agrawal_records)
    shapes = {"phishing": (9, [32]), "agrawal": (6 + sum(len(v) for v in AGRAWAL_CATEGORIES.values()), [64, 32])}
    out: dict[str, Any] = {"machine": info, "streams": {}, "notes": []}
    dr_py = None
    if not args.skip_deep_river:
        dr_py, notes = setup_venv()
        out["notes"] += notes
        check = readme_check(dr_py)
        out["deep_river_readme_example"] = check
        print("deep-river README Classifier example with the project's torch: "
              + ("runs: " + check["stdout"].replace("\n", "; ") if check["ok"] else "FAILS:\n" + check["stderr"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig.local(broker.bootstrap_servers)
        for stream, path in paths.items():
            topic = f"peers-{stream}"
            produce_records(cfg, str(path), topic)
            rows: dict[str, list[dict[str, Any]]] = {}
            batches = [int(b) for b in args.batches.split(",") if b.strip()]
            modes = [m.strip() for m in args.learning.split(",") if m.strip()]
            replays = [int(k) for k in args.replay.split(",") if k.strip()]
            variants = [(None, None, None), *((b, None, None) for b in batches),
                        *((b, m, None) for b in batches for m in modes), *((b, None, k) for b in batches for k in replays)]
            for _ in range(args.repeats):
                for batch, learning, replay in variants:
                    for backend in args.backends.split(","):
                        cmd = [sys.executable, __file__, "--child", backend, "--stream", stream, "--path", str(path),
                               "--bootstrap", broker.bootstrap_servers, "--topic", topic,
                               *([] if batch is None else ["--batch", str(batch)]),
                               *([] if learning is None else ["--child-learning", learning]),
                               *([] if replay is None else ["--child-replay", str(replay)])]
                        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        if proc.returncode != 0:
                            raise SystemExit(f"{backend} child failed:\n{proc.stderr[-3000:]}")
                        r = json.loads(proc.stdout.strip().splitlines()[-1])
                        tag = backend if batch is None else f"{backend}, batch {batch}"
                        tag += (f", {learning}" if learning else "") + (f", replay {replay}" if replay else "")
                        rows.setdefault(f"tensorstream pipeline ({tag})", []).append(r["pipeline"])
                        rows.setdefault(f"tensorstream in memory ({tag})", []).append(r["memory"])
                rows.setdefault("River StandardScaler | LogisticRegression", []).append(
                    _run_peer(Path(sys.executable), "river", stream, path, *shapes[stream]))
                if dr_py is not None:
                    rows.setdefault("deep-river Classifier (same MLP)", []).append(
                        _run_peer(dr_py, "deep-river", stream, path, *shapes[stream]))
            out["streams"][stream] = rows
    base_key = f"tensorstream pipeline ({args.backends.split(',')[0]})"
    for stream, rows in out["streams"].items():
        n = next(iter(rows.values()))[0].get("records")
        print(f"\n{stream} ({n:,} records): prequential accuracy, records/s (median of {args.repeats}), "
              f"ratio to {base_key}")
        base = statistics.median(r["records_per_s"] for r in rows[base_key])
        dr = rows.get("deep-river Classifier (same MLP)") or []
        dr_rate = statistics.median(r["records_per_s"] for r in dr) if dr and not any("error" in r for r in dr) else None
        print(f"{'':<48}{'accuracy':>10}{'rec/s':>10}{'ratio':>8}{'x deep-river':>14}")
        for name, runs in rows.items():
            if any("error" in r for r in runs):
                print(f"{name:<48}  error: {runs[0].get('error', '')[-300:]}")
                continue
            rate = statistics.median(r["records_per_s"] for r in runs)
            vs = f"{rate / dr_rate:>13.1f}x" if dr_rate else ""
            print(f"{name:<48}{runs[0]['accuracy']:>10.4f}{rate:>10,.0f}{rate / base:>7.2f}x{vs}")
    for note in out["notes"]:
        print(note)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
