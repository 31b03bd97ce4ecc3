"""TensorFlow backend: a Keras 3 model, steps compiled once with ``tf.function``.

``train_step`` and ``predict`` each have one fixed input signature with a free
batch dimension and are traced once, at build, whatever batch sizes the
stream brings (``tracing_count`` shows it). Under ``compile: true`` (XLA), which
compiles per concrete shape, batches are zero-padded up to the next power of
two and a row mask keeps padded rows out of the loss and the gradients: at
most ~log2(max batch) XLA programs.

Every step is guarded: when the loss or a gradient is non-finite (or beyond
:data:`~tensorstream.backends.base.MAX_GRAD`) the optimizer is not applied.
``learn_sequential`` (exact per-record test-then-train) is one ``tf.while_loop``
per chunk of :data:`SEQUENTIAL_CHUNK` rows, always XLA-compiled (falling back to
plain ``tf.function`` if XLA cannot compile a user model): one program for any
batch size, since the loop's trip count is an input.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import numpy as np

from tensorstream.backends.frameworks import quiet_framework_import

with quiet_framework_import():  # Keras 3 on TensorFlow, without TensorFlow's start-up lines on stderr
    import keras
    import tensorflow as tf

from tensorstream.backends import check  # noqa: E402
from tensorstream.backends import init as common  # noqa: E402
from tensorstream.backends.base import MAX_GRAD, SequentialResult  # noqa: E402
from tensorstream.spec import ModelSpec  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"the tensorflow backend needs Keras running on TensorFlow, but KERAS_BACKEND is "
        f"{keras.backend.backend()!r}: unset it or set KERAS_BACKEND=tensorflow"
    )

#: Same value as the torch backend (torch's own default is 1e-8).
ADAM_EPSILON = 1e-7
#: Rows per call of the per-record loop: XLA runs a while loop over a fixed-size chunk
#: fastest at about this size (measured: 64 rows ~50k rec/s, 256 ~26k for a small MLP).
SEQUENTIAL_CHUNK = 64

log = logging.getLogger(__name__)


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


def _user_model(model: ModelSpec, n_features: int, n_outputs: int,
                task: str = "classification") -> tuple[keras.Model, list[str]]:
    """Call the user's factory and check the model on a batch (:mod:`tensorstream.backends.check`)."""
    # The user's initialisers and dropout draw from Keras' global seed (which also
    # seeds Python's and numpy's global generators: that is how Keras does it).
    keras.utils.set_random_seed(model.seed)
    kind = model.kind
    net = check.call_factory(kind, n_features, n_outputs)
    if not isinstance(net, keras.Model):
        hint = " (a PyTorch module: use backend: torch)" if type(net).__module__.startswith("torch") else ""
        raise check.FactoryTypeError(f"model.kind {kind!r} must return a keras.Model, got {type(net).__name__}{hint}")
    x = check.check_batch_for(n_features)
    try:
        out = net(x, training=False)  # also builds subclassed models
    except Exception as err:
        raise check.forward_failed(kind, x, err) from err
    check.check_outputs(kind, out, x, n_outputs, task, _final_activation(net))
    # Positional names: Keras layer names carry process-global counters
    # ("dense_7"), so paths would differ between two builds of the same model.
    return net, [f"{i}.{v.name}" for i, v in enumerate(net.weights)]


def _output_layer(net: keras.Model) -> object | None:
    """The layer producing a Sequential's or functional model's output (None for subclassed models)."""
    if isinstance(net, keras.Sequential):
        return net.layers[-1] if net.layers else None
    outputs = getattr(net, "outputs", None)  # functional models only
    if not outputs or len(outputs) != 1:
        return None
    history = getattr(outputs[0], "_keras_history", None)
    return getattr(history, "operation", None)


def _final_activation(net: keras.Model) -> str | None:
    """The softmax / log-softmax / sigmoid a model's output layer applies (subclassed models: from outputs)."""
    layer = _output_layer(net)
    while isinstance(layer, keras.Model):  # a model nested as the last layer
        layer = _output_layer(layer)
    if isinstance(layer, keras.layers.Softmax):
        return f"a Softmax layer ({layer.name})"
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    if name in ("softmax", "log_softmax", "sigmoid"):
        return f"activation='{name}' on its last layer ({layer.name})"  # type: ignore[union-attr]
    return None


