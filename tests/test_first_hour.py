"""The first hour of a new user, against the real broker: every mistake fails fast, non-zero, in one
sentence; a run that did nothing says so; results go to stdout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from procutil import write_spec
from tensorstream.cli import app
from tensorstream.data.produce import produce_records
from tensorstream.examples import example_spec

runner = CliRunner()


def _spec_file(tmp_path, topic: str, name: str, **changes) -> str:
    base = example_spec("phishing.yaml")
    spec = base.model_copy(update={"name": name, "state_dir": str(tmp_path / "state"),
                                   "source": base.source.model_copy(update={"topic": topic}),
                                   "sink": base.sink.model_copy(update={"topic": topic + ".pred"}),
                                   "batch": base.batch.model_copy(update={"max_size": 32})})
    data = spec.model_dump(mode="json", exclude_none=True)
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)


def _run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_a_misspelt_label_field_stops_the_run_and_names_the_fields(broker, kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix="typo")
    produce_records(kafka_config, "river:Phishing", topic)
    path = _spec_file(tmp_path, topic, f"typo-{topic[-6:]}", **{"label.field": "lable"})
    res = _run("run", path, "-b", broker.bootstrap_servers, "--until-end")
    assert res.exit_code == 1, res.output
    assert re.search(r"error: none of the first \d+ records has the label field 'lable'", res.output)
    assert "records have:" in res.output and "empty_server_form_handler" in res.output  # the real fields
    assert "Traceback" not in res.output


def test_a_missing_source_topic_fails_before_anything_starts(broker, tmp_path):
    path = _spec_file(tmp_path, "no-such-topic-x1", "missing-topic")
    t = time.monotonic()
    res = _run("run", path, "-b", broker.bootstrap_servers, "--until-end")
    assert res.exit_code == 1 and time.monotonic() - t < 15
    assert "source topic 'no-such-topic-x1' does not exist" in res.output and "source.create" in res.output
    path = _spec_file(tmp_path, "created-topic-x1", "create-topic", **{"source.create": True})
    res = _run("run", path, "-b", broker.bootstrap_servers, "--until-end", "--allow-empty")
    assert res.exit_code == 0, res.output  # created, empty, and that was allowed


def test_a_run_that_read_nothing_says_so(broker, kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix="nothing")
    produce_records(kafka_config, "river:Phishing", topic, limit=300)
    name = f"nothing-{topic[-6:]}"
    path = _spec_file(tmp_path, topic, name)
    first = _run("run", path, "-b", broker.bootstrap_servers, "--until-end", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["records"] == 300
    # another state dir (or backend) on the same group: the group already committed everything
    again = _run("run", path, "-b", broker.bootstrap_servers, "--until-end", "--state-dir", str(tmp_path / "other"))
    assert again.exit_code == 1, again.output
    assert "read no record" in again.output and f"tensorstream.{name}" in again.output
    assert "already committed offsets" in again.output  # said at the start, not only at the end


def test_results_go_to_stdout_with_integer_counts(broker, kafka_config, topic_factory, tmp_path):
    topic = topic_factory(1, prefix="stdout")
    produce_records(kafka_config, "river:Phishing", topic, limit=200)
    res = _run("run", _spec_file(tmp_path, topic, f"stdout-{topic[-6:]}"), "-b", broker.bootstrap_servers,
               "--until-end")
    assert res.exit_code == 0, res.output
    lines = dict(line.split(None, 1) for line in res.stdout.splitlines() if line.strip())
    assert lines["records"] == "200" and lines["n_scored"] == "200" and lines["dead_letters"] == "0"
    assert 0.0 <= float(lines["accuracy"]) <= 1.0
    assert "done" not in res.stdout  # chatter stays on stderr


@pytest.mark.parametrize("command", [["run", "SPEC", "--until-end"], ["produce", "river:Phishing", "-t", "x"],
                                     ["consume", "x"]])
def test_broker_down_fails_within_seconds_in_a_few_lines(command, tmp_path):
    spec = write_spec(example_spec("phishing.yaml"), tmp_path / "s.yaml")
    args = [str(spec) if a == "SPEC" else a for a in command]
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tensorstream", *args, "-b", "127.0.0.1:1"], capture_output=True,
                       text=True, timeout=60)
    took = time.monotonic() - t
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == 1 and took < 10, (took, lines)
    assert len(lines) < 10, lines
    assert "cannot reach a Kafka broker at 127.0.0.1:1" in p.stderr and "Connection refused" in p.stderr
