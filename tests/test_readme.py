"""The README a newcomer follows: its Python quickstart runs verbatim, its spec is valid and runs, its
command table is complete, its layout lists every package once, its links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tensorstream.cli import app
from tensorstream.data.produce import produce_records
from tensorstream.pipeline import Pipeline
from tensorstream.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PACKAGE = ROOT / "src" / "tensorstream"


def blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start: end if end > 0 else None]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def test_the_python_quickstart_runs_verbatim_and_prints_what_the_readme_says(tmp_path):
    (code,) = blocks("python")  # the one Python block: the quickstart
    script = tmp_path / "quickstart.py"
    script.write_text(code)  # our own README, run as a file: no user string is executed
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    printed = p.stdout.strip()
    assert re.fullmatch(r"1250 records, accuracy 0\.\d{3}", printed), p.stdout
    assert f"It prints `{printed}`" in README  # the README shows the real output
    assert float(printed.rsplit(" ", 1)[1]) >= 0.85
    assert "Traceback" not in p.stderr and "oneDNN" not in p.stderr


def test_import_tensorstream_loads_no_framework_and_no_kafka_client():
    code = ("import sys, tensorstream\n"
            "assert callable(tensorstream.Pipeline) and tensorstream.PipelineSpec and tensorstream.KafkaConfig\n"
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    p = subprocess.run([sys.executable, "-c", "import sys, tensorstream; print('confluent_kafka' in sys.modules)"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "False"


def test_the_complete_spec_is_valid_and_runs(kafka_config, topic_factory, tmp_path):
    (spec_yaml,) = blocks("yaml", section("A complete spec"))
    data = yaml.safe_load(spec_yaml)
    spec = parse_spec(data, origin="(README)")
    assert {"source", "sink", "features", "label", "model", "batch", "checkpoint"} <= set(data)
    topic = topic_factory(1, prefix="readme")
    produce_records(kafka_config, "river:Phishing", topic, limit=400)
    spec = spec.model_copy(update={"name": f"readme-{topic[-6:]}", "state_dir": str(tmp_path),
                                   "source": spec.source.model_copy(update={"topic": topic}),
                                   "sink": spec.sink.model_copy(update={"topic": f"{topic}.predictions"})})
    result = Pipeline(spec, kafka_config).run(until_end=True, timeout=120)
    assert result.records == 400 and result.metrics["accuracy"] > 0.8


def test_the_two_quickstart_commands_are_unchanged():
    assert "bash scripts/demo.sh      # set up .venv (idempotent) and run the demo on an embedded broker" in README
    assert "bash scripts/test.sh      # set up .venv (idempotent) and run the whole test suite" in README
    for script in ("demo.sh", "test.sh"):
        assert (ROOT / "scripts" / script).exists()


def test_the_command_table_names_every_command():
    table = section("Commands")
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    assert len(names) >= 13
    for name in names:
        assert f"`tensorstream {name}" in table, f"`tensorstream {name}` is missing from the README's command table"


def test_the_layout_lists_every_package_once():
    table = section("Layout")
    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert "backends" in packages and "delivery" in packages
    for name in packages:
        assert table.count(f"| `{name}/` |") == 1, name
    listed = re.findall(r"^\| `(\w+)/` \|", table, flags=re.M)
    assert sorted(listed) == packages  # and nothing that does not exist


def test_results_block_guarantees_and_limits():
    begin, end = README.count("<!-- results:begin -->"), README.count("<!-- results:end -->")
    assert begin == end == 1 and README.index("<!-- results:begin -->") < README.index("<!-- results:end -->")
    guarantees = section("Guarantees")
    for words in ("flush", "exactly-once", "at-least-once", "exactly_once: true", "sticky", "second one forces"):
        assert words in guarantees, words
    limits = section("Known limits")
    assert "OFFSET_OUT_OF_RANGE" in limits and "rebalance" in limits


def test_every_link_resolves_and_every_doc_is_linked():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    for link in links:
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).exists(), link
    docs = section("Documentation")
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in docs, f"docs/{doc.name} is not in the README's documentation list"