class TensorflowBackend:
    """The :class:`~tensorstream.backends.base.Backend` for TensorFlow / Keras 3."""

    name = "tensorflow"
    #: ``learn_sequential`` is exact per-record learning here; the multi-worker subclass turns it off
    sequential = True

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
        builder = _builtin if common.is_builtin(model) else partial(_user_model, task=task)
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
        self._builtin = common.is_builtin(model)
        self._row_ok_fn = tf.function(self._row_ok, input_signature=[x_spec, y_spec], jit_compile=False)
        self._seq_cf = None  # traced (and XLA-compiled) at the first learn_sequential

    @staticmethod
    def check_user_model(model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        """Build ``model.kind``'s model once and check it (before any record: ``check.check_model``)."""
        _user_model(model, n_features, n_outputs, task)

    def framework_model(self) -> keras.Model:
        """The live ``keras.Model`` (logits; no softmax), for export."""
        return self._net

    @property
    def tracing_count(self) -> int:
        """Traces of the compiled train and predict steps: 2 (both traced at build), whatever the batches."""
        return self._train_fn.experimental_get_tracing_count() + self._predict_fn.experimental_get_tracing_count()

    # -- compiled steps ----------------------------------------------------

    def _per_row(self, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Each row's loss: softmax cross-entropy on the logits, or the squared error."""
        if self._loss == "cross_entropy":
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
        return tf.square(out[:, 0] - y)

    def _loss_and_grads(self, x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, list]:
        """(outputs, loss: the ``w``-weighted mean over rows, gradients) with the model in training mode."""
        with tf.GradientTape() as tape:
            out = self._net(x, training=True)
            loss = tf.reduce_sum(self._per_row(out, y) * w) / tf.reduce_sum(w)  # mean over real rows only
            total = tf.add_n([loss, *self._net.losses]) if self._net.losses else loss  # + regularizers
        return out, loss, tape.gradient(total, self._vars)

    def _finite(self, loss: tf.Tensor, grads: list) -> tf.Tensor:
        """Whether a step may be taken: finite loss, every gradient finite and below MAX_GRAD."""
        biggest = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in grads if g is not None]))
        return tf.logical_and(tf.math.is_finite(loss), biggest < MAX_GRAD)  # NaN compares false

    def _apply_if(self, ok: tf.Tensor, grads: list) -> None:
        def apply() -> tf.Tensor:
            self._opt.apply(grads, self._vars)
            return tf.constant(True)

        tf.cond(ok, apply, lambda: tf.constant(False))

    def _train(self, x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        _, loss, grads = self._loss_and_grads(x, y, w)
        ok = self._finite(loss, grads)
        self._apply_if(ok, grads)
        return loss, ok

    def _row_ok(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        _, loss, grads = self._loss_and_grads(x, y, tf.ones_like(x[:, 0]))
        return self._finite(loss, grads)

    def _sequence(self, xs: tf.Tensor, ys: tf.Tensor, ws: tf.Tensor, learn: tf.Tensor,
                  n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Row i < n: predict from the current weights, then one guarded step on ``xs[i]`` (m rows)."""
        chunk = xs.shape[0]
        nan = tf.constant(math.nan, tf.float32)

        def body(i: tf.Tensor, outs: tf.TensorArray, losses: tf.TensorArray,
                 refused: tf.TensorArray) -> tuple:
            x, y, w = xs[i], ys[i], ws[i]

            def step() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
                out, loss, grads = self._loss_and_grads(x, y, w)
                ok = self._finite(loss, grads)
                self._apply_if(ok, grads)
                return out[0], tf.where(ok, loss, nan), tf.logical_not(ok)

            def predict_only() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
                return self._net(x[:1], training=False)[0], nan, tf.constant(False)

            if self._builtin:  # dense layers act alike in both modes: the step's forward is the prediction
                out, loss, bad = tf.cond(learn[i], step, predict_only)
            else:  # user models may not (dropout, batch norm): predict in inference mode first
                out = self._net(x[:1], training=False)[0]
                _, loss, bad = tf.cond(learn[i], step, lambda: (out, nan, tf.constant(False)))
            if self._loss == "cross_entropy":
                out = tf.nn.softmax(out)
            return i + 1, outs.write(i, out), losses.write(i, loss), refused.write(i, bad)

        arrays = (tf.TensorArray(tf.float32, size=chunk), tf.TensorArray(tf.float32, size=chunk),
                  tf.TensorArray(tf.bool, size=chunk))
        _, outs, losses, refused = tf.while_loop(lambda i, *_: i < n, body, (tf.constant(0), *arrays))
        return outs.stack(), losses.stack(), refused.stack()

    def _sequence_cf(self, m: int) -> object:
        if self._seq_cf is None or self._seq_cf[0] != m:
            d, y_dtype = self._n_features, tf.int64 if self._task == "classification" else tf.float32
            specs = [tf.TensorSpec([SEQUENTIAL_CHUNK, m, d], tf.float32), tf.TensorSpec([SEQUENTIAL_CHUNK, m], y_dtype),
                     tf.TensorSpec([SEQUENTIAL_CHUNK, m], tf.float32), tf.TensorSpec([SEQUENTIAL_CHUNK], tf.bool),
                     tf.TensorSpec([], tf.int32)]
            try:
                cf = tf.function(self._sequence, input_signature=specs, jit_compile=True).get_concrete_function()
                zeros = (np.zeros((1, m, d), np.float32), np.zeros((1, m), y_dtype.as_numpy_dtype),
                         np.zeros((1, m), np.float32), np.zeros(1, bool))
                self._seq_call(cf, *self._padded_chunk(*zeros))  # compiles now: a failure falls back
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError) as err:
                log.warning("XLA cannot compile the per-record loop for this model (%s); using tf.function", err)
                cf = tf.function(self._sequence, input_signature=specs).get_concrete_function()
            self._seq_cf = (m, cf)
        return self._seq_cf[1]

    @staticmethod
    def _padded_chunk(*arrays: np.ndarray) -> list[tf.Tensor]:
        n = len(arrays[0])
        out = [tf.convert_to_tensor(np.concatenate([a, np.zeros((SEQUENTIAL_CHUNK - n, *a.shape[1:]), a.dtype)])
                                    if n < SEQUENTIAL_CHUNK else a) for a in arrays]
        return [*out, tf.constant(n, tf.int32)]

    @staticmethod
    def _seq_call(cf: object, *args: tf.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        outs, losses, refused = cf(*args)  # type: ignore[operator]
        return outs.numpy(), losses.numpy(), refused.numpy()

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
        return self.train_guarded(x, y)[0]

    def train_guarded(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        """One step on the batch; rows with a non-finite loss or gradient are left out (and returned)."""
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        loss, ok = self._guarded_step(x, y)
        if ok:
            return loss, None
        # Rare: find the rows that make the step non-finite, then step on the others only
        # (dropped, not weighted 0: 0 * NaN is NaN).
        refused = np.array([not bool(self._row_ok_fn(x[i:i + 1], y[i:i + 1])) for i in range(len(x))])
        if refused.all():
            return math.nan, refused
        loss, ok = self._guarded_step(x[~refused], y[~refused])
        if not ok:  # finite rows one by one, but not together: learn none of them
            return math.nan, np.ones(len(x), dtype=bool)
        return loss, refused

    def _guarded_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
        n = x.shape[0]
        w = np.ones(self._padded(n), np.float32)
        if (cap := w.shape[0]) != n:
            w[n:] = 0.0
            x = np.concatenate([x, np.zeros((cap - n, x.shape[1]), np.float32)])
            y = np.concatenate([y, np.zeros(cap - n, y.dtype)])  # class 0 / target 0, masked out
        loss, ok = self._train_cf(tf.convert_to_tensor(x), tf.convert_to_tensor(y), tf.convert_to_tensor(w))
        return float(loss), bool(ok)

    def learn_sequential(self, x: np.ndarray, y: np.ndarray, learn: np.ndarray | None = None,
                         replay: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> SequentialResult:
        """Exact per-record test-then-train (see :class:`~tensorstream.backends.base.SequentialLearning`)."""
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        xs, ys, ws, flags = common.sequential_steps(x, y, learn, replay, self._task)
        cf = self._sequence_cf(xs.shape[1])
        parts = [self._seq_call(cf, *self._padded_chunk(xs[i:i + SEQUENTIAL_CHUNK], ys[i:i + SEQUENTIAL_CHUNK],
                                                         ws[i:i + SEQUENTIAL_CHUNK], flags[i:i + SEQUENTIAL_CHUNK]))
                 for i in range(0, len(xs), SEQUENTIAL_CHUNK)]
        n = len(xs)
        out, loss, refused = (np.concatenate([p[k] for p in parts])[:n] for k in range(3)) if len(parts) > 1 else \
            (a[:n] for a in parts[0])
        return SequentialResult(out, loss, refused)

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
