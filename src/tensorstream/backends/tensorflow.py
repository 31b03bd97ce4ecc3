"""TensorFlow backend: a Keras 3 model, steps compiled once with ``tf.function``.

``train_step`` and ``predict`` each have one fixed input signature with a free
batch dimension and are traced once, at build, whatever batch sizes the
stream brings (``tracing_count`` shows it). Under ``compile: true`` (XLA), which
compiles per concrete shape, batches are zero-padded up to the next power of
two and a row mask keeps padded rows out of the loss and the gradients: at
most ~log2(max batch) XLA programs.
"""

from __future__ import annotations

import os

# Quieter TensorFlow, and Keras 3 on TensorFlow; both only if the user chose nothing.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tensorstream.backends import init as common  # noqa: E402
from tensorstream.spec import ModelSpec  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"the tensorflow backend needs Keras running on TensorFlow, but KERAS_BACKEND is "
        f"{keras.backend.backend()!r}: unset it or set KERAS_BACKEND=tensorflow"
    )

#: Same value as the torch backend (torch's own default is 1e-8).
ADAM_EPSILON = 1e-7


def _builtin(model: ModelSpec, n_features: int, n_outputs: int) -> tuple[keras.Model, list[str]]:
    weights = common.initial_weights(model, n_features, n_outputs)
    last = len(weights) - 1
    layers = [
        keras.layers.Dense(k.shape[1], activation=model.activation if i < last else None)
        for i, (k, _) in enumerate(weights)
    ]
    net = keras.Sequential([keras.Input((n_features,)), *layers])
    names = []
    for i, (layer, (kernel, bias)) in enumerate(zip(layers, weights)):
        layer.kernel.assign(kernel)
        layer.bias.assign(bias)
        names += [f"{i}.kernel", f"{i}.bias"]
    return net, names  # Sequential's weights are [kernel0, bias0, kernel1, ...]


def _user_model(model: ModelSpec, n_features: int, n_outputs: int) -> tuple[keras.Model, list[str]]:
    # The user's initialisers and dropout draw from Keras' global seed (which also
    # seeds Python's and numpy's global generators: that is how Keras does it).
    keras.utils.set_random_seed(model.seed)
    net = common.load_factory(model.kind)(n_features=n_features, n_outputs=n_outputs)
    if not isinstance(net, keras.Model):
        raise TypeError(f"model kind {model.kind!r} must return a keras.Model, got {type(net).__name__}")
    out = net(np.zeros((2, n_features), np.float32), training=False)  # also builds subclassed models
    if tuple(out.shape) != (2, n_outputs):
        raise ValueError(f"model kind {model.kind!r}: output shape {tuple(out.shape)} for 2 rows, expected (2, {n_outputs})")
    # Positional names: Keras layer names carry process-global counters
    # ("dense_7"), so paths would differ between two builds of the same model.
    return net, [f"{i}.{v.name}" for i, v in enumerate(net.weights)]


