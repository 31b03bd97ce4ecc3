"""Quiet, honest output: no TensorFlow start-up lines (unless asked for), pure JSON log lines with
``--log-format json``, and tables that are not cut or padded when piped."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from procutil import write_spec
from tensorstream.cli.demo import SUMMARY_NOTE, SUMMARY_TITLE, print_summary
from tensorstream.data.produce import produce_records
from tensorstream.examples import example_spec

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TENSORSTREAM_FRAMEWORK_LOGS")}
    full.update(PYTHONPATH=str(ROOT / "src"), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_importing_tensorflow_through_tensorstream_prints_nothing():
    quiet = _python("import tensorstream.backends.tensorflow, tensorstream.tensorflow")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = _python("import tensorstream.backends.tensorflow", TENSORSTREAM_FRAMEWORK_LOGS="1")
    assert loud.returncode == 0
    if not loud.stderr:
        pytest.skip("this TensorFlow build prints nothing at import: nothing to silence")


def test_verbose_text_logs_ask_for_the_framework_logs_and_json_logs_never_do():
    code = ("import os\nfrom tensorstream.cli.common import setup_logging\nsetup_logging({args})\n"
            "print(os.environ.get('TENSORSTREAM_FRAMEWORK_LOGS'))")
    assert _python(code.format(args="True")).stdout.strip() == "1"  # inherited by child processes too
    assert _python(code.format(args="True, 'json'")).stdout.strip() == "None"
    assert _python(code.format(args="False")).stdout.strip() == "None"


def test_what_a_failing_import_said_is_not_lost():
    body = ("import os\nfrom tensorstream.backends.frameworks import quiet_framework_import\n"
            "with quiet_framework_import():\n    os.write(2, b'absl noise\\n')\n{after}")
    ok = _python(body.format(after="print('imported')"))
    assert ok.stdout == "imported\n" and ok.stderr == ""
    failed = _python(body.format(after="    raise ImportError('libcudart.so: cannot open')"))
    assert failed.returncode == 1
    assert "absl noise" in failed.stderr and "libcudart.so: cannot open" in failed.stderr


def test_json_logs_stay_json_lines_with_tensorflow_and_verbose(broker, kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix="jsonlogs")
    produce_records(kafka_config, "river:Phishing", topic, limit=200)
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={"name": f"jsonlogs-{topic[-6:]}", "backend": "tensorflow",
                                   "state_dir": str(tmp_path / "state"),
                                   "source": base.source.model_copy(update={"topic": topic}),
                                   "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
                                   "batch": base.batch.model_copy(update={"max_size": 32})})
    path = write_spec(spec, tmp_path / "spec.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TENSORSTREAM_FRAMEWORK_LOGS")}
    env["PYTHONPATH"] = str(ROOT / "src")
    p = subprocess.run([sys.executable, "-m", "tensorstream", "--log-format", "json", "-v", "run", str(path),
                        "-b", broker.bootstrap_servers, "--until-end", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines, "no log lines at all"
    for line in lines:
        assert isinstance(json.loads(line), dict), line  # a JSON object per line, nothing else
    assert any(json.loads(line).get("msg", "").startswith("done ") for line in lines)
    assert json.loads(p.stdout)["records"] == 200  # results on stdout


RESULTS = {
    "agrawal_drift/torch": {"metrics": {"accuracy": 0.9095}, "check": {"before": 0.9072, "after": 0.9118},
                            "records_per_s": 6033.2, "latency_p50_ms": 1.08, "latency_p99_ms": 1.93,
                            "peak_rss_mb": 848.0},
    "phishing/tensorflow": {"error": "worker exited with code 1"},
}


def test_the_demo_table_piped_is_whole_and_not_padded():
    buf = io.StringIO()
    print_summary(RESULTS, Console(file=buf, width=1000))  # what cli.common gives a pipe
    lines = buf.getvalue().splitlines()
    assert lines[0] == SUMMARY_TITLE and lines[-1] == SUMMARY_NOTE  # whole lines, not wrapped to the table
    assert all(line == line.rstrip() for line in lines)
    assert any("agrawal_drift" in line and "6,033" in line and "0.9118" in line for line in lines)
    assert any("worker exited with code 1" in line for line in lines)
    buf = io.StringIO()
    print_summary(RESULTS, Console(file=buf, width=1000), as_json=True)
    assert json.loads(buf.getvalue())["agrawal_drift/torch"]["metrics"]["accuracy"] == 0.9095


def test_the_demo_table_on_a_terminal_keeps_its_title_and_note():
    buf = io.StringIO()
    print_summary(RESULTS, Console(file=buf, width=200, force_terminal=True, color_system=None))
    text = buf.getvalue()
    assert SUMMARY_TITLE in text and "p50/p99: per-record latency" in text


def test_produce_progress_is_chatter_not_results(broker, topic_factory, tmp_path):
    from typer.testing import CliRunner

    from tensorstream.cli import app
    from tensorstream.cli.common import setup_logging

    topic = topic_factory(1, prefix="producejson")
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={"name": f"producejson-{topic[-6:]}", "state_dir": str(tmp_path / "state"),
                                   "source": base.source.model_copy(update={"topic": topic}),
                                   "sink": base.sink.model_copy(update={"topic": topic + ".pred"})})
    path = write_spec(spec, tmp_path / "spec.yaml")
    res = CliRunner().invoke(app, ["run", str(path), "-b", broker.bootstrap_servers, "--produce", "river:Phishing",
                                   "--limit", "50", "--until-end", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["records"] == 50  # the progress bar went to stderr
    try:
        res = CliRunner().invoke(app, ["--log-format", "json", "produce", "river:Phishing", "-t", topic, "--limit",
                                       "10", "-b", broker.bootstrap_servers])
    finally:
        setup_logging(False)  # this process' logging as the other tests expect it
    assert res.exit_code == 0, res.output
    assert "━" not in res.output  # no progress bar with JSON logs
