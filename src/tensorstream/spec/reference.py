"""The spec reference (``docs/spec-reference.md``), generated from the pydantic models.

Walks :class:`~tensorstream.spec.PipelineSpec` and every section under it: each
field with its YAML name, type (and bounds), default, an example and a
description, taken from the ``#:`` comment lines above the field in the source
(or a comment at the end of its line). Regenerate after changing a spec model::

    python -m tensorstream.spec.reference --write docs/spec-reference.md

``tests/test_spec_reference.py`` fails while the committed file differs.

>>> from tensorstream.spec import BatchSpec, BoostSpec
>>> [(f.name, f.doc[:24]) for f in fields_of(BoostSpec)]
[('factor', 'the learning rate right '), ('records', 'learned records over whi')]
>>> type_text(BatchSpec.model_fields["max_size"])
'integer, ≥ 1, ≤ 65,536'
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tensorstream.spec import PipelineSpec

#: examples where neither the choices nor the default make a telling one (by YAML path; ``*`` any section)
EXAMPLES: dict[str, Any] = {
    "name": "phishing",
    "source.topic": "phishing",
    "source.group_id": "phishing-trainers",
    "source.frame_field": "x",
    "source.schema": "schemas/click.avsc",
    "source.fetch_wait_ms": 5,
    "*.schema_registry.url": "http://registry:8081",
    "*.schema_registry.config": {"ssl.ca.location": "/etc/ssl/ca.pem"},
    "sink.topic": "phishing.predictions",
    "sink.subject": "phishing.predictions-value",
    "features.numeric": ["amount", "user.age"],
    "features.categorical": ["country"],
    # stateful features (docs/features.md)
    "features.key": "card",
    "features.lags": {"amount": 3},
    "features.time_features": ["hour_of_day", "day_of_week"],
    "features.windows.field": "amount",
    "features.windows.size": 3_600_000,
    "features.windows.hop": 600_000,
    "features.windows.aggs": ["count", "mean", "max"],
    "features.state.ttl": 604_800_000,
    "features.state.max_keys": 1_000_000,
    "features.state.path": "/var/lib/tensorstream/keyed-state",
    "label.field": "y",
    "label.classes": [False, True],
    "label.max_classes": 10,
    "model.kind": "my_models:make",
    "model.hidden": [64, 32],
    "model.threads": 1,
    "model.weights": "state.safetensors",
    "model.optimizer.lr": 0.001,
    "model.optimizer.momentum": 0.9,
    "model.optimizer.weight_decay": 0.0001,
    "checkpoint.url": "s3://bucket/tensorstream/phishing",
    "labels.topic": "clicks.labels",
    "labels.key_field": "order_id",
    "labels.field": "clicked",
    "distributed.world_size": 2,
    "distributed.rank": 0,
    "distributed.master_addr": "10.0.0.1",
    "distributed.master_port": 29500,
    "distributed.workers": ["10.0.0.1:29600", "10.0.0.2:29600"],
    "state_dir": "/var/lib/tensorstream",
    "versions.key_env": "MODELS_HMAC_KEY",
}


#: descriptions of fields whose source has no ``#:`` comment yet (a comment in the source wins)
FALLBACK_DOCS: dict[str, str] = {
    "features.numeric": "numeric fields (numbers, booleans, or arrays of numbers) in this order; `[\"*\"]`: every "
                        "numeric top-level field but the label, in sorted name order, fixed at the first record",
    "features.categorical": "fields whose values are categories (strings, numbers or booleans, compared by their "
                            "text form), each one-hot encoded or hashed into its own slots",
    "features.categorical_encoding": "`onehot`: a growing vocabulary of `max_categories` slots plus one overflow "
                                     "slot per field; `hash`: `hash_buckets` slots per field, no vocabulary",
}


@dataclass
class Row:
    name: str  # the YAML key (a field's alias when it has one)
    info: FieldInfo
    doc: str


def yaml_value(v: Any) -> str:
    """A value as YAML flow text (JSON is YAML): ``true``, ``null``, ``"x"``, ``[1, 2]``."""
    return json.dumps(v, ensure_ascii=False)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _comments(cls: type) -> tuple[list[str], dict[int, list[str]], dict[int, str]]:
    """The class source's lines, ``#:`` blocks by the line after them, end-of-line comments by line."""
    src = inspect.getsource(cls)
    lines = src.splitlines()
    blocks: dict[int, list[str]] = {}
    block: list[str] = []
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#:"):
            block.append(stripped[2:].strip())
        else:
            if block and stripped:
                blocks[i] = block
            block = [] if stripped or not block else block
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and not tok.string.startswith("#:"):
            line = lines[tok.start[0] - 1]
            if line[: tok.start[1]].strip():  # code before it: an end-of-line comment
                trailing[tok.start[0]] = tok.string[1:].strip()
    return lines, blocks, trailing


