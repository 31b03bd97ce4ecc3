"""User models (``model.kind: "pkg.module:factory"``): found, called and checked before the first record.

A factory is ``make(n_features=..., n_outputs=...)`` returning a ``torch.nn.Module``
(backend ``torch``) or a ``keras.Model`` (backend ``tensorflow``) whose output is
``(batch, n_outputs)`` **logits**: one per class (a binary label has 2 outputs),
or one value for a regression. tensorstream applies the softmax (predictions) and
the cross-entropy (training) itself, so a model ending in a softmax, log-softmax or
sigmoid is an error: it would get a second one and learn worse.

Where the module is looked for: the installed packages and ``PYTHONPATH``, then
the current working directory (added at the end of ``sys.path`` when it is not
there already): ``my_model.py`` beside where you run ``tensorstream`` works as
``kind: "my_model:make"`` without setting ``PYTHONPATH``. A name an installed
package already uses (``models``, ``model``...) finds that package first.

:func:`check_model` runs all of this on a spec before anything connects (the
``run`` command calls it), in seconds; every problem is a :class:`ModelCheckError`,
one sentence naming ``model.kind``. The feature width is only certain once the
first record arrived (``numeric: ["*"]``, array-valued fields): the check uses the
width the spec implies (the number of listed fields plus the categorical slots) or
:data:`DUMMY_WIDTH`, and what a wrong width alone could cause (the factory or the
model raising on that width) is a warning there; the backend checks again, with the
real width, when it builds the model at the first record, and fails then.

>>> from tensorstream.spec import parse_spec
>>> spec = parse_spec({"source": {"topic": "t"}, "sink": {"topic": "p"}, "features": {"numeric": ["*"]},
...                    "label": {"field": "y"}, "model": {"kind": "no_such_module_x:make"}})
>>> check_model(spec)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tensorstream.backends.check.FactoryImportError: model.kind 'no_such_module_x:make': cannot import module 'no_such_module_x': ...
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from tensorstream.backends.frameworks import quiet_framework_import
from tensorstream.spec import PipelineSpec, SpecError

log = logging.getLogger(__name__)

#: the feature width a model is checked with when the spec does not tell it (``numeric: ["*"]``)
DUMMY_WIDTH = 8
#: rows of the batch a model is checked on (random normal values, seeded)
CHECK_ROWS = 16

_warned: set[str] = set()


class ModelCheckError(SpecError):
    """A user model (``model.kind``) that cannot work, in one sentence naming ``model.kind``.

    ``width_dependent``: it may come from the feature width the model was checked
    with (before the first record, a warning; with the real width, an error).
    """

    def __init__(self, message: str, *, width_dependent: bool = False) -> None:
        super().__init__(message)
        self.width_dependent = width_dependent


class FactoryImportError(ModelCheckError, ImportError):
    """The factory's module or attribute cannot be found or imported."""


class FactoryTypeError(ModelCheckError, TypeError):
    """The factory is not callable with ``n_features``/``n_outputs``, or returns the wrong type."""


