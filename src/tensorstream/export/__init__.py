"""Export a trained learner for serving without Python: ONNX, TorchScript, SavedModel.

What is exported is the whole inference function of the learner, as one graph:

    features [batch, n] ──► (x_num - mean) / std ──► model ──► softmax ──► probabilities [batch, k]
    float32                  (numeric columns,       (logits)   (classification;
                              float64, constants)                regression: prediction [batch, 1])

The numeric columns come first and are fed **raw**: the running scaler's mean
and std are frozen into the graph as constants. The categorical columns follow,
already one-hot (or hashed) encoded, because vocabularies are strings: the
layout sidecar ``<PATH>.layout.json`` (see :mod:`tensorstream.export.layout`)
says how to encode a record in any language, and ONNX files carry it as
metadata too. After writing, :func:`export_learner` loads the artefact back with
its own runtime (onnxruntime, ``torch.jit.load``, ``torch.export.load``,
``tf.saved_model.load``) and checks it against the live learner on seeded random
rows (batch 1 and a larger batch): a difference over ``atol`` deletes the
artefact and raises :class:`ExportMismatchError`.

Formats per backend (:data:`FORMATS`): torch writes ``onnx`` (``torch.onnx``'s
dynamo exporter), ``torchscript`` (``torch.jit.trace``; deprecated by PyTorch
but still what libtorch C++ loads) and ``exported-program`` (``torch.export``
``.pt2``, for Python and AOTInductor); tensorflow writes ``savedmodel`` (Keras
``model.export``: TF Serving, TF Java, the C API) and ``onnx`` (Keras + tf2onnx).
A built-in ``linear``/``mlp`` model trained on one framework can be rebuilt on
the other (the state names are shared), so every format is reachable from
either; user factories export from their own framework only.

This module imports no framework; the builders live in
``tensorstream.backends.export_torch`` / ``export_tensorflow`` and load lazily.

>>> sorted(FORMATS["torch"]), sorted(FORMATS["tensorflow"])
(['exported-program', 'onnx', 'torchscript'], ['onnx', 'savedmodel'])
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tensorstream.export import onnx_file
from tensorstream.export.layout import SCHEMA, describe_features, encode_records
from tensorstream.features.scaler import RunningStandardizer
from tensorstream.features.state import from_json_array, unprefixed
from tensorstream.features.transform import ParsedBatch

if TYPE_CHECKING:
    from tensorstream.learn import OnlineLearner

__all__ = [
    "ALL_FORMATS",
    "DEFAULT_OPSET",
    "FORMATS",
    "ExportError",
    "ExportMismatchError",
    "ExportResult",
    "InferenceGraph",
    "encode_records",
    "export_learner",
    "inference_graph",
    "layout_path",
    "load_exported",
]

FORMATS: dict[str, tuple[str, ...]] = {
    "torch": ("onnx", "torchscript", "exported-program"),
    "tensorflow": ("savedmodel", "onnx"),
}
ALL_FORMATS = ("onnx", "torchscript", "exported-program", "savedmodel")
#: ONNX opset written by both exporters (onnxruntime 1.31 runs up to 23)
DEFAULT_OPSET = 18
_BUILDERS = {"torch": "tensorstream.backends.export_torch", "tensorflow": "tensorstream.backends.export_tensorflow"}
_FORMAT_RUNTIME = {"torchscript": "torch", "exported-program": "torch", "savedmodel": "tensorflow"}


class ExportError(RuntimeError):
    """The learner cannot be exported in this form (nothing built, wrong format, path taken)."""


class ExportMismatchError(ExportError):
    """The exported artefact does not reproduce the live model; it has been deleted."""

    def __init__(self, message: str, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class InferenceGraph:
    """What the exported function computes, as plain numbers (the builders' whole input besides the model)."""

    n_features: int
    numeric_width: int
    #: float64 [numeric_width]; None: the numeric columns pass through unchanged (``standardize: false``)
    mean: np.ndarray | None
    std: np.ndarray | None
    softmax: bool
    n_outputs: int
    input_name: str = "features"
    output_name: str = "probabilities"
    #: regression with ``label.standardize``: the model predicts the standardised target; the
    #: graph ends with ``out * std + mean`` (float64, these constants) so it predicts in the
    #: target's units, as the live learner does. None: the model's output is the prediction
    target: tuple[float, float] | None = None

    @property
    def standardizes(self) -> bool:
        return self.mean is not None and self.numeric_width > 0


@dataclass(frozen=True)
class ExportResult:
    path: Path
    layout_path: Path
    format: str
    backend: str
    #: max |exported - live| over the verification batches
    max_abs_diff: float
    #: the verification batch sizes
    rows: tuple[int, ...]


def layout_path(path: str | Path) -> Path:
    """Where the layout sidecar of an artefact goes: beside it, ``<name>.layout.json``."""
    path = Path(path)
    return path.with_name(path.name + ".layout.json")


def inference_graph(learner: OnlineLearner) -> InferenceGraph:
    """The constants of ``learner``'s inference function (the scaler frozen as it is now)."""
    if not learner.built:
        raise ExportError("nothing to export: the learner has no model yet (train on a batch or load a state)")
    fstate = learner.features.state_dict()
    d = int(learner.features.numeric_width or 0)
    mean = std = None
    if learner.features.spec.standardize and d:
        scaler = RunningStandardizer(d)
        scaler.load_state_dict(unprefixed("scaler", fstate))
        mean, var = scaler.mean.copy(), scaler.var
        std = np.sqrt(var, out=np.ones_like(var), where=var > 1e-24)  # as RunningStandardizer.transform
    regression = learner.task == "regression"
    n_features = int(learner.features.n_features or 0)
    # the built model's width (an infer-only spec has no label section to read it from)
    n_outputs = learner.backend.predict(np.zeros((1, n_features), np.float32)).shape[1]
    target = None
    if regression and learner.target is not None:
        scale = learner.target.inverse(np.array([[0.0], [1.0]]))[:, 0]  # (mean, mean + std)
        target = (float(scale[0]), float(scale[1] - scale[0]))
    return InferenceGraph(
        n_features=n_features,
        numeric_width=d,
        mean=mean,
        std=std,
        softmax=not regression,
        n_outputs=int(n_outputs),
        output_name="prediction" if regression else "probabilities",
        target=target,
    )


def _layout(learner: OnlineLearner, graph: InferenceGraph, fmt: str, backend: str, opset: int | None,
            model_info: Mapping[str, Any] | None) -> dict[str, Any]:
    numeric, categorical = describe_features(
        learner.features.state_dict(), standardize=graph.standardizes, mean=graph.mean, std=graph.std)
    return {
        "schema": SCHEMA,
        "format": fmt,
        "backend": backend,
        **({"opset": opset} if fmt == "onnx" else {}),
        "input": {"name": graph.input_name, "dtype": "float32", "shape": [None, graph.n_features]},
        "output": {"name": graph.output_name, "dtype": "float32", "shape": [None, graph.n_outputs],
                   "softmax": graph.softmax},
        "task": learner.task,
        "classes": json.loads(json.dumps(learner.classes, default=str)),
        "numeric": numeric,
        "categorical": categorical,
        "model": dict(model_info or {}),
    }


def _builder(backend: str) -> Any:
    return importlib.import_module(_BUILDERS[backend])


def load_exported(fmt: str, path: str | Path, input_name: str = "features",
                  output_name: str = "probabilities") -> Callable[[np.ndarray], np.ndarray]:
    """An exported artefact as ``x float32 [batch, n] -> output``, through its own runtime."""
    path = Path(path)
    if fmt == "onnx":
        return onnx_file.runner(path, input_name, output_name)
    if fmt not in _FORMAT_RUNTIME:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(ALL_FORMATS)}")
    return _builder(_FORMAT_RUNTIME[fmt]).load(fmt, path, input_name, output_name)


