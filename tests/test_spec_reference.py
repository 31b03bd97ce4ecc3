"""docs/spec-reference.md is generated from the spec models, complete and current."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import TypeAdapter

import tensorstream.spec.reference as reference
from tensorstream.spec.reference import _example, fields_of, render, sections

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "spec-reference.md"
REGENERATE = "python -m tensorstream.spec.reference --write docs/spec-reference.md"


def test_the_committed_reference_is_current():
    assert DOC.read_text() == render(), f"docs/spec-reference.md is out of date: run `{REGENERATE}`"


def test_every_field_has_a_row_a_description_and_a_valid_example():
    text = DOC.read_text()
    for paths, cls in sections():
        for row in fields_of(cls):
            path = f"{paths[0]}.{row.name}" if paths[0] else row.name
            assert f"| `{row.name}` |" in text, path
            assert row.doc or path in reference.FALLBACK_DOCS, \
                f"{path} has no description: add a `#:` comment line above it in src/tensorstream/spec/"
            if reference._models_in(row.info.annotation):
                continue  # a section: its own table follows
            value = _example(path, paths[0], row)
            assert value != "...", f"{path} has no example: add one to EXAMPLES in tensorstream/spec/reference.py"
            line = reference.example_text(path, paths[0], row).strip("`")
            assert yaml.safe_load(line) == {row.name: value}, line  # the example is YAML as written
            typ = Annotated[row.info.annotation, *row.info.metadata] if row.info.metadata else row.info.annotation
            TypeAdapter(typ).validate_python(value)


def test_the_reference_names_every_section_and_the_regeneration_command():
    text = DOC.read_text()
    assert REGENERATE in text
    for paths, _ in sections():
        for p in paths:
            assert (f"`{p}`" if p else "## Top level") in text
    assert "`model.optimizer`" in text and "`source.schema_registry`, `sink.schema_registry`" in text


def test_check_mode_says_how_to_regenerate(tmp_path):
    stale = tmp_path / "spec-reference.md"
    stale.write_text("old\n")
    p = subprocess.run([sys.executable, "-m", "tensorstream.spec.reference", "--check", str(stale)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--write" in p.stderr
    assert reference.main(["--write", str(stale)]) == 0 and reference.main(["--check", str(stale)]) == 0


def test_doctests():
    assert doctest.testmod(reference).failed == 0
