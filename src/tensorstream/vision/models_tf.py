"""TensorFlow / Keras detectors: the built-in tiny grid detector and user ``.keras`` files.

Both take float32 RGB NHWC in [0, 255] (a model normalises inside itself: the
built-in one starts with ``Rescaling(1/255)``) and output the raw grid
``(N, H/s, W/s, 5 + C)`` described in :mod:`tensorstream.vision.grid`; the
decoding and NMS are shared with the PyTorch side. A user model saved with
``model.save("det.keras")`` is loaded with ``safe_mode=True`` (no arbitrary
Python from the file) and ``compile=False`` (we train it with the grid loss).

Steps are ``tf.function``s with a free batch dimension: traced once each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tensorstream.backends.frameworks import quiet_framework_import

try:
    # torch's compiler stack (torch._dynamo -> triton) must be imported before
    # TensorFlow: importing triton after TensorFlow segfaults in this environment,
    # and torchvision's detectors (or torchmetrics) import it.
    import torch._dynamo  # noqa: F401
except ImportError:
    pass

import numpy as np  # noqa: E402

with quiet_framework_import():
    import keras
    import tensorflow as tf

from tensorstream.vision.grid import STRIDE, Detections, Target, decode_grid, encode_grid_targets  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(f"the Keras detectors need KERAS_BACKEND=tensorflow, not {keras.backend.backend()!r}")


def set_threads(n: int) -> None:
    """TensorFlow's intra-op threads; only possible before TensorFlow ran its first op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
    except RuntimeError:  # already initialised: keep what it has
        pass


