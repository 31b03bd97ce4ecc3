"""ONNX files, whichever framework wrote them: one interface, checked, run with onnxruntime.

torch's exporter and tf2onnx name things differently (tf2onnx calls the batch
dimension ``unk__12``); :func:`finalize` gives every exported file the same
face: input ``features [batch, n]``, output ``probabilities|prediction
[batch, k]``, and the layout sidecar embedded as metadata
(``tensorstream.layout``, readable from every onnxruntime binding).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LAYOUT_KEY = "tensorstream.layout"


def finalize(path: Path, input_name: str, output_name: str, layout: dict[str, Any]) -> None:
    """Name the batch dimension, embed ``layout``, check the model and write it back."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    ins, outs = [v.name for v in graph.input], [v.name for v in graph.output]
    if ins != [input_name] or outs != [output_name]:
        raise ValueError(f"{path}: expected input {input_name!r} and output {output_name!r}, got {ins} and {outs}")
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    meta = {p.key: p for p in model.metadata_props}
    entry = meta.get(LAYOUT_KEY) or model.metadata_props.add()
    entry.key, entry.value = LAYOUT_KEY, json.dumps(layout)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def runner(path: Path, input_name: str, output_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """``x float32 [batch, n] -> output`` through an onnxruntime CPU session (one thread: verification only)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def embedded_layout(path: Path) -> dict[str, Any] | None:
    """The layout sidecar stored in an exported ONNX file (None if absent)."""
    import onnxruntime as ort

    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    raw = meta.custom_metadata_map.get(LAYOUT_KEY)
    return None if raw is None else json.loads(raw)
