"""TensorFlow data-parallel backend: ``tf.distribute.MultiWorkerMirroredStrategy``.

The :class:`TensorflowBackend` with its model, optimizer and train step made
collective. One process per rank, each one MWMS *worker* (one local CPU
replica); ``connect`` writes ``TF_CONFIG`` (the cluster: every rank's
``host:port``; this task's index = the rank) and creates the strategy. That must
happen before TensorFlow runs any op, so the coordinator connects before a
model is built or restored. Variables are created under the strategy's scope
(mirrored, initialised from worker 0), and the compiled train step runs inside
``strategy.run``: Keras 3's optimizer *sums* the gradients over the replicas
(``TFOptimizer._all_reduce_sum_gradients``) before applying them.

Uneven ranks: every step first all-reduces the number of training rows N;
nobody steps when it is 0. Otherwise each rank weights its rows by 1/N (an empty
rank runs the step on a zero-row batch: zero gradients), so the summed gradient
is the gradient of the mean loss over the union batch, identical everywhere.

Collectives over CPU tensors inside a ``tf.function`` need the value placed on
the worker's device first (``tf.identity`` under ``tf.device``): without it
TF 2.21 raises "destinations can not be empty" at trace time. ``compile: true``
(XLA) is not used here: the collectives run in plain graphs.
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

from tensorstream.backends.frameworks import quiet_framework_import

with quiet_framework_import():
    import tensorflow as tf

from tensorstream.backends import init as common  # noqa: E402
from tensorstream.backends.tensorflow import TensorflowBackend  # noqa: E402
from tensorstream.spec import ModelSpec  # noqa: E402

log = logging.getLogger(__name__)

_SUM = tf.distribute.ReduceOp.SUM


class TensorflowMultiWorkerBackend(TensorflowBackend):
    """:class:`TensorflowBackend` under a ``MultiWorkerMirroredStrategy``."""

    name = "tensorflow"  # same model, same state names: its checkpoints load into TensorflowBackend
    engine = "tensorflow"
    #: steps are collective (every rank in lock-step): no per-record loop, no per-row retry
    sequential = False

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        #: synchronised train steps taken (empty ones included); equal on every rank
        self.train_steps = 0
        self._strategy: tf.distribute.Strategy | None = None

    # -- the cluster ---------------------------------------------------------
    def connect(self, *, rank: int, world_size: int, workers: list[str], timeout_s: float,
                threads: int | None = None, **_: object) -> None:
        """Start this rank's collective server and join the cluster of ``workers``."""
        if len(workers) != world_size:
            raise ValueError(f"{len(workers)} worker addresses for world size {world_size}")
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": list(workers)},
                                              "task": {"type": "worker", "index": rank}})
        if threads is not None:  # must precede the strategy: it initialises TF's runtime
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:
                pass
        impl = tf.distribute.experimental.CommunicationImplementation.RING  # CPU: ring all-reduce over gRPC
        opts = tf.distribute.experimental.CommunicationOptions(implementation=impl, timeout_seconds=timeout_s)
        self._strategy = strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=opts)
        if strategy.num_replicas_in_sync != world_size:
            raise RuntimeError(f"MultiWorkerMirroredStrategy has {strategy.num_replicas_in_sync} replicas, "
                               f"expected {world_size} (one per rank)")
        self.rank, self.world_size = rank, world_size
        device = strategy.extended.worker_devices[0]

        def reduce(v: tf.Tensor) -> tf.Tensor:
            def replica(v: tf.Tensor) -> tf.Tensor:
                with tf.device(device):
                    v = tf.identity(v)
                return tf.distribute.get_replica_context().all_reduce(_SUM, v)

            return strategy.experimental_local_results(strategy.run(replica, args=(v,)))[0]

        self._reduce = {
            np.dtype(np.int64): tf.function(reduce, input_signature=[tf.TensorSpec([None], tf.int64)])
            .get_concrete_function(),
            np.dtype(np.float64): tf.function(reduce, input_signature=[tf.TensorSpec([None], tf.float64)])
            .get_concrete_function(),
        }
        log.info("tf.distribute MultiWorkerMirroredStrategy: rank %d of %d, workers %s", rank, world_size, workers)

    def all_reduce(self, a: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks (int64 or float64 arrays; every rank gets the result)."""
        a = np.asarray(a)
        fn = self._reduce.get(a.dtype)
        if fn is None:
            raise TypeError(f"all_reduce takes int64 or float64 arrays, got {a.dtype}")
        return fn(tf.constant(a.reshape(-1))).numpy().reshape(a.shape)

    def close(self) -> None:
        pass  # MWMS has no shutdown: its server lives as long as the process

    # -- model ---------------------------------------------------------------
    def build(self, model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        if self._strategy is None:
            raise RuntimeError("connect() before build(): the strategy must exist before TensorFlow runs ops")
        if model.compile:
            log.warning("model.compile (XLA) is ignored under MultiWorkerMirroredStrategy")
            model = model.model_copy(update={"compile": False})
        # Collective: variables created here are mirrored and initialised from worker 0.
        with self._strategy.scope():
            super().build(model, n_features, n_outputs, task)

    def _train(self, x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        # Traced once by TensorflowBackend.build (inside the scope); ``w`` is 1/N per real row.
        def replica(x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                out = self._net(x, training=True)
                weighted = tf.reduce_sum(self._per_row(out, y) * w)  # this rank's share of the union-batch mean
                total = weighted
                if self._net.losses:  # regularizers: each rank adds 1/W of them to the sum
                    total = weighted + tf.add_n(self._net.losses) / float(self.world_size)
            self._opt.apply(tape.gradient(total, self._vars), self._vars)  # sums gradients over ranks
            return weighted

        assert self._strategy is not None
        out = self._strategy.run(replica, args=(x, y, w))
        return self._strategy.experimental_local_results(out)[0]

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        return self._step(x, y)

    def train_guarded(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        # No finiteness guard across ranks yet (the replica step applies the optimizer itself).
        return self.train_step(x, y), None

    def empty_step(self) -> None:
        """Join this step's all-reduces with no rows (a rank that has nothing to learn)."""
        y_dtype = np.int64 if self._task == "classification" else np.float32
        self._step(np.zeros((0, self._n_features), np.float32), np.zeros(0, y_dtype))

    def _step(self, x: np.ndarray, y: np.ndarray) -> float:
        n = len(x)
        total = int(self.all_reduce(np.array([n], dtype=np.int64))[0])
        self.train_steps += 1
        if total == 0:
            return math.nan  # no rank has rows: no rank steps
        w = np.full(n, 1.0 / total, np.float32)
        weighted = float(self._train_cf(tf.convert_to_tensor(x), tf.convert_to_tensor(y), tf.convert_to_tensor(w)))
        return weighted * total / n if n else math.nan