def fields_of(cls: type[BaseModel]) -> list[Row]:
    """The fields of ``cls`` in source order, each with its description."""
    import ast

    lines, blocks, trailing = _comments(cls)
    tree = ast.parse("\n".join(lines)).body[0]
    assert isinstance(tree, ast.ClassDef)
    own: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            end = node.end_lineno or node.lineno
            doc = " ".join(blocks.get(node.lineno, [])) or trailing.get(end, "") or trailing.get(node.lineno, "")
            own[node.target.id] = doc
    rows = []
    for name, info in cls.model_fields.items():
        rows.append(Row(info.alias or name, info, own.get(name, "")))
    return rows


def _bound(meta: Any) -> str | None:
    for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        v = getattr(meta, attr, None)
        if v is not None:
            return f"{sym} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{sym} {v:g}"
    if getattr(meta, "min_length", None) is not None:
        return "non-empty" if meta.min_length == 1 else f"at least {meta.min_length} long"
    if getattr(meta, "max_length", None) is not None:
        return f"at most {meta.max_length} characters"
    if getattr(meta, "pattern", None):
        return f"matching `{meta.pattern}`"
    return None


_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null", Any: "any"}


def _type_name(t: Any, anchors: dict[type, tuple[str, str]]) -> str:
    if t in _NAMES:
        return _NAMES[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return "one of " + ", ".join(f"`{yaml_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, anchors) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0], anchors)}"
    if origin is dict:
        return f"mapping of {_type_name(args[0], anchors)} to {_type_name(args[1], anchors)}"
    if isinstance(t, type) and issubclass(t, BaseModel):
        if t not in anchors:
            return t.__name__
        return f"section [`{anchors[t][1] or 'top level'}`](#{anchors[t][0]})"
    return getattr(t, "__name__", str(t))


def type_text(info: FieldInfo, anchors: dict[type, tuple[str, str]] | None = None) -> str:
    """``integer, ≥ 1`` and the like."""
    bounds = [b for m in info.metadata if (b := _bound(m))]
    return ", ".join([_type_name(info.annotation, anchors or {}), *bounds])


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return "its defaults" if isinstance(value, BaseModel) else f"`{yaml_value(value)}`"
    if info.default is PydanticUndefined:
        return "**required**"
    return f"`{yaml_value(info.default)}`"


def _example(path: str, section: str, row: Row) -> Any:
    key = row.name
    for k in (path, f"*.{section.rpartition('.')[2]}.{key}" if section else "", f"*.{key}"):
        if k in EXAMPLES:
            return EXAMPLES[k]
    info = row.info
    default = None if info.default is PydanticUndefined or info.default_factory is not None else info.default
    for t in [info.annotation, *typing.get_args(info.annotation)]:
        if typing.get_origin(t) is Literal:
            others = [a for a in typing.get_args(t) if a != default]
            return others[0] if others else default
    if bool in (info.annotation, *typing.get_args(info.annotation)):
        return not default
    if default is not None:
        return default
    for m in info.metadata:  # a number at its lower bound
        for attr in ("ge", "gt"):
            if getattr(m, attr, None) is not None:
                return getattr(m, attr)
    return "..."


def example_text(path: str, section: str, row: Row) -> str:
    if _models_in(row.info.annotation):
        return "below"
    return f"`{row.name}: {yaml_value(_example(path, section, row))}`"


def _escape(text: str) -> str:
    """Markdown text: ``<name>`` outside code spans would be an HTML tag (and vanish)."""
    parts = text.replace("``", "`").split("`")  # reStructuredText ``code`` -> Markdown `code`
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _cell(text: str) -> str:
    return _escape(text).replace("|", "\\|").replace("\n", " ")


def sections(root: type[BaseModel] = PipelineSpec) -> list[tuple[list[str], type[BaseModel]]]:
    """``([path, ...], model)`` for every section, depth first; a model used at several paths once."""
    found: dict[type[BaseModel], list[str]] = {}

    def walk(cls: type[BaseModel], path: str) -> None:
        first = cls not in found
        found.setdefault(cls, []).append(path)
        if first:
            for row in fields_of(cls):
                for sub in _models_in(row.info.annotation):
                    walk(sub, f"{path}.{row.name}" if path else row.name)

    walk(root, "")
    return [(paths, cls) for cls, paths in found.items()]


def _anchor(path: str) -> str:
    return "top-level" if not path else path.replace(".", "-").replace("_", "-")


def _doc(cls: type[BaseModel]) -> str:
    doc = cls.__dict__.get("__doc__")
    return _escape(inspect.cleandoc(doc)) if doc else ""


def _summary(cls: type[BaseModel]) -> str:
    """The docstring's first sentence, on one line."""
    first = " ".join(_doc(cls).split("\n\n")[0].split())
    end = first.find(". ")
    return first if end < 0 else first[: end + 1]


INTRO = """\
# Pipeline spec reference

<!-- Generated by `python -m tensorstream.spec.reference --write docs/spec-reference.md` from the pydantic
models in src/tensorstream/spec/; tests/test_spec_reference.py fails while this file is out of date. -->

Every field of a pipeline spec: its type, default, an example and what it does.
A spec is YAML (`tensorstream run pipeline.yaml`) or the same mapping in Python
(`tensorstream.PipelineSpec.model_validate({...})`). It is validated before
anything connects; unknown keys are errors (a typo is never ignored), and every
error names the field (`model.optimizer.lr: Input should be greater than 0`).
A complete example is in the [README](../README.md#a-complete-spec); more in
[`src/tensorstream/examples/`](../src/tensorstream/examples).

Generated from the models in `src/tensorstream/spec/`: regenerate with
`python -m tensorstream.spec.reference --write docs/spec-reference.md`.
"""


def render(root: type[BaseModel] = PipelineSpec) -> str:
    """The whole reference, as Markdown."""
    secs = sections(root)
    anchors = {cls: (_anchor(paths[0]), paths[0]) for paths, cls in secs}
    out = [INTRO, "## Sections\n"]
    for paths, cls in secs:
        label = paths[0] or "top level"
        out.append(f"- [`{label}`](#{anchors[cls][0]})" + (f": {_summary(cls)}" if _doc(cls) else ""))
    out.append("")
    for paths, cls in secs:
        title = ", ".join(f"`{p}`" for p in paths) if paths[0] else "Top level"
        out += [f'<a id="{anchors[cls][0]}"></a>', "", f"## {title}", ""]
        if _doc(cls):
            out += [_doc(cls), ""]
        out += [f"`{cls.__name__}`: " + ("fields of the spec itself." if not paths[0] else
                                         f"fields under `{paths[0]}:`" + (" (the same section at each path)."
                                                                         if len(paths) > 1 else ".")), ""]
        out += ["| field | type | default | example | description |", "|---|---|---|---|---|"]
        for row in fields_of(cls):
            path = f"{paths[0]}.{row.name}" if paths[0] else row.name
            out.append("| " + " | ".join(_cell(c) for c in (
                f"`{row.name}`", type_text(row.info, anchors), default_text(row.info),
                example_text(path, paths[0], row), row.doc or FALLBACK_DOCS.get(path, ""))) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorstream.spec.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the reference to this file (default: print it)")
    parser.add_argument("--check", type=Path, help="exit 1 if this file differs from the generated reference")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.check.exists() or args.check.read_text() != text:
            print(f"{args.check} is out of date: python -m tensorstream.spec.reference --write {args.check}",
                  file=sys.stderr)
            return 1
        return 0
    if args.write:
        args.write.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
