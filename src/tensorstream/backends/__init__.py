"""Framework backends behind one protocol: numpy arrays in, numpy arrays out.

Importing this package imports neither torch nor tensorflow; ``make_backend``
imports only the framework it is asked for. User models (``model.kind:
"pkg.module:factory"``) are found and checked by :mod:`~tensorstream.backends.check`
(``check_model(spec)`` before the first record; docs/custom-models.md).

State names (``get_state``), shared by both frameworks for the built-in models:

- ``model/{layer}.kernel`` ``[in, out]`` and ``model/{layer}.bias``; user models
  keep their own names (torch: ``state_dict`` keys and layout; keras:
  ``{weight index}.{variable name}``).
- ``optim/step``; Adam ``optim/{weight}.m`` and ``.v`` (same meaning in both);
  SGD momentum ``optim/{weight}.momentum`` (torch's buffer) or ``.velocity``
  (keras', = -lr * buffer), converted when loaded into the other framework.

>>> make_backend("jax")
Traceback (most recent call last):
...
ValueError: unknown backend 'jax': choose 'torch' or 'tensorflow'
"""

from __future__ import annotations

import importlib
import importlib.util

from tensorstream.backends.base import Backend
from tensorstream.backends.check import ModelCheckError, check_model

__all__ = ["BACKENDS", "Backend", "ModelCheckError", "check_model", "make_backend", "missing_framework"]

# name -> (module, class, the top-level packages it needs, the pip extra providing them)
_REGISTRY = {
    "torch": ("tensorstream.backends.torch", "TorchBackend", ("torch",), "torch"),
    "tensorflow": ("tensorstream.backends.tensorflow", "TensorflowBackend", ("tensorflow", "keras"), "tensorflow"),
}
BACKENDS = tuple(_REGISTRY)
# Data-parallel variants, chosen by tensorstream.pipeline.distributed (a spec names the
# framework, not these): same models and state names, collective train steps.
_REGISTRY.update({
    "torch-ddp": ("tensorstream.backends.torch_ddp", "TorchDDPBackend", ("torch",), "torch"),
    "tensorflow-multiworker": ("tensorstream.backends.tensorflow_multiworker", "TensorflowMultiWorkerBackend",
                               ("tensorflow", "keras"), "tensorflow"),
})


def missing_framework(name: str) -> str | None:
    """One sentence if ``name``'s framework is not installed (looked up, not imported), else None.

    >>> missing_framework("torch") is None
    True
    """
    _, _, needs, extra = _REGISTRY[name]
    absent = [n for n in needs if importlib.util.find_spec(n) is None]
    if not absent:
        return None
    return f"backend {name!r} needs {absent[0]!r}, which is not installed: pip install 'tensorstream[{extra}]'"


def make_backend(name: str) -> Backend:
    """A new, unbuilt backend for ``name``; call ``build(...)`` on it next."""
    try:
        module_name, class_name, needs, extra = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose 'torch' or 'tensorflow'") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in needs:
            raise
        raise ImportError(
            f"backend {name!r} needs {err.name!r}, which is not installed: pip install 'tensorstream[{extra}]'"
        ) from err
    return getattr(module, class_name)()