def load_factory(kind: str) -> Callable[..., Any]:
    """Import ``package.module:factory`` (importlib only: a spec never runs code from a string).

    The current working directory is searched after the installed packages (see the module doc).
    """
    module_name, _, attr = kind.partition(":")
    module = _import(kind, module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        where = getattr(module, "__file__", None) or module_name
        raise FactoryImportError(f"model.kind {kind!r}: module {module_name!r} ({where}) has no attribute {attr!r}")
    if not callable(factory):
        raise FactoryTypeError(f"model.kind {kind!r}: {attr!r} is not callable (a factory is a function "
                               f"make(n_features, n_outputs) returning the model)")
    return factory


def _cwd_on_path(cwd: str) -> bool:
    return any(os.path.abspath(p or os.curdir) == cwd for p in sys.path)


def _import(kind: str, module_name: str) -> Any:
    cwd = os.getcwd()
    for attempt in (1, 2):
        try:
            with quiet_framework_import():  # the user's module may import TensorFlow at its top
                return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if module_name != missing and not module_name.startswith(missing + "."):
                raise FactoryImportError(f"model.kind {kind!r}: cannot import module {module_name!r}: it imports "
                                         f"{missing!r}, which is not installed") from err
            if attempt == 1 and not _cwd_on_path(cwd):
                sys.path.append(cwd)  # after the installed packages: a local file never shadows one
                importlib.invalidate_caches()
                continue
            raise FactoryImportError(f"model.kind {kind!r}: cannot import module {module_name!r}: no such module "
                                     f"in the current directory ({cwd}) or the installed packages "
                                     "(put its .py file there, or install its package)") from err
        except Exception as err:  # a SyntaxError, NameError... at the top level of the user's module
            raise FactoryImportError(f"model.kind {kind!r}: cannot import module {module_name!r}: importing it "
                                     f"raised {type(err).__name__}: {one_line(err)}") from err
    raise AssertionError("unreachable")  # pragma: no cover


def call_factory(kind: str, n_features: int, n_outputs: int) -> Any:
    """``factory(n_features=n_features, n_outputs=n_outputs)``, its signature checked first."""
    factory = load_factory(kind)
    attr = kind.partition(":")[2]
    try:
        inspect.signature(factory).bind(n_features=n_features, n_outputs=n_outputs)
    except TypeError:
        raise FactoryTypeError(f"model.kind {kind!r}: {attr}{inspect.signature(factory)} cannot be called as "
                               f"{attr}(n_features=..., n_outputs=...), the way tensorstream calls a factory") from None
    except ValueError:  # no signature to inspect (a builtin, a C extension): just call it
        pass
    try:
        return factory(n_features=n_features, n_outputs=n_outputs)
    except Exception as err:
        raise ModelCheckError(f"model.kind {kind!r}: {attr}(n_features={n_features}, n_outputs={n_outputs}) "
                              f"raised {type(err).__name__}: {one_line(err)}", width_dependent=True) from err


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line: Keras' call context and colour codes left out.

    >>> one_line(ValueError("Exception encountered when calling Dense.call().\\n\\n\\x1b[1mbad width\\x1b[0m"
    ...                     "\\n\\nArguments received by Dense.call():\\n  • inputs=..."))
    'bad width'
    """
    parts = [" ".join(p.split()) for p in _ANSI.sub("", str(err)).split("\n\n")]
    parts = [p for p in parts if p and not p.startswith("Arguments received by")]
    if len(parts) > 1 and parts[0].startswith("Exception encountered when calling"):
        parts = parts[1:]
    text = " ".join(parts) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_batch_for(n_features: int, rows: int = CHECK_ROWS) -> np.ndarray:
    """The batch a user model is checked on: ``rows`` x ``n_features`` normal values (seeded)."""
    return np.random.default_rng(20_251_125).normal(0.0, 2.0, (rows, n_features)).astype(np.float32)


def forward_failed(kind: str, x: np.ndarray, err: Exception) -> ModelCheckError:
    """The error for a model that raised on the check batch ``x``."""
    return ModelCheckError(f"model.kind {kind!r}: the model raised {type(err).__name__} on a batch of "
                           f"{x.shape[0]} rows of {x.shape[1]} features: {one_line(err)}", width_dependent=True)


def check_outputs(kind: str, out: Any, x: np.ndarray, n_outputs: int, task: str, final: str | None) -> None:
    """Check what the model returned for the check batch ``x``: ``(rows, n_outputs)`` logits.

    ``final``: the framework's description of a softmax/log-softmax/sigmoid that the
    model ends in (found in its layers), or None.
    """
    rows, width = x.shape
    if not hasattr(out, "shape"):
        raise ModelCheckError(f"model.kind {kind!r}: the model returned a {type(out).__name__}, expected one "
                              f"tensor of shape (batch, {n_outputs})")
    out = np.asarray(out)
    if out.shape != (rows, n_outputs):
        what = ("one logit per class; a binary label has 2 classes" if task == "classification"
                else "one column: the predicted value")
        raise ModelCheckError(f"model.kind {kind!r}: the model's output has shape {out.shape} for a batch of {rows} "
                              f"rows of {width} features, expected ({rows}, {n_outputs}) ({what})",
                              width_dependent=out.ndim == 2 and out.shape[1] == n_outputs)
    if task != "classification":
        return  # a bounded regression target may well end in a sigmoid
    fix = ("remove it: the model must output logits; tensorstream applies the softmax (predictions) and the "
           "cross-entropy (training) itself, and a second softmax learns worse")
    if final is not None:
        raise ModelCheckError(f"model.kind {kind!r}: the model ends in {final}; {fix}")
    o = out.astype(np.float64)
    if not np.isfinite(o).all():
        warn_once(f"model.kind {kind!r}: the model's output holds NaN or infinity for a batch of random features")
        return
    if o.min() >= -1e-6 and o.max() <= 1 + 1e-6 and np.allclose(o.sum(axis=1), 1.0, atol=1e-4):
        raise ModelCheckError(f"model.kind {kind!r}: the model outputs probabilities (every row sums to 1: a "
                              f"softmax); {fix}")
    lse = np.log(np.exp(o - o.max(axis=1, keepdims=True)).sum(axis=1)) + o.max(axis=1)
    if o.max() <= 1e-6 and np.allclose(lse, 0.0, atol=1e-4):
        raise ModelCheckError(f"model.kind {kind!r}: the model outputs log-probabilities (a log-softmax); {fix}")
    if o.min() > 0 and o.max() < 1:
        warn_once(f"model.kind {kind!r}: every output for a batch of random features lies in (0, 1), as after a "
                  "sigmoid; if the model ends in one, remove it: logits are expected")


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def feature_width(spec: PipelineSpec) -> tuple[int, bool]:
    """``(width, known)``: the model's input width as far as the spec tells it before the first record.

    Known for listed fields read as scalars (their count plus the categorical
    slots); ``numeric: ["*"]`` gives :data:`DUMMY_WIDTH`, not known. A listed field
    holding an array (tensor frames, JSON lists) widens it at the first record.
    """
    from tensorstream.features.transform import FeaturePipeline

    fp = FeaturePipeline(spec.features, label_field=spec.label.field if spec.label else None)
    width = fp.n_features
    if width is None or width == 0:
        return DUMMY_WIDTH, False
    return width, spec.source.codec != "frame"


def check_model(spec: PipelineSpec) -> list[str]:
    """Check ``spec``'s user model before any connection; returns the warnings (also logged).

    Raises :class:`ModelCheckError` (a :class:`~tensorstream.spec.SpecError`) for a
    factory that cannot be imported or called, returns the wrong type, the wrong
    output width or probabilities instead of logits, and a ``SpecError`` when the
    spec's framework is not installed. Built-in models (``linear``, ``mlp``) need no
    more and import no framework; a user model imports it (the run needs it anyway).
    """
    from tensorstream.backends import make_backend, missing_framework

    if (missing := missing_framework(spec.backend)) is not None:  # found without importing it
        raise SpecError(missing)
    if spec.model.kind in ("linear", "mlp"):
        return []

    width, known = feature_width(spec)
    backend = make_backend(spec.backend)  # the framework's import errors name the missing extra
    # An inference spec without a label section takes its output width from the checkpoint: 2 stands in
    n_outputs, task = (spec.label.n_outputs, spec.label.task) if spec.label else (2, "")
    try:
        backend.check_user_model(spec.model, width, n_outputs, task)  # type: ignore[attr-defined]
    except ModelCheckError as err:
        if not err.width_dependent:
            raise
        # Not an error yet: listed fields may hold arrays (tensor frames, JSON lists), so even a width the
        # spec implies can be wrong; a failure that a wrong width could cause waits for the real one.
        why = ("the fields the spec lists, if they hold single numbers" if known
               else "a stand-in: numeric: ['*'] takes its width from the first record")
        msg = f"{err} (checked with {width} features, {why}; checked again at the first record, then an error)"
        warn_once(msg)
        return [msg]
    return []
