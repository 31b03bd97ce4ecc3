"""Plots: valid PNGs from plain data and from a sample run directory (``tensorstream report``)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from typer.testing import CliRunner

from tensorstream.cli import app
from tensorstream.observe.plots import bar_plot, grouped_bar_plot, line_plot, render_report
from tensorstream.observe.rundir import FORMAT, RunRecorder, load_run


def _check_png(path, min_size=(300, 200)):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()  # checks the chunks and CRCs
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        colors = im.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colors is not None and len(colors) > 20, f"{path.name} looks blank"  # lines, text, not one color


@pytest.fixture
def run_dir(tmp_path):
    """A sample run directory: two backends, one second of progress per line, a drift and a model version."""
    d = tmp_path / "run"
    with RunRecorder(d) as rec:
        for key, speed, acc0 in (("sea/torch", 400, 0.6), ("sea/tensorflow", 300, 0.58)):
            history = []
            for s in range(1, 11):
                n = speed * s
                history += [(h, acc0 + 0.3 * (1 - math.exp(-h / 1500))) for h in range(100, n + 1, 100)
                            if not history or h > history[-1][0]]
                events = [{"kind": "drift", "label": "adwin", "records": 2000, "t": 100.0 + 5}] if n >= 2000 else []
                if s == 8:
                    events.append({"kind": "model_version", "label": "v2", "records": n, "t": 100.0 + s})
                rec.progress(key, {
                    "backend": key.split("/")[1], "records": n, "records_per_s": float(speed), "lag": 4000 - n,
                    "elapsed_s": float(s), "model_version": "v1" if s < 8 else "v2",
                    "metrics": {"accuracy": history[-1][1] - 0.02, "accuracy_window": history[-1][1],
                                "log_loss_window": 0.7 - 0.03 * s, "n_scored": float(n)},
                    "history": history[-200:], "events": events,
                    "latency_p50_ms": 1.0 + 0.1 * s, "latency_p99_ms": 900.0 if s == 1 else 5.0, "loss": 0.5,
                }, t=100.0 + s)
            rec.result(key, {"backend": key.split("/")[1], "records": speed * 10, "predictions": speed * 10,
                             "bad": 0, "seconds": 10.0, "records_per_s": float(speed), "latency_p50_ms": 1.5,
                             "latency_p99_ms": 6.0, "peak_rss_mb": 500.0,
                             "metrics": {"accuracy": history[-1][1] - 0.02}, "history": history})
    return d


def test_run_dir_format(run_dir):
    doc = json.loads((run_dir / "result.json").read_text())
    assert doc["format"] == FORMAT and set(doc["runs"]) == {"sea/torch", "sea/tensorflow"}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["type"] for ln in lines].count("progress") == 20 and [ln["type"] for ln in lines].count("result") == 2
    # history and events are written once each, not repeated on every line
    torch_hist = [h for ln in lines if ln["key"] == "sea/torch" and ln["type"] == "progress" for h in ln["history"]]
    assert len(torch_hist) == len({h[0] for h in torch_hist}) == 40
    drift = [e for ln in lines if ln["key"] == "sea/torch" for e in ln.get("events") or [] if e["kind"] == "drift"]
    assert len(drift) == 1
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"type": "progress", "key": "sea/torch", "t": 1')  # a torn last line (crash): ignored
    run = load_run(run_dir)
    assert run.keys == ["sea/tensorflow", "sea/torch"]
    assert len(run.progress["sea/torch"]) == 10 and len(run.history["sea/torch"]) == 40
    assert [e["kind"] for e in run.events["sea/torch"]] == ["drift", "model_version"]


def test_report_renders_valid_pngs(run_dir, tmp_path):
    files = render_report(run_dir, tmp_path / "out")
    names = {f.name for f in files}
    assert names == {"metric.png", "loss.png", "throughput.png", "lag.png", "latency.png", "summary_throughput.png",
                     "summary_latency.png", "summary_metric.png"}
    for f in files:
        _check_png(f)


def test_report_command(run_dir):
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    printed = [line for line in res.stdout.splitlines() if line.endswith(".png")]
    assert len(printed) == 8 and all(p.startswith(str(run_dir / "plots")) for p in printed)
    for p in printed:
        _check_png(run_dir / "plots" / p.rsplit("/", 1)[1])
    res = CliRunner().invoke(app, ["report", str(run_dir / "nope")])
    assert res.exit_code == 2 and "not a run" in res.output and "no metrics.jsonl" in " ".join(res.output.split())


def test_plain_data_functions(tmp_path):
    """What `tensorstream bench` reuses: lists and dicts in, a PNG out."""
    p = line_plot({"torch": [(0, 1.0), (1, None), (2, 3.0)], "tensorflow": [[0, 2.0], [2, 2.5]]},
                  tmp_path / "a" / "line.png", title="t", xlabel="x", ylabel="y",
                  markers=[{"x": 1, "kind": "drift", "label": "adwin"}], logy=True)
    _check_png(p)
    _check_png(bar_plot({"torch": 1234.0, "tensorflow": None}, tmp_path / "bar.png", title="rec/s"))
    _check_png(grouped_bar_plot({"p50": {"torch": 1.0, "tensorflow": 1.4}, "p99": {"torch": 3.0, "tensorflow": 5.0}},
                                tmp_path / "grouped.png", title="latency", ylabel="ms"))
    _check_png(line_plot({}, tmp_path / "empty.png", title="nothing yet"), min_size=(100, 100))