def build_grid_model(input_size: tuple[int, int], n_classes: int, width: int = 32, seed: int = 0) -> keras.Model:
    """A small fully-convolutional single-shot detector, stride 8 (~60 k parameters at width 32)."""
    w, h = input_size
    if w % STRIDE or h % STRIDE:
        raise ValueError(f"the grid detector's input size must be a multiple of {STRIDE}, got {w}x{h}")
    keras.utils.set_random_seed(seed)

    def conv(x: keras.KerasTensor, filters: int, stride: int = 1, dilation: int = 1) -> keras.KerasTensor:
        return keras.layers.Conv2D(filters, 3, strides=stride, dilation_rate=dilation, padding="same",
                                   activation="relu", kernel_initializer="he_normal")(x)

    inp = keras.Input((h, w, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = conv(x, width // 2, 2)
    x = conv(x, width, 2)
    x = conv(x, 2 * width, 2)
    x = conv(x, 2 * width)
    x = conv(x, 2 * width, dilation=2)
    out = keras.layers.Conv2D(5 + n_classes, 1, name="grid",
                              bias_initializer=keras.initializers.Constant([-4.0] + [0.0] * (4 + n_classes)))(x)
    return keras.Model(inp, out, name="grid_detector")


def grid_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Objectness BCE on every cell (positives weighted up), box L1 and class CE on positive cells."""
    obj_t = y_true[..., 0]
    npos = tf.maximum(tf.reduce_sum(obj_t), 1.0)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=obj_t, logits=y_pred[..., 0])
    l_obj = tf.reduce_sum(bce * (1.0 + 4.0 * obj_t)) / npos
    box = tf.sigmoid(y_pred[..., 1:5])
    l_box = tf.reduce_sum(obj_t * tf.reduce_sum(tf.abs(box - y_true[..., 1:5]) * [1.0, 1.0, 4.0, 4.0], -1)) / npos
    ce = tf.nn.softmax_cross_entropy_with_logits(labels=y_true[..., 5:], logits=y_pred[..., 5:])
    l_cls = tf.reduce_sum(obj_t * ce) / npos
    return l_obj + 2.0 * l_box + l_cls


class KerasGridDetector:
    """A Keras model that outputs the raw grid, behind the :class:`~tensorstream.vision.grid.Detector` protocol."""

    framework = "tensorflow"

    def __init__(self, model: keras.Model, class_names: Sequence[str], *, kind: str = "grid",
                 lr: float = 2e-3, score_threshold: float = 0.3, iou_threshold: float = 0.45,
                 max_detections: int = 100):
        shape = model.input_shape
        if len(shape) != 4 or shape[3] != 3 or not shape[1] or not shape[2]:
            raise ValueError(f"a detector model takes (N, H, W, 3) images of a fixed size; this one takes {shape}")
        self.model = model
        self.kind = kind
        self.input_size = (int(shape[2]), int(shape[1]))
        out = model.output_shape
        n_classes = int(out[3]) - 5
        if len(out) != 4 or n_classes < 1 or not out[1] or self.input_size[1] % int(out[1]):
            raise ValueError(f"a grid detector outputs (N, H/s, W/s, 5 + classes); this one outputs {out}")
        self.stride = self.input_size[1] // int(out[1])
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(n_classes)]
        if len(self.class_names) != n_classes:
            raise ValueError(f"the model predicts {n_classes} classes, {len(self.class_names)} class names given")
        self.score_threshold, self.iou_threshold, self.max_detections = score_threshold, iou_threshold, max_detections
        self.optimizer = keras.optimizers.Adam(lr)
        self.optimizer.build(model.trainable_variables)
        h, w = self.input_size[1], self.input_size[0]
        spec = tf.TensorSpec((None, h, w, 3), tf.uint8)
        grid = tf.TensorSpec((None, int(out[1]), int(out[2]), 5 + n_classes), tf.float32)
        self._predict = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), input_signature=[spec])
        self._train = tf.function(self._train_fn, input_signature=[spec, grid])

    def _train_fn(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = grid_loss(y, self.model(tf.cast(x, tf.float32), training=True))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        return loss

    def raw(self, images: np.ndarray) -> np.ndarray:
        return self._predict(images).numpy()

    def predict(self, images: np.ndarray) -> list[Detections]:
        return decode_grid(self.raw(images), self.input_size, self.stride, score_threshold=self.score_threshold,
                           iou_threshold=self.iou_threshold, max_detections=self.max_detections)

    def train_step(self, images: np.ndarray, targets: Sequence[Target]) -> float:
        y = encode_grid_targets(targets, self.input_size, self.stride, len(self.class_names))
        return float(self._train(images, y))

    def state_dict(self) -> dict[str, np.ndarray]:
        # Names carry the position: Keras variable paths need not be unique across layers.
        return {f"{i:03d}/{v.path}": np.asarray(v) for i, v in enumerate(self.model.weights)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        variables = self.model.weights
        by_pos = {int(k.split("/", 1)[0]): (k, v) for k, v in state.items()}
        if sorted(by_pos) != list(range(len(variables))):
            raise ValueError(f"state has {len(state)} arrays, the model {len(variables)} weights")
        for i, var in enumerate(variables):
            name, value = by_pos[i]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"weight {name}: shape {value.shape} in the state, {tuple(var.shape)} in the model")
            var.assign(value)

    def save_keras(self, path: str) -> None:
        self.model.save(path)


def build_keras_detector(*, kind: str, input_size: tuple[int, int], class_names: Sequence[str],
                         keras_path: str | None = None, lr: float = 2e-3, score_threshold: float = 0.3,
                         iou_threshold: float = 0.45, max_detections: int = 100, seed: int = 0,
                         width: int = 32) -> KerasGridDetector:
    """``kind="grid"``: the built-in detector; ``keras_path``: a user's ``.keras`` file."""
    if keras_path:
        model = keras.models.load_model(keras_path, safe_mode=True, compile=False)
        kind = f"keras:{os.path.basename(keras_path)}"
    elif kind == "grid":
        model = build_grid_model(input_size, len(class_names), width=width, seed=seed)
    else:
        raise ValueError(f"unknown TensorFlow detector {kind!r}: use grid, or keras_path for a .keras file")
    return KerasGridDetector(model, class_names, kind=kind, lr=lr, score_threshold=score_threshold,
                             iou_threshold=iou_threshold, max_detections=max_detections)
