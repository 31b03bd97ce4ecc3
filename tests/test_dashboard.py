"""The live dashboard: a real browser (headless Chromium) watching two real pipelines."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from urllib.parse import urlparse

import pytest
from rich.console import Console

from tensorstream.cli.demo import DemoStream, run_demo
from tensorstream.observe import Observers
from tensorstream.observe.dashboard import (
    DashboardFeed,
    DashboardServer,
    MetricsSource,
    RunDirSource,
    histogram_quantile,
    static_dir,
)
from tensorstream.observe.metrics import PipelineMetrics
from tensorstream.observe.rundir import RunRecorder

CHROMIUM = os.environ.get("TENSORSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
RECORDS = 600


class _HoldResults(Observers):
    """Hands the final results to the dashboard only once the test has seen the runs as running.

    600 records take well under a second per backend on a fast machine, less than the page's
    poll interval; holding the 'done' notification (the runs themselves go on) makes "the page
    shows the runs live" a deterministic check instead of a race."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.release = threading.Event()
        self._held: list[threading.Thread] = []

    def result(self, key, payload) -> None:  # off the demo's loop: the other backend's progress keeps coming
        def later() -> None:
            self.release.wait(30)
            super(_HoldResults, self).result(key, payload)

        self._held.append(threading.Thread(target=later, daemon=True))
        self._held[-1].start()

    def close(self) -> None:
        self.release.set()
        for t in self._held:
            t.join()
        super().close()


