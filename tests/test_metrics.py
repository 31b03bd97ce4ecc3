"""Prometheus metrics: scraped over HTTP from a real pipeline run through the embedded broker."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorstream.codecs import encode_json
from tensorstream.data.datasets import open_source
from tensorstream.examples import example_spec
from tensorstream.kafka import KafkaSink
from tensorstream.observe.metrics import METRICS, PipelineMetrics
from tensorstream.pipeline import Pipeline

BAD = {300: b"\xff not json", 600: b'{"is_popular": "high", "y": true}', 900: b"[1, 2]"}


def _scrape(url: str) -> dict[str, float]:
    """``{'name{label=value,...}': value}`` of the tensorstream samples."""
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("pipeline", "backend"))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_scraped_during_a_real_run(kafka_config, topic_factory, tmp_path):
    base = example_spec("phishing.yaml", backend="torch")
    src = topic_factory(1, prefix="metrics")
    spec = base.model_copy(update={
        "name": f"phishing-metrics-{src[-6:]}", "state_dir": str(tmp_path),
        "source": base.source.model_copy(update={"topic": src}),
        "sink": base.sink.model_copy(update={"topic": src + ".pred"}),
    })
    # River's Phishing (1250 records) 8 times, with 3 bad records in the middle: those go to the DLQ, counted
    # by type. 8 passes: the run must last a few seconds (the lag gauge is refreshed once a second).
    passes = 8
    with KafkaSink(kafka_config) as sink:
        for i, rec in enumerate(r for _ in range(passes) for r in open_source("river:Phishing")):
            if i in BAD:
                sink.produce(src, BAD[i], key=b"bad")
            sink.produce(src, encode_json(rec))
        sink.flush()
    n_good = 1250 * passes

    pipe = Pipeline(spec, kafka_config, metrics_port=0)  # port 0: a free one
    url = pipe.obs.url
    assert url and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(r=pipe.run(until_end=True, timeout=120)))
    runner.start()
    seen = []
    try:
        while runner.is_alive():
            seen.append(_scrape(url))
            time.sleep(0.25)
        runner.join()
        final = _scrape(url)  # the server outlives run(): a last scrape sees the final numbers
    finally:
        pipe.obs.close()
    r = result["r"]
    assert r.records == n_good + len(BAD) and r.bad == len(BAD) and r.predictions == n_good

    # The counters moved during the run (scraped while records were flowing) ...
    records_seen = [s.get("tensorstream_records_in_total{}", 0.0) for s in seen]
    assert any(0 < v < n_good for v in records_seen), records_seen
    assert records_seen == sorted(records_seen), "a counter never goes down"
    # ... and at the end match what was produced.
    assert final["tensorstream_records_in_total{}"] == n_good + len(BAD)
    assert final["tensorstream_predictions_total{}"] == n_good
    assert final["tensorstream_records_learned_total{}"] == n_good
    dlq = {k: v for k, v in final.items() if k.startswith("tensorstream_dead_letters_total")}
    assert sum(dlq.values()) == len(BAD)
    assert dlq["tensorstream_dead_letters_total{error_type=decode_error}"] >= 1
    assert final["tensorstream_batch_size_records_count{}"] == n_good + len(BAD)  # batch.max_size: 1
    assert final["tensorstream_batch_size_records_sum{}"] == n_good + len(BAD)
    assert final["tensorstream_batch_latency_seconds_count{}"] == final["tensorstream_batch_size_records_count{}"]
    assert final["tensorstream_end_to_end_latency_seconds_count{}"] == n_good + len(BAD)
    acc = final["tensorstream_prequential_metric{metric=accuracy,scope=overall}"]
    assert acc == pytest.approx(r.metrics["accuracy"]) and acc > 0.8
    assert "tensorstream_prequential_metric{metric=accuracy,scope=window}" in final
    assert "tensorstream_prequential_metric{metric=log_loss,scope=window}" in final
    assert final["tensorstream_train_loss{}"] >= 0
    assert final["tensorstream_commits_total{}"] >= 1
    assert final["tensorstream_checkpoints_total{}"] >= 1  # the final checkpoint (train mode)
    assert final[f"tensorstream_model_info{{version={pipe.model_version}}}"] == 1
    assert final["process_resident_memory_bytes{}"] > 0
    # Lag per partition was reported while the partition was assigned (refreshed once a second, so the
    # scrapes see a few values), only ever went down, and its series went away with the partition.
    lag_key = f"tensorstream_consumer_lag_records{{partition=0,topic={src}}}"
    lags = [s[lag_key] for s in seen if lag_key in s]
    assert lags and lags == sorted(lags, reverse=True) and max(lags) <= n_good + len(BAD), lags
    assert not [k for k in final if k.startswith("tensorstream_consumer_lag_records")]
    assert final["tensorstream_assigned_partitions{}"] == 0
    assert any(s.get("tensorstream_assigned_partitions{}") == 1 for s in seen)


def test_metric_names_follow_prometheus_conventions():
    m = PipelineMetrics("p", "torch", process_metrics=False)
    m.drift_detected("adwin", records=10)
    with m.checkpoint_timer("ckpt-1"):
        pass
    m.model_version_changed("v1", reason="load")
    m.model_version_changed("v2", reason="swap")
    m.on_rebalance("revoke", [("t", 0)])
    text = m.render().decode()
    names = {fam.name for fam in text_string_to_metric_families(text)}
    for name, kind, _labels, _help in METRICS:
        base = name.removesuffix("_total") if kind == "counter" else name  # the text format's family names
        assert base in names, name
        assert name.startswith("tensorstream_")
        assert (kind == "counter") == name.endswith("_total")
        if "latency" in name or "duration" in name:
            assert name.endswith("_seconds")
    for line in text.splitlines():
        if line.startswith("tensorstream_"):
            assert 'pipeline="p"' in line and 'backend="torch"' in line, line
    assert m.value("tensorstream_drift_events_total", detector="adwin") == 1
    assert m.value("tensorstream_checkpoints_total") == 1
    assert m.value("tensorstream_checkpoint_duration_seconds_count") == 1
    assert m.value("tensorstream_model_version_changes_total", reason="swap") == 1
    assert m.value("tensorstream_model_info", version="v2") == 1
    assert m.value("tensorstream_model_info", version="v1") is None  # one version at a time
    assert m.value("tensorstream_rebalances_total", kind="revoke") == 1
    kinds = [e["kind"] for e in m.recent_events()]
    assert kinds == ["drift", "checkpoint", "model_version"]
    # Two pipelines in one process: separate registries, no "duplicated timeseries" error.
    PipelineMetrics("p", "torch", process_metrics=False).on_predictions(5)
    assert m.value("tensorstream_predictions_total") == 0


def test_recent_latency_weights_records():
    m = PipelineMetrics("p", "torch", process_metrics=False)

    class R:
        timestamp_ms = None

    m.on_batch([R()] * 99, 0.010)
    m.on_batch([R()], 1.0)
    p50, p99 = m.recent_latency_ms()
    assert p50 == pytest.approx(10.0) and p99 == pytest.approx(10.0)
    m.on_batch([R()] * 10, 1.0)
    assert m.recent_latency_ms()[1] == pytest.approx(1000.0)


def test_run_with_json_logs_and_run_dir(broker, topic_factory, tmp_path):
    """``--log-format json``: stderr is JSON lines only (progress included); ``--run-dir`` records the run."""
    import json

    import yaml
    from typer.testing import CliRunner

    from tensorstream.cli import app

    topic = topic_factory(1, prefix="jsonlog")
    spec = example_spec("phishing.yaml").model_dump(mode="json", exclude_none=True)
    spec.update(name=f"jsonlog-{topic[-6:]}", source={**spec["source"], "topic": topic},
                sink={**spec["sink"], "topic": topic + ".pred"})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "--log-format", "json", "run", str(tmp_path / "p.yaml"), "-b", broker.bootstrap_servers,
        "--produce", "river:Phishing", "--limit", "300", "--until-end", "--state-dir", str(tmp_path / "state"),
        "--run-dir", str(run_dir), "--metrics-port", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("%")]  # %: librdkafka's own
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records), records
    metrics_url = next(r for r in records if r["msg"].startswith("metrics: "))["url"]
    assert metrics_url.startswith("http://127.0.0.1:")
    progress = [r for r in records if r["msg"].startswith("progress ")]
    done = [r for r in records if r["msg"].startswith("done ")]
    assert progress and done and done[-1]["records"] == 300 and done[-1]["accuracy"] > 0.5
    result = json.loads((run_dir / "result.json").read_text())
    assert result["runs"][f"{spec['name']}/torch"]["records"] == 300
    assert (run_dir / "metrics.jsonl").read_text().count('"type":"progress"') >= 1

    quiet = CliRunner().invoke(app, ["--quiet", "report", str(run_dir), "-o", str(tmp_path / "plots")])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout.count(".png") >= 5
    bad = CliRunner().invoke(app, ["--log-format", "json", "report", str(tmp_path / "missing")])
    assert bad.exit_code == 2
    err = json.loads(bad.stderr.strip().splitlines()[-1])
    assert err["level"] == "error" and "not a run directory" in err["msg"]


def test_observe_doctests():
    import doctest
    import importlib

    for name in ("metrics", "dashboard", "logging", "plots"):
        module = importlib.import_module(f"tensorstream.observe.{name}")
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, name