class TensorflowBackend:
    """The :class:`~tensorstream.backends.base.Backend` for TensorFlow / Keras 3."""

    name = "tensorflow"

    def build(self, model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        self._loss = common.resolve_loss(model, task, n_outputs)
        self._task, self._n_features, self._n_outputs = task, n_features, n_outputs
        self._opt_spec = opt = model.optimizer
        if model.threads is not None:
            try:  # TF fixes its thread pools when it first runs an op: later calls cannot change them
                tf.config.threading.set_intra_op_parallelism_threads(model.threads)
                tf.config.threading.set_inter_op_parallelism_threads(model.threads)
            except RuntimeError:
                pass
        builder = _builtin if common.is_builtin(model) else _user_model
        self._net, names = builder(model, n_features, n_outputs)
        self._weights = list(zip(names, self._net.weights))
        self._vars = self._net.trainable_variables
        by_id = {id(v): n for n, v in self._weights}
        self._var_names = [by_id[id(v)] for v in self._vars]

        wd = opt.weight_decay or None  # keras: decoupled, p -= lr*wd*p before the update
        if opt.name == "sgd":
            self._opt = keras.optimizers.SGD(learning_rate=opt.lr, momentum=opt.momentum, weight_decay=wd)
        else:
            self._opt = keras.optimizers.Adam(learning_rate=opt.lr, epsilon=ADAM_EPSILON, weight_decay=wd)
        # Slots now, not lazily at the first step: set_state on a fresh backend
        # needs them, and a tf.function must not create variables.
        self._opt.build(self._vars)

        self._jit = model.compile
        x_spec = tf.TensorSpec([None, n_features], tf.float32)
        y_spec = tf.TensorSpec([None], tf.int64 if task == "classification" else tf.float32)
        w_spec = tf.TensorSpec([None], tf.float32)
        self._train_fn = tf.function(self._train, input_signature=[x_spec, y_spec, w_spec], jit_compile=self._jit)
        self._predict_fn = tf.function(self._predict, input_signature=[x_spec], jit_compile=self._jit)
        # Trace now and keep the concrete functions: calling them directly skips
        # tf.function's argument binding (about 40% of a small step's time).
        self._train_cf = self._train_fn.get_concrete_function()
        self._predict_cf = self._predict_fn.get_concrete_function()

    def framework_model(self) -> keras.Model:
        """The live ``keras.Model`` (logits; no softmax), for export."""
        return self._net

    @property
    def tracing_count(self) -> int:
        """Traces of the compiled train and predict steps: 2 (both traced at build), whatever the batches."""
        return self._train_fn.experimental_get_tracing_count() + self._predict_fn.experimental_get_tracing_count()

    # -- compiled steps ----------------------------------------------------

    def _train(self, x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            out = self._net(x, training=True)
            if self._loss == "cross_entropy":
                per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
            else:
                per_row = tf.square(out[:, 0] - y)
            loss = tf.reduce_sum(per_row * w) / tf.reduce_sum(w)  # mean over real rows only
            total = tf.add_n([loss, *self._net.losses]) if self._net.losses else loss  # + regularizers
        self._opt.apply(tape.gradient(total, self._vars), self._vars)
        return loss

    def _predict(self, x: tf.Tensor) -> tf.Tensor:
        out = self._net(x, training=False)
        return tf.nn.softmax(out) if self._loss == "cross_entropy" else out

    def _padded(self, n: int) -> int:
        return 1 << max(n - 1, 0).bit_length() if self._jit else n

    # -- protocol ----------------------------------------------------------

    def predict(self, x: np.ndarray) -> np.ndarray:
        x, _ = common.check_batch(x, None, self._n_features, self._n_outputs, self._task)
        n = x.shape[0]
        if (cap := self._padded(n)) != n:
            x = np.concatenate([x, np.zeros((cap - n, x.shape[1]), np.float32)])
        return self._predict_cf(tf.convert_to_tensor(x)).numpy()[:n]

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        n = x.shape[0]
        w = np.ones(self._padded(n), np.float32)
        if (cap := w.shape[0]) != n:
            w[n:] = 0.0
            x = np.concatenate([x, np.zeros((cap - n, x.shape[1]), np.float32)])
            y = np.concatenate([y, np.zeros(cap - n, y.dtype)])  # class 0 / target 0, masked out
        return float(self._train_cf(tf.convert_to_tensor(x), tf.convert_to_tensor(y), tf.convert_to_tensor(w)))

    def set_learning_rate(self, lr: float) -> None:
        """Change the learning rate from the next step on (drift policies); not part of the state.

        Keras keeps it in a variable that the compiled step reads: nothing is retraced.
        """
        self._opt.learning_rate = float(lr)

    # -- state -------------------------------------------------------------

    def _slots(self) -> list[tuple[str, list]]:
        if isinstance(self._opt, keras.optimizers.Adam):
            return [("m", self._opt._momentums), ("v", self._opt._velocities)]
        return [("velocity", self._opt.momentums)] if self._opt.momentums else []

    def _state_items(self) -> list[tuple[str, keras.Variable]]:
        items = [(f"model/{n}", v) for n, v in self._weights]
        for slot, variables in self._slots():  # built in self._vars order
            items += [(f"optim/{n}.{slot}", v) for n, v in zip(self._var_names, variables)]
        return items

    def get_state(self) -> dict[str, np.ndarray]:
        state = {key: np.array(v.numpy()) for key, v in self._state_items()}  # copies, not views
        state["optim/step"] = np.array(self._opt.iterations.numpy(), dtype=np.int64)
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        state = common.convert_momentum(state, "velocity", self._opt_spec.lr)
        items = self._state_items()
        common.check_state_keys(state, {key for key, _ in items} | {"optim/step"})
        for key, v in items:  # check every shape before changing anything
            if np.shape(state[key]) != tuple(v.shape):
                raise ValueError(f"state {key!r} has shape {np.shape(state[key])}, the model expects {tuple(v.shape)}")
        for key, v in items:
            v.assign(np.asarray(state[key], dtype=v.dtype))
        self._opt.iterations.assign(int(state["optim/step"]))