def _get(url: str) -> tuple[int, bytes, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read(), r.headers.get("Content-Type", "")


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (bash scripts/setup.sh --test)")
def test_dashboard_in_a_browser_during_a_torch_vs_tensorflow_run(kafka_config, topic_factory, tmp_path):
    """The demo's path: torch and tensorflow pipelines in two child processes, their progress
    messages fed to the dashboard by the parent; a headless Chromium watches the page."""
    from playwright.sync_api import sync_playwright

    topic = topic_factory(1, prefix="dash")
    stream = DemoStream(f"Phishing ({RECORDS})", "phishing.yaml", "river:Phishing", RECORDS, None, topic=topic)
    views = _HoldResults(dashboard=True, title="tensorstream test")
    results: dict = {}
    demo = threading.Thread(target=lambda: results.update(run_demo(
        kafka_config, Console(quiet=True), streams=(stream,), observers=views)), daemon=True)

    with sync_playwright() as pw:
        base = views.url
        assert base and urlparse(base).hostname == "127.0.0.1"
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        requests: list[str] = []
        blocked: list[str] = []

        def guard(route, request):  # every request the page makes; anything not ours is recorded and refused
            requests.append(request.url)
            if urlparse(request.url).hostname != "127.0.0.1":
                blocked.append(request.url)
                return route.abort()
            return route.continue_()

        context.route("**/*", guard)
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        try:
            page.goto(base)
            page.wait_for_function("() => window.tsDashboard && window.tsDashboard.polls > 0", timeout=10_000)
            demo.start()
            # Live: the accuracy chart gets points for BOTH backends while the runs go on.
            page.wait_for_function(
                "() => Object.values(window.tsDashboard.pointsOf('accuracy')).filter(n => n > 0).length >= 2",
                timeout=50_000)
            live = page.evaluate("window.tsDashboard.pointsOf('accuracy')")
            page.wait_for_function(
                "() => document.querySelectorAll('table.runs tbody td.status-running').length === 2",
                timeout=30_000)
            live_status = page.locator("table.runs tbody td:nth-child(2)").all_inner_texts()
            views.release.set()
            demo.join(60)
            assert not demo.is_alive() and len(results) == 2, results
            # ... and it follows them to the end (the table says so).
            page.wait_for_function("() => document.querySelectorAll('td.status-done').length === 2",
                                   timeout=10_000)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            points = page.evaluate("window.tsDashboard.pointsOf('accuracy')")
            chart = page.locator('.chart[data-chart="accuracy"][data-pipeline="phishing"]')
            dom_points = json.loads(chart.get_attribute("data-points"))
            canvases = chart.locator("canvas").count()
            legend = chart.locator(".u-legend").inner_text()
            throughput = page.evaluate("window.tsDashboard.pointsOf('throughput')")
            rows = page.locator("table.runs tbody tr").all_inner_texts()
            title = page.title()
        finally:
            browser.close()
            views.close()

    print("screenshot:", shot, "live points:", live, "final points:", points)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
    keys = {"phishing/torch", "phishing/tensorflow"}
    assert {k for k, n in live.items() if n > 0} == keys
    assert "running" in live_status, live_status  # seen while running, not only after the fact
    # Every 100 records scored is a history point (plus one per progress tick): >= 6 per backend at the end.
    assert set(points) == keys and all(points[k] >= RECORDS // 100 for k in keys), points
    assert dom_points == points
    assert canvases >= 1 and all(k in legend for k in keys), legend
    assert set(throughput) == keys and all(n > 0 for n in throughput.values()), throughput
    assert any("torch" in r and f"{RECORDS}" in r for r in rows), rows
    assert any("tensorflow" in r and f"{RECORDS}" in r for r in rows), rows
    assert title.startswith("tensorstream")
    # Offline page: every request went to the dashboard itself on 127.0.0.1.
    assert requests, "no request recorded"
    assert not blocked, blocked
    assert all(u.startswith(base) for u in requests), [u for u in requests if not u.startswith(base)]
    assert any(u.endswith("/static/uPlot.iife.min.js") for u in requests)
    assert any("/api/state" in u for u in requests)
    for r in results.values():
        assert r["records"] == RECORDS and r["predictions"] == RECORDS, r


def test_state_api_and_static_files():
    feed = DashboardFeed()
    with DashboardServer(feed) as server:
        status, body, ctype = _get(server.url)
        assert status == 200 and ctype.startswith("text/html") and b"dashboard.js" in body
        status, body, _ = _get(server.url + "static/uPlot.iife.min.js")
        assert status == 200 and body.startswith(b"/*! https://github.com/leeoniya/uPlot")
        status, body, _ = _get(server.url + "api/state")
        state = json.loads(body)
        assert status == 200 and state["pipelines"] == {}
        assert _get(server.url + f"api/state?seq={state['seq']}")[0] == 204  # nothing new
        feed.update("p/torch", {"records": 10, "metrics": {"accuracy": 1.0, "accuracy_window": float("nan"),
                                                            "n_scored": 10.0}, "latency_p50_ms": 1.5})
        state = json.loads(_get(server.url + f"api/state?seq={state['seq']}")[1])
        run = state["pipelines"]["p"]["runs"]["p/torch"]
        assert run["records"] == 10 and run["metric"] == 1.0 and run["metric_window"] is None  # NaN -> null
        assert run["ts"][0][3] == 1.5
    # The page loads nothing from elsewhere: only relative URLs in the files it is made of.
    for f in ("index.html", "dashboard.js", "dashboard.css"):
        text = (static_dir() / f).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f
    assert (static_dir() / "uPlot.LICENSE").read_text().startswith("The MIT License")


def test_standalone_sources_feed_the_dashboard(tmp_path):
    """``tensorstream dashboard RUN_DIR`` and ``tensorstream dashboard http://.../metrics``."""
    feed = DashboardFeed()
    with RunRecorder(tmp_path) as rec:
        src = RunDirSource(tmp_path, feed)
        rec.progress("p/torch", {"records": 100, "records_per_s": 50.0, "history": [(100, 0.7)],
                                 "metrics": {"accuracy": 0.7, "accuracy_window": 0.7, "n_scored": 100.0}})
        assert src.poll() == 1
        rec.progress("p/torch", {"records": 200, "history": [(100, 0.7), (200, 0.8)],
                                 "events": [{"kind": "drift", "label": "adwin", "records": 150, "t": 1.0}],
                                 "metrics": {"accuracy": 0.75, "accuracy_window": 0.8, "n_scored": 200.0}})
        rec.result("p/torch", {"records": 200, "predictions": 200, "bad": 0, "metrics": {"accuracy": 0.75}})
        assert src.poll() == 2
    run = feed.state()["pipelines"]["p"]["runs"]["p/torch"]
    assert run["acc"] == [[100, 0.7], [200, 0.8]] and run["status"] == "done"
    assert [e["kind"] for e in run["events"]] == ["drift"]

    m = PipelineMetrics("q", "tensorflow", process_metrics=False)
    m.on_predictions(5)
    url = m.serve(0)
    try:
        scraped = DashboardFeed()
        assert MetricsSource(url, scraped).poll() == 1
        run = scraped.state()["pipelines"]["q"]["runs"]["q/tensorflow"]
        assert run["backend"] == "tensorflow" and run["predictions"] == 5
    finally:
        m.close()
    assert histogram_quantile(0.5, {0.1: 0.0, 0.2: 10.0, float("inf"): 10.0}) == pytest.approx(0.15)
