"""API verbosity: how many lines it takes to define a model and train it, per framework.

Counted from the code that actually runs, never from a hand-written sample:
for the built-in models, the builder and the train-step code of
``tensorstream/backends/torch.py`` and ``tensorflow.py``; for a user factory
(``kind: "pkg.module:factory"``), that factory's source (plus the classes of its
own module that it names, e.g. the ``nn.Module`` it instantiates).

A line counts when it holds code: blank lines, comment-only lines and
docstrings do not count; a statement spread over three lines counts three.

>>> code_lines('''
... def f(x):
...     "Doc."
...     # a comment
...     y = (x +
...          1)  # trailing comment
...
...     return y
... ''')
4
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import io
import tokenize
from pathlib import Path
from typing import Any

_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENDMARKER, tokenize.ENCODING}

#: What "model definition" and "training definition" mean for the built-in
#: models: qualified names of functions in each backend module. ``build``
#: counts as training code: it creates the optimizer and (tensorflow) wraps
#: the steps in ``tf.function``; both are lines a user of the framework writes.
BUILTIN_CODE: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {
        "model": ("_builtin",),
        "training": ("TorchBackend.build", "TorchBackend.train_step"),
    },
    "tensorflow": {
        "model": ("_builtin",),
        "training": ("TensorflowBackend.build", "TensorflowBackend._train", "TensorflowBackend.train_step"),
    },
}
_BACKEND_MODULES = {"torch": "tensorstream.backends.torch", "tensorflow": "tensorstream.backends.tensorflow"}


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    return lines


def _fragment(source: str) -> tuple[str, int]:
    """``source`` made parseable, and how many stand-in lines were put before it."""
    if source.lstrip("\n")[:1] in (" ", "\t"):
        # a method cut out of its class: parse it inside a stand-in class (textwrap.dedent
        # would break multi-line strings whose continuation lines start at column 0)
        return "class _:\n" + source.lstrip("\n"), 1
    return source, 0


def code_lines(source: str) -> int:
    """Non-blank, non-comment, non-docstring lines of Python ``source``."""
    source, extra = _fragment(source)
    skip = _docstring_lines(ast.parse(source)) | set(range(1, extra + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in _NOT_CODE:
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - skip)


def _module_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the file without importing the framework
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    return Path(spec.origin)


def definition_source(path: Path, qualname: str) -> str:
    """Source of ``qualname`` (``func`` or ``Class.method``) in the file at ``path``, found with ``ast``."""
    text = path.read_text()
    nodes: list[ast.stmt] = ast.parse(text).body
    node: ast.stmt | None = None
    for part in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise LookupError(f"{qualname} not found in {path}")
        nodes = getattr(node, "body", [])
    assert node is not None
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return "\n".join(text.splitlines()[first - 1 : node.end_lineno])


def builtin_verbosity(backend: str) -> dict[str, Any]:
    """Lines of the built-in model's definition and of its training code in ``backend``'s module."""
    path = _module_path(_BACKEND_MODULES[backend])
    out: dict[str, Any] = {"backend": backend, "source": "built-in", "counted": []}
    for part, names in BUILTIN_CODE[backend].items():
        out[part] = sum(code_lines(definition_source(path, n)) for n in names)
        out["counted"] += [f"{path.name}:{n}" for n in names]
    out["total"] = out["model"] + out["training"]
    return out


def factory_verbosity(kind: str, backend: str) -> dict[str, Any]:
    """Lines of a user factory (``pkg.module:factory``) and of the backend's training code.

    The factory's module is imported (as the pipeline would import it); classes
    defined in that module and named inside the factory count too.
    """
    module_name, _, attr = kind.partition(":")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr)
    sources = [inspect.getsource(factory)]
    counted = [f"{module_name}:{attr}"]
    names = {n.id for n in ast.walk(ast.parse(_fragment(sources[0])[0])) if isinstance(n, ast.Name)}
    for name in sorted(names):
        obj = getattr(module, name, None)
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            sources.append(inspect.getsource(obj))
            counted.append(f"{module_name}:{name}")
    model = sum(code_lines(s) for s in sources)
    train = builtin_verbosity(backend)
    names_t = BUILTIN_CODE[backend]["training"]
    return {"backend": backend, "source": kind, "model": model, "training": train["training"],
            "total": model + train["training"],
            "counted": counted + [c for c in train["counted"] if c.split(":", 1)[1] in names_t]}


def verbosity(backend: str, kind: str) -> dict[str, Any]:
    """Model + training line counts for ``backend`` with model ``kind`` (built-in or factory)."""
    if kind in ("linear", "mlp"):
        return builtin_verbosity(backend)
    return factory_verbosity(kind, backend)
