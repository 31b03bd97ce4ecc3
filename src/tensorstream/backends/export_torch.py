"""PyTorch side of ``tensorstream.export``: the inference function as an ``nn.Module``, written out.

:class:`InferenceModule` wraps a *copy* of the live module (the live one keeps
its train/eval mode and goes on learning) with the frozen standardisation in
front and the softmax behind. Formats:

- ``onnx``: ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based
  exporter, PyTorch's default since 2.9; the TorchScript-based one is
  deprecated), a dynamic ``batch`` dimension;
- ``torchscript``: ``torch.jit.trace`` (deprecated by PyTorch in favour of
  ``torch.export``, but still what libtorch C++ ``torch::jit::load`` reads);
- ``exported-program``: ``torch.export.save`` (``.pt2``; Python's
  ``torch.export.load``, or the input of AOTInductor for C++).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tensorstream.export import InferenceGraph

_EXAMPLE_ROWS = 4  # not 0/1: torch.export specialises those sizes


class InferenceModule(nn.Module):
    """features [batch, n] (raw numeric columns first) -> probabilities (or the regression value)."""

    def __init__(self, net: nn.Module, graph: InferenceGraph) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.d, self.n = graph.numeric_width, graph.n_features
        self.standardize, self.softmax = graph.standardizes, graph.softmax
        if self.standardize:
            assert graph.mean is not None and graph.std is not None
            # float64, like the live scaler: (x - mean) / std then float32
            self.register_buffer("mean", torch.tensor(graph.mean, dtype=torch.float64))
            self.register_buffer("std", torch.tensor(graph.std, dtype=torch.float64))
        self.target = graph.target  # (mean, std) of a standardised regression target

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        if self.standardize:
            num = ((x[:, : self.d].to(torch.float64) - self.mean) / self.std).to(torch.float32)
            x = torch.cat([num, x[:, self.d :]], dim=1) if self.d < self.n else num
        out = self.net(x)
        if self.target is not None:  # back to the target's units, in float64 as the live learner
            out = (out.to(torch.float64) * self.target[1] + self.target[0]).to(torch.float32)
        return torch.softmax(out, dim=1) if self.softmax else out


@contextmanager
def _quiet() -> Iterator[None]:
    """Hide torch.jit's deprecation notices (docs/export.md says where TorchScript stands)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        yield


def export(net: nn.Module, graph: InferenceGraph, fmt: str, path: Path, opset: int) -> None:
    module = InferenceModule(net, graph).eval()
    example = torch.zeros(_EXAMPLE_ROWS, graph.n_features)
    batch = torch.export.Dim("batch", min=1)
    with _quiet(), torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, opset_version=opset, verbose=False,
                input_names=[graph.input_name], output_names=[graph.output_name],
                dynamic_shapes=({0: batch},), external_data=False)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, example), str(path))
        elif fmt == "exported-program":
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            with open(path, "wb") as f:  # a file object: torch wants a ".pt2" name otherwise
                torch.export.save(program, f)
        else:
            raise ValueError(f"torch cannot export {fmt!r}")


def load(fmt: str, path: Path, input_name: str, output_name: str) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet():
        if fmt == "torchscript":
            fn: Any = torch.jit.load(str(path))
        elif fmt == "exported-program":
            with open(path, "rb") as f:
                fn = torch.export.load(f).module()
        else:
            raise ValueError(f"torch cannot load {fmt!r}")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run
