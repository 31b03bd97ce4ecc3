"""The bench machinery: verbosity counting, and `tensorstream bench` end to end on a tiny run.

No timing assertions here: speed is measured by ``benchmarks/``, not asserted by tests.
"""

from __future__ import annotations

import json
import re
import struct
import textwrap
import uuid
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tensorstream.bench.runner import parse_variants, variant_spec
from tensorstream.bench.verbosity import builtin_verbosity, code_lines, definition_source, factory_verbosity
from tensorstream.cli import app
from tensorstream.examples import example_spec

SAMPLE = textwrap.dedent('''\
    """Module docstring: not code."""

    import math  # a trailing comment: the line is code


    def area(r):
        """Docstring,
        over two lines."""
        # a comment line
        return (math.pi *
                r ** 2)


    class Shape:
        """Class docstring."""

        sides = 0

        def describe(self):
            text = """a string that is
    not a docstring"""
            return text
    ''')


def test_code_lines_counts_code_only(tmp_path: Path):
    path = tmp_path / "sample.py"
    path.write_text(SAMPLE)
    # import; def area + 2 lines of return; class; sides; def describe; 2-line string; return
    assert code_lines(SAMPLE) == 10
    assert code_lines(definition_source(path, "area")) == 3
    assert code_lines(definition_source(path, "Shape.describe")) == 4
    assert code_lines("# only a comment\n\n") == 0


def test_verbosity_of_the_shipped_backends_and_a_user_factory():
    for backend in ("torch", "tensorflow"):
        v = builtin_verbosity(backend)
        assert v["model"] > 0 and v["training"] > 0 and v["total"] == v["model"] + v["training"]
        assert any(c.endswith(":_builtin") for c in v["counted"])
    v = factory_verbosity("fixtures_models:make_torch_mlp", "torch")
    assert v["model"] == 3  # def, import, return
    assert v["training"] == builtin_verbosity("torch")["training"]


def test_variant_specs_are_isolated():
    base = example_spec("phishing.yaml")
    spec = variant_spec(base, parse_variants("tensorflow-xla")[0], "infer", "t1", weights="/x.safetensors",
                        state_dir="/tmp/s")
    assert (spec.backend, spec.mode, spec.model.compile, spec.model.threads) == ("tensorflow", "infer", True, 1)
    assert spec.model.weights == "/x.safetensors" and spec.source.auto_offset_reset == "earliest"
    assert spec.sink.topic != base.sink.topic and spec.name != base.name


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100 and data.rstrip().endswith(b"IEND\xaeB`\x82")


_NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?×?$")


def _table_rows(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_bench_command_tiny_run(broker, tmp_path: Path, monkeypatch):
    # shorter group joins on the embedded broker (it waits for the session timeout)
    monkeypatch.setenv("TENSORSTREAM_SESSION_TIMEOUT_MS", "2000")
    monkeypatch.setenv("TENSORSTREAM_HEARTBEAT_INTERVAL_MS", "300")
    spec = yaml.safe_load((Path(example_spec.__code__.co_filename).parent / "phishing.yaml").read_text())
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    spec["source"]["topic"] = topic
    spec["sink"]["topic"] = f"{topic}.predictions"
    spec_path = tmp_path / "phishing.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["bench", str(spec_path), "--produce", "river:Phishing", "--records", "300",
                                   "--variants", "torch,tensorflow", "-b", broker.bootstrap_servers,
                                   "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "report:" in res.stdout

    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy-phishing.png", "latency-phishing.png", "memory-phishing.png",
                    "throughput-phishing.png", "verbosity.png", "warmup-phishing.png"]
    assert all(_is_png(out / p) for p in pngs)
    for p in pngs:
        assert f"]({p})" in report  # every plot is embedded in the report

    # every axis has a number, for every variant
    speed = _table_rows(report, "| variant | train rec/s")
    assert [r[0] for r in speed] == ["PyTorch eager", "TensorFlow tf.function"]
    for row in speed:
        cells = [x.strip() for c in row[1:] for x in c.split("/")]  # "p50 / p99" cells hold two numbers
        assert len(cells) == 15 and all(_NUMBER.match(c) for c in cells), row
    acc = _table_rows(report, "| variant | accuracy")
    assert len(acc) == 2 and all(_NUMBER.match(c) for r in acc for c in r[1:])
    verb = _table_rows(report, "| framework | model")
    assert {r[0] for r in verb} == {"torch", "tensorflow"} and all(r[2].isdigit() and r[4].isdigit() for r in verb)

    results = json.loads((out / "results.json").read_text())
    (stream,) = results["streams"]
    for row in stream["variants"].values():
        assert row["train"]["records"] == row["infer"]["records"] == 300
        assert 0.5 < row["train"]["metrics"]["accuracy"] <= 1.0
        assert row["check"]["checked"] == 300  # predictions topic re-scored against the labels
        assert row["train"]["rss_samples"] and row["infer"]["latency_quantiles_ms"]
