"""Framework-free helpers shared by the backends.

The built-in models (``linear``, ``mlp``) take their initial weights from here,
drawn with numpy, so torch and tensorflow start from the very same numbers for
the same seed. Kernels are ``[in, out]`` (the Keras layout; torch transposes).

>>> from tensorstream.spec import ModelSpec
>>> layers = initial_weights(ModelSpec(kind="mlp", hidden=[4]), n_features=3, n_outputs=2)
>>> [(k.shape, b.shape) for k, b in layers]
[((3, 4), (4,)), ((4, 2), (2,))]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tensorstream.spec import ModelSpec

TASKS = ("classification", "regression")


def is_builtin(model: ModelSpec) -> bool:
    return model.kind in ("linear", "mlp")


def layer_sizes(model: ModelSpec, n_features: int, n_outputs: int) -> list[tuple[int, int]]:
    """(in, out) of each dense layer of a built-in model, input to output."""
    widths = [n_features, *(model.hidden if model.kind == "mlp" else []), n_outputs]
    return list(zip(widths[:-1], widths[1:]))


def glorot_uniform(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


def initial_weights(model: ModelSpec, n_features: int, n_outputs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel [in, out], bias [out]) per dense layer: Glorot-uniform kernels, zero biases."""
    rng = np.random.default_rng(model.seed)
    return [
        (glorot_uniform(rng, i, o), np.zeros(o, dtype=np.float32))
        for i, o in layer_sizes(model, n_features, n_outputs)
    ]


def resolve_loss(model: ModelSpec, task: str, n_outputs: int) -> str:
    """``auto`` -> cross_entropy (classification) or mse (regression); mismatches are errors."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if (n_outputs < 2) if task == "classification" else (n_outputs != 1):
        raise ValueError(f"a {task} needs {'n_outputs >= 2' if task == 'classification' else 'n_outputs == 1'}, got {n_outputs}")
    wanted = "cross_entropy" if task == "classification" else "mse"
    if model.loss not in ("auto", wanted):
        raise ValueError(f"model.loss {model.loss!r} does not fit task {task!r} (use 'auto' or {wanted!r})")
    return wanted


def load_factory(kind: str) -> Callable[..., Any]:
    """Import ``package.module:factory`` (see :func:`tensorstream.backends.check.load_factory`)."""
    from tensorstream.backends.check import load_factory

    return load_factory(kind)


def check_batch(
    x: np.ndarray, y: np.ndarray | None, n_features: int, n_outputs: int, task: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate and normalise a batch; no copy when dtypes already fit.

    Checked here, once for both frameworks, so a bad batch is a clear
    ValueError instead of a framework-specific crash deep in a kernel.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"x must be [batch, {n_features}], got shape {x.shape}")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    if y is None:
        return x, None
    y = np.asarray(y, dtype=np.int64 if task == "classification" else np.float32).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows, x has {x.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("empty batch")
    if task == "classification" and (y.min() < 0 or y.max() >= n_outputs):
        raise ValueError(f"class indices must be in [0, {n_outputs}), got [{y.min()}, {y.max()}]")
    return x, y


def check_state_keys(state: dict[str, np.ndarray], expected: set[str]) -> None:
    """Exact key match: a checkpoint from another architecture must not half-load."""
    missing, extra = expected - state.keys(), state.keys() - expected
    if missing or extra:
        raise ValueError(f"state does not match this model: missing {sorted(missing)}, unexpected {sorted(extra)}")


def convert_momentum(state: dict[str, np.ndarray], to: str, lr: float) -> dict[str, np.ndarray]:
    """Translate SGD momentum slots written by the other framework.

    torch keeps ``.momentum`` = b (a running sum of gradients, step p -= lr*b);
    keras keeps ``.velocity`` = -lr*b (step p += velocity). Each framework
    stores its own form so its own roundtrip is bit-exact; only a checkpoint
    crossing frameworks pays one rounding here.
    """
    src, factor = ("velocity", -1.0 / lr) if to == "momentum" else ("momentum", -lr)
    out = {}
    for key, value in state.items():
        if key.startswith("optim/") and key.endswith("." + src):
            key, value = key[: -len(src)] + to, (np.asarray(value, np.float64) * factor).astype(np.float32)
        out[key] = value
    return out


def sequential_steps(
    x: np.ndarray, y: np.ndarray, learn: np.ndarray | None,
    replay: tuple[np.ndarray, np.ndarray, np.ndarray] | None, task: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The per-row steps of ``learn_sequential``: ``xs`` [n, m, d], ``ys`` [n, m], ``ws`` [n, m], ``learn`` [n].

    Step i learns row i (weight 1) and its replay rows (weights ``rw``, 0 for
    an empty slot): m = 1 + k rows. Both backends take these arrays as they are.
    """
    n = len(x)
    y = np.asarray(y, dtype=np.int64 if task == "classification" else np.float32).reshape(n)
    learn = np.ones(n, dtype=bool) if learn is None else np.asarray(learn, dtype=bool).reshape(n)
    if replay is None or replay[0].shape[1] == 0:
        return x[:, None, :], y[:, None], np.ones((n, 1), np.float32), learn
    rx, ry, rw = replay
    xs = np.concatenate([x[:, None, :], np.asarray(rx, np.float32)], axis=1)
    ys = np.concatenate([y[:, None], np.asarray(ry, y.dtype)], axis=1)
    ws = np.concatenate([np.ones((n, 1), np.float32), np.asarray(rw, np.float32)], axis=1)
    return np.ascontiguousarray(xs), np.ascontiguousarray(ys), ws, learn
