"""TensorFlow side of ``tensorstream.export``: the inference function as a Keras model, written out.

The live ``keras.Model`` is called inside a new functional model, standardise
-> model -> softmax, whose output is a dict so that the serving signature and
the ONNX output get a real name (``probabilities``, not ``output_0``). Formats:

- ``savedmodel``: Keras ``model.export(format="tf_saved_model")``: signature
  ``serving_default`` (input ``features``), for TF Serving, TF Java, the C API;
- ``onnx``: Keras ``model.export(format="onnx")``, which converts with tf2onnx.

Export snapshots the weights: the live model goes on learning untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tensorstream.backends.frameworks import quiet_framework_import

with quiet_framework_import():
    import keras
    import tensorflow as tf
    from keras import ops

from tensorstream.export import InferenceGraph  # noqa: E402


class _Standardize(keras.layers.Layer):
    """(x[:, :d] - mean) / std in float64 (as the live scaler), other columns unchanged; constants, no weights."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, n_features: int, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.mean, self.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        self.d, self.n = len(self.mean), n_features

    def call(self, x):  # noqa: ANN001, ANN201
        num = ops.cast((ops.cast(x[:, : self.d], "float64") - self.mean) / self.std, "float32")
        return ops.concatenate([num, x[:, self.d :]], axis=1) if self.d < self.n else num


class _Unstandardize(keras.layers.Layer):
    """out * std + mean in float64 (a standardised regression target back in its units); constants."""

    def __init__(self, mean: float, std: float, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.mean, self.std = float(mean), float(std)

    def call(self, out):  # noqa: ANN001, ANN201
        return ops.cast(ops.cast(out, "float64") * self.std + self.mean, "float32")


def inference_model(net: keras.Model, graph: InferenceGraph) -> keras.Model:
    """features [batch, n] -> {output_name: probabilities (or the regression value)}."""
    inp = keras.Input((graph.n_features,), name=graph.input_name, dtype="float32")
    x = inp
    if graph.standardizes:
        assert graph.mean is not None and graph.std is not None
        x = _Standardize(graph.mean, graph.std, graph.n_features, name="standardize")(x)
    out = net(x, training=False)
    if graph.target is not None:
        out = _Unstandardize(*graph.target, name="target")(out)
    if graph.softmax:
        out = keras.layers.Softmax(name="softmax")(out)
    return keras.Model(inp, {graph.output_name: out}, name="tensorstream_inference")


def export(net: keras.Model, graph: InferenceGraph, fmt: str, path: Path, opset: int) -> None:
    model = inference_model(net, graph)
    signature = [tf.TensorSpec([None, graph.n_features], tf.float32, name=graph.input_name)]
    if fmt == "savedmodel":
        model.export(str(path), format="tf_saved_model", verbose=False, input_signature=signature)
    elif fmt == "onnx":
        with warnings.catch_warnings():  # Keras' numpy-2 patch of tf2onnx trips numpy's np.object notice
            warnings.filterwarnings("ignore", category=FutureWarning)
            model.export(str(path), format="onnx", verbose=False, input_signature=signature, opset_version=opset)
    else:
        raise ValueError(f"tensorflow cannot export {fmt!r}")


def load(fmt: str, path: Path, input_name: str, output_name: str) -> Callable[[np.ndarray], np.ndarray]:
    if fmt != "savedmodel":
        raise ValueError(f"tensorflow cannot load {fmt!r}")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]  # what other languages call

    def run(x: np.ndarray) -> np.ndarray:
        return serve(**{input_name: tf.constant(np.asarray(x, dtype=np.float32))})[output_name].numpy()

    return run
