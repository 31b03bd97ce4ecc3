"""Training-loop bridges: samples/s of a small training loop fed from Kafka vs from memory.

Run (repository root, package installed)::

    python benchmarks/bench_bridges.py                      # torch + tensorflow, batch 64 and 256
    python benchmarks/bench_bridges.py --records 50000 --batch 64 --skip-tf
    python benchmarks/bench_bridges.py --tfio-python /tmp/tfio-venv/bin/python   # + tensorflow-io

One embedded broker (Tansu over TCP) holds the same synthetic records in three
encodings: JSON (decoded through ``FeatureSpec``/``LabelSpec``, the pipeline's
path), tensor frames (``codec="frame"``, zero-copy) and raw float32 bytes (for
tensorflow-io, which can only ``tf.io.decode_raw``). Each bridge feeds the same
small model (16 -> 64 -> 64 -> 2 MLP, Adam) as the in-memory baseline, on the
same batches; the ratio is bridge samples/s over in-memory samples/s.

Samples/s exclude the start (worker fork, reader start-up, first batch:
about a second; "with start-up" includes it). On a shared machine wall-clock
figures swing with other load, so each figure is the best of ``ROUNDS``
alternating runs, and the CPU time of the training process per sample
(bridge vs in memory) is printed too: it is what the bridge costs the training
process whatever else runs (decoding in DataLoader workers is not in it). torch loops commit offsets after every
step (``dataset.commit``), the Keras ones through ``CommitOffsetsCallback``
(every step), so the cost of exactly-once bookkeeping is in the figures.

tensorflow-io (``--tfio-python``) runs in a separate virtualenv, because it has
no release for TensorFlow >= 2.17: ``tensorflow-io==0.37.1`` needs
``tensorflow==2.16.*``. Its ``KafkaGroupIODataset`` joins a consumer group
(``subscribe``), so its start includes the embedded broker's join delay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from tensorstream.codecs import encode_frame  # noqa: E402
from tensorstream.kafka import EmbeddedBroker, KafkaAdmin, KafkaConfig, KafkaSink  # noqa: E402
from tensorstream.spec import FeatureSpec, LabelSpec  # noqa: E402

N_FEATURES = 16
HIDDEN = 64
PARTITIONS = 2
ROUNDS = 3  # each figure: best of ROUNDS runs, bridge and in-memory runs alternating
COMMIT_EVERY = 100  # steps between offset commits (each step's offsets are marked)


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    w = rng.normal(size=N_FEATURES).astype(np.float32)
    y = (x @ w > 0).astype(np.int64)
    return x, y


def produce(cfg: KafkaConfig, x: np.ndarray, y: np.ndarray) -> dict[str, str]:
    topics = {enc: f"bench-{enc}-{uuid.uuid4().hex[:6]}" for enc in ("json", "frame", "raw")}
    admin = KafkaAdmin(cfg)
    for t in topics.values():
        admin.ensure_topic(t, PARTITIONS)
    names = [f"f{i:02d}" for i in range(N_FEATURES)]
    t0 = time.perf_counter()
    with KafkaSink(cfg, **{"linger.ms": 20, "batch.num.messages": 10000}) as sink:
        for i, (xi, yi) in enumerate(zip(x, y)):
            p = i % PARTITIONS
            sink.produce(topics["json"], orjson.dumps({**dict(zip(names, xi.tolist())), "y": int(yi)}), partition=p)
            sink.produce(topics["frame"], encode_frame({"x": xi, "y": np.int64(yi)}), partition=p)
            sink.produce(topics["raw"], np.append(xi, np.float32(yi)).tobytes(), partition=p)
            if i % 5000 == 0:
                sink.poll(0)
        sink.flush(120)
    print(f"produced {len(x):,} records x 3 encodings in {time.perf_counter() - t0:.1f}s", flush=True)
    return topics


def row(bridge: str, enc: str, batch: int, workers: str, runs: list[tuple[float, ...]]) -> dict:
    """``runs``, one per round: (bridge steady samples/s, bridge total samples/s, in-memory samples/s,
    bridge CPU us/sample, in-memory CPU us/sample), CPU of the training process only."""
    rate = max(r[0] for r in runs)
    total = max(r[1] for r in runs)
    base = max(r[2] for r in runs)
    pair = sorted(r[0] / r[2] for r in runs)[len(runs) // 2]
    cpu = min(r[3] for r in runs)
    cpu_base = min(r[4] for r in runs)
    r = {"bridge": bridge, "codec": enc, "batch": batch, "workers": workers, "samples_per_s": round(rate),
         "total_samples_per_s": round(total), "in_memory_samples_per_s": round(base),
         "ratio": round(rate / base, 3), "ratio_total": round(total / base, 3), "median_pair_ratio": round(pair, 3),
         "cpu_us_per_sample": round(cpu, 2), "in_memory_cpu_us_per_sample": round(cpu_base, 2),
         "cpu_ratio": round(cpu_base / cpu, 3)}
    print(f"{bridge:<10} {enc:<5} batch {batch:>4} workers {workers:>2}: {rate:>8,.0f} samples/s "
          f"({total:>8,.0f} with start-up) | in memory {base:>8,.0f} | ratio {rate / base:.2f}x "
          f"(median pair {pair:.2f}x, with start-up {total / base:.2f}x) | training-process CPU "
          f"{cpu:.1f} vs {cpu_base:.1f} us/sample = {cpu_base / cpu:.2f}x", flush=True)
    return r


# --------------------------------------------------------------------------- torch


def bench_torch(cfg: KafkaConfig, topics: dict[str, str], x: np.ndarray, y: np.ndarray, batches: list[int],
                workers: list[int]) -> list[dict]:
    import torch
    from torch.utils.data import DataLoader

    from tensorstream.torch import KafkaIterableDataset

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, HIDDEN), torch.nn.ReLU(),
                                    torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 2))
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def loop(batches_iter, committer=None) -> tuple[float, float, int, float]:
        model, opt = fresh()
        t_start = time.perf_counter()
        t_first = c_first = None
        n = n_first = steps = 0
        for xb, yb, offsets in batches_iter:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if committer is not None:
                committer.mark(offsets)  # this step is done
                if steps % COMMIT_EVERY == 0:
                    committer.commit()
            n += len(xb)
            if t_first is None:
                t_first, c_first, n_first = time.perf_counter(), time.process_time(), n
        if committer is not None:
            committer.commit()
        t_end, c_end = time.perf_counter(), time.process_time()
        return (n - n_first) / (t_end - t_first), n / (t_end - t_start), n, (c_end - c_first) / (n - n_first) * 1e6

    out = []
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    spec = dict(features=FeatureSpec(numeric=["*"]), label=LabelSpec(field="y", classes=[0, 1]))
    for bs in batches:
        mem = [(xt[i:i + bs], yt[i:i + bs], None) for i in range(0, len(x), bs)]
        for enc in ("json", "frame"):
            for w in workers:
                runs = []
                for _ in range(ROUNDS):
                    base, _, _, cpu_base = loop(iter(mem))
                    ds = KafkaIterableDataset(topics[enc], config=cfg, group_id=f"bench-{uuid.uuid4().hex[:6]}",
                                              batch_size=bs, codec=enc, start="earliest",
                                              **(spec if enc == "json" else {}))
                    rate, total, n, cpu = loop(DataLoader(ds, batch_size=None, num_workers=w), ds.committer)
                    assert n == len(x), (n, len(x))
                    ds.close()
                    runs.append((rate, total, base, cpu, cpu_base))
                out.append(row("torch", enc, bs, str(w), runs))
    return out


def bench_commit(cfg: KafkaConfig, topic: str, n: int = 300) -> float:
    """Milliseconds per synchronous offset commit (what committing after *every* step adds)."""
    from tensorstream.bridges.common import OffsetCommitter

    with OffsetCommitter(cfg, f"bench-{uuid.uuid4().hex[:6]}", [topic]) as c:
        c.commit(np.array([[0, 0, 0, 1]]))
        t0 = time.perf_counter()
        for i in range(n):
            c.commit(np.array([[0, 0, i + 1, i + 2]]))
        ms = (time.perf_counter() - t0) / n * 1e3
    print(f"one synchronous offset commit: {ms:.2f} ms (commit every step = this much per step)", flush=True)
    return ms


# --------------------------------------------------------------------------- tensorflow


def bench_tf(cfg: KafkaConfig, topics: dict[str, str], x: np.ndarray, y: np.ndarray, batches: list[int]) -> list[dict]:
    try:
        import torch._dynamo  # noqa: F401  (import before TensorFlow: triton after TF segfaults here)
    except ImportError:
        pass
    import keras

    from tensorstream.tensorflow import CommitOffsetsCallback, kafka_dataset

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t_start, self.t_first = time.perf_counter(), None

        def on_train_batch_end(self, batch, logs=None):
            if self.t_first is None:
                self.t_first, self.c_first = time.perf_counter(), time.process_time()

        def on_train_end(self, logs=None):
            self.t_end, self.c_end = time.perf_counter(), time.process_time()

    def fit(data, bs: int, callbacks=()) -> tuple[float, float, float]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(HIDDEN, activation="relu"),
                                  keras.layers.Dense(HIDDEN, activation="relu"), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        clock = Clock()
        if isinstance(data, tuple):
            model.fit(*data, batch_size=bs, epochs=1, shuffle=False, verbose=0, callbacks=[clock, *callbacks])
        else:
            model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[clock, *callbacks])
        n = len(x)
        first = min(bs, n)
        return ((n - first) / (clock.t_end - clock.t_first), n / (clock.t_end - clock.t_start),
                (clock.c_end - clock.c_first) / (n - first) * 1e6)

    out = []
    spec = dict(features=FeatureSpec(numeric=["*"]), label=LabelSpec(field="y", classes=[0, 1]))
    for bs in batches:
        for enc in ("json", "frame"):
            runs = []
            for _ in range(ROUNDS):
                base, _, cpu_base = fit((x, y), bs)
                ds = kafka_dataset(topics[enc], config=cfg, group_id=f"bench-{uuid.uuid4().hex[:6]}",
                                   batch_size=bs, codec=enc, start="earliest", **(spec if enc == "json" else {}))
                rate, total, cpu = fit(ds, bs, callbacks=[CommitOffsetsCallback(ds, commit_freq=COMMIT_EVERY)])
                runs.append((rate, total, base, cpu, cpu_base))
            out.append(row("tensorflow", enc, bs, "-", runs))
    return out


# --------------------------------------------------------------------------- tensorflow-io

TFIO_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np, tensorflow as tf, tensorflow_io as tfio, keras
    servers, topic = sys.argv[1], sys.argv[2]
    n, bs, nf, hidden = (int(a) for a in sys.argv[3:7])

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None): self.t_start, self.t_first = time.perf_counter(), None
        def on_train_batch_end(self, batch, logs=None):
            if self.t_first is None: self.t_first = time.perf_counter()
        def on_train_end(self, logs=None): self.t_end = time.perf_counter()

    def fit(data):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((nf,)), keras.layers.Dense(hidden, activation="relu"),
                                  keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        clock = Clock()
        if isinstance(data, tuple):
            model.fit(*data, batch_size=bs, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
        else:
            model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
        return (n - bs) / (clock.t_end - clock.t_first), n / (clock.t_end - clock.t_start)

    probe = tfio.experimental.streaming.KafkaGroupIODataset(
        topics=[topic], group_id="bench-tfio-probe", servers=servers, stream_timeout=0, message_poll_timeout=5000,
        configuration=["session.timeout.ms=6000", "auto.offset.reset=earliest"])
    if not any(True for _ in probe.take(1)):
        print(json.dumps({"tf": tf.__version__, "tfio": tfio.__version__,
                          "error": "KafkaGroupIODataset read no record (see the librdkafka log above)"}))
        sys.exit(0)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, nf)).astype(np.float32)
    y = (x @ rng.normal(size=nf).astype(np.float32) > 0).astype(np.int64)
    base = max(fit((x, y))[0] for _ in range(2))

    def decode(message, key):
        v = tf.io.decode_raw(message, tf.float32)
        return v[:nf], tf.cast(v[nf], tf.int64)

    ds = tfio.experimental.streaming.KafkaGroupIODataset(
        topics=[topic], group_id="bench-tfio-%d" % bs, servers=servers, stream_timeout=0, message_poll_timeout=2000,
        configuration=["session.timeout.ms=6000", "max.poll.interval.ms=10000", "auto.offset.reset=earliest",
                       "enable.auto.commit=true"])
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(bs).prefetch(4)
    rate, total = fit(ds)
    print(json.dumps({"tf": tf.__version__, "tfio": tfio.__version__, "rate": rate, "total": total, "base": base}))
''')


def bench_tfio(python: str, cfg: KafkaConfig, topics: dict[str, str], n: int, batches: list[int]) -> list[dict]:
    out = []
    for bs in batches:
        proc = subprocess.run([python, "-c", TFIO_SCRIPT, cfg.bootstrap_servers, topics["raw"], str(n), str(bs),
                               str(N_FEATURES), str(HIDDEN)], capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        r = json.loads(lines[-1]) if lines else {}
        if proc.returncode != 0 or not lines or "error" in r:
            fails = sorted({ln.split("]: ", 2)[-1] for ln in proc.stderr.splitlines() if "FAIL" in ln})
            print(f"tensorflow-io {r.get('tfio', '?')} on tensorflow {r.get('tf', '?')} could not be measured: "
                  f"{r.get('error', f'exit code {proc.returncode}')}; its librdkafka said: {fails[:2]}", flush=True)
            return out
        print(f"(tensorflow-io {r['tfio']} on tensorflow {r['tf']}; in-memory baseline measured in that venv; "
              f"it commits what was read, by auto-commit)")
        out.append(row("tfio", "raw", bs, "-", [(r["rate"], r["total"], r["base"], float("nan"), float("nan"))]))
    return out


def main() -> None:
    global HIDDEN
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader num_workers to try")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-tf", action="store_true")
    ap.add_argument("--tfio-python", help="python of a virtualenv with tensorflow-io (e.g. 0.37.1 + TF 2.16)")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="width of the MLP's two hidden layers (cost per sample)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for torch and TensorFlow, in-memory and bridge runs alike (default 1: "
                         "a tiny model gains nothing from more, and spinning op threads would take the cores "
                         "the broker, the Kafka client and the decoder need)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    HIDDEN = args.hidden
    if not args.skip_torch:
        import torch

        torch.set_num_threads(args.threads)
    if not args.skip_tf:
        try:
            import torch._dynamo  # noqa: F401  (before TensorFlow: triton after TF segfaults here)
        except ImportError:
            pass
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)

    x, y = make_data(args.records)
    rows: list[dict] = []
    print(f"{os.cpu_count()} CPU cores, {args.threads} op thread(s); {args.records:,} records of {N_FEATURES} "
          f"float32 features in {PARTITIONS} partitions; model {N_FEATURES}-{HIDDEN}-{HIDDEN}-2 MLP, Adam; "
          f"offsets marked every step, committed every {COMMIT_EVERY}; best of {ROUNDS} alternating runs", flush=True)
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig.local(broker.bootstrap_servers)
        topics = produce(cfg, x, y)
        bench_commit(cfg, topics["json"])
        if not args.skip_torch:
            rows += bench_torch(cfg, topics, x, y, args.batch, args.workers)
        if not args.skip_tf:
            rows += bench_tf(cfg, topics, x, y, args.batch)
        if args.tfio_python:
            rows += bench_tfio(args.tfio_python, cfg, topics, args.records, args.batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