def _sample(learner: OnlineLearner, graph: InferenceGraph, n: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(raw input for the artefact, the live pipeline's model input)`` for ``n`` random rows.

    Numeric values are drawn around the scaler's statistics (float32-representable,
    the artefact's input type); categories from the vocabulary plus an unseen key,
    so the live transform (not a copy of it) encodes them.
    """
    d = graph.numeric_width
    if graph.standardizes:
        assert graph.mean is not None and graph.std is not None
        num = (graph.mean + graph.std * rng.standard_normal((n, d))).astype(np.float32)
    else:
        num = rng.standard_normal((n, d)).astype(np.float32)
    feats = learner.features
    fstate = feats.state_dict()
    vocab = from_json_array(fstate["vocab"]) if "vocab" in fstate else {}
    pools = [list(vocab.get(f, [])) + ["<unseen>"] if feats.spec.categorical_encoding == "onehot"
             else [f"k{i}" for i in range(64)] for f in feats.spec.categorical]
    cats = [[pool[int(rng.integers(len(pool)))] for pool in pools] for _ in range(n)]
    X = feats.transform_parsed(ParsedBatch(num.astype(np.float64), cats, np.arange(n)), update=False)
    raw = X.copy()
    raw[:, :d] = num
    return raw, X


def verify(learner: OnlineLearner, graph: InferenceGraph, run: Callable[[np.ndarray], np.ndarray],
           rows: tuple[int, ...] = (1, 64), seed: int = 0) -> float:
    """Max |artefact(raw) - live model(live features(raw))| over seeded random batches of ``rows`` rows."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in rows:
        raw, X = _sample(learner, graph, n, rng)
        want = np.asarray(learner.backend.predict(X), dtype=np.float32)
        got = np.asarray(run(raw))
        if got.shape != want.shape:
            raise ExportError(f"the exported model returns shape {got.shape} for {n} rows, the live one {want.shape}")
        if graph.target is not None:  # compared in the model's units, where atol was chosen
            got = (got.astype(np.float64) - graph.target[0]) / graph.target[1]
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0)
    return worst


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def export_learner(
    learner: OnlineLearner,
    fmt: str,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-5,
    rows: tuple[int, ...] = (1, 64),
    seed: int = 0,
    overwrite: bool = False,
    model_info: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write ``learner``'s inference function as ``fmt`` at ``out`` (+ the layout sidecar) and verify it.

    ``out`` is a file for ``onnx``/``torchscript``/``exported-program`` and a
    directory for ``savedmodel``. An existing ``out`` is refused unless
    ``overwrite``. ``model_info`` (checkpoint id, version, ...) is copied into
    the sidecar's ``model`` section.
    """
    backend = learner.backend.name
    if fmt not in ALL_FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(ALL_FORMATS)}")
    if fmt not in FORMATS.get(backend, ()):
        raise ExportError(
            f"the {backend} backend exports {', '.join(FORMATS.get(backend, ()))}, not {fmt}; a built-in "
            f"linear/mlp model can be rebuilt on the other framework (tensorstream export --backend ...)")
    graph = inference_graph(learner)
    out, side = Path(out), layout_path(out)
    for p in (out, side):
        if p.exists() or p.is_symlink():
            if not overwrite:
                raise ExportError(f"{p} exists (pass overwrite=True / --force to replace it)")
            _remove(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    layout = _layout(learner, graph, fmt, backend, opset, model_info)
    try:
        _builder(backend).export(learner.backend.framework_model(), graph, fmt, out, opset)
        if fmt == "onnx":
            onnx_file.finalize(out, graph.input_name, graph.output_name, layout)
        side.write_text(json.dumps(layout, indent=1) + "\n")
        diff = verify(learner, graph, load_exported(fmt, out, graph.input_name, graph.output_name), rows, seed)
    except BaseException:
        _remove(out), _remove(side)
        raise
    if not diff <= atol:  # also catches NaN
        _remove(out), _remove(side)
        raise ExportMismatchError(
            f"the exported {fmt} model differs from the live {backend} model by up to {diff:.3g} "
            f"(> atol {atol:g}) on seeded random inputs; {out} was deleted", diff)
    return ExportResult(out, side, fmt, backend, diff, tuple(rows))
