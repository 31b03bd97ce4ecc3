"""The live dashboard: one page on 127.0.0.1, fed by progress snapshots.

- :class:`DashboardFeed` holds what the page shows, per run (``"<pipeline>/<backend>"``):
  the windowed prequential metric and loss over records scored, throughput, lag
  and latency over time, the model version, and event markers (drift, model
  versions, checkpoints). Anything that has progress dicts feeds it: the ``run``
  command (``Progress`` objects), the demo's parent process (the dicts its
  children send over the multiprocessing queue), a run directory being written
  (:class:`RunDirSource`) or a worker's ``/metrics`` endpoint (:class:`MetricsSource`).
- :func:`create_app` is a small Starlette app: ``/`` (the page), ``/static/...``
  (the page's script and the vendored uPlot; no CDN, the page works offline) and
  ``/api/state`` (JSON; the page polls it once a second, ``?seq=N`` answers 204
  when nothing changed).
- :class:`DashboardServer` runs it with uvicorn in a daemon thread.

>>> feed = DashboardFeed()
>>> feed.update("phishing/torch", {"records": 100, "records_per_s": 50.0, "lag": 0,
...             "metrics": {"accuracy": 0.8, "accuracy_window": 0.85, "n_scored": 100.0}})
>>> feed.state()["pipelines"]["phishing"]["runs"]["phishing/torch"]["acc"]
[[100, 0.85]]
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

#: most points kept per series: older ones are thinned (every other one dropped)
MAX_POINTS = 2000
#: windowed metrics shown as "loss", in order of preference
LOSS_NAMES = ("log_loss", "cross_entropy", "rmse")


def _num(v: Any) -> float | None:
    """A JSON-safe float (NaN and infinities become None)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _thin(points: list[list[Any]]) -> list[list[Any]]:
    if len(points) <= MAX_POINTS:
        return points
    keep = points[-MAX_POINTS // 4:]  # recent points at full resolution
    return points[: -len(keep)][::2] + keep


class _Run:
    def __init__(self, key: str, pipeline: str, backend: str) -> None:
        self.key, self.pipeline, self.backend = key, pipeline, backend
        self.info: dict[str, Any] = {"status": "running"}
        self.acc: dict[int, float] = {}
        self.loss: dict[int, float] = {}
        self.ts: list[list[Any]] = []  # [t, records/s, lag, p50 ms, p99 ms]
        self.events: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.headline = "accuracy"
        self.loss_name: str | None = None
        self._last: tuple[float, int] | None = None  # (t, records) of the previous sample, for rates

    def update(self, p: dict[str, Any], t: float, status: str | None) -> None:
        metrics = p.get("metrics") or {}
        self.headline = "accuracy" if "accuracy" in metrics else ("mae" if "mae" in metrics else self.headline)
        records = int(p.get("records") or 0)
        n = int(metrics.get("n_scored") or records)
        for h in p.get("history") or ():
            v = _num(h[1])
            if v is not None:
                self.acc[int(h[0])] = v
        win = _num(metrics.get(f"{self.headline}_window"))
        if win is not None and n > 0:
            self.acc[n] = win
        for name in LOSS_NAMES:
            if f"{name}_window" in metrics:
                self.loss_name = f"{name} (window)"
                v = _num(metrics[f"{name}_window"])
                break
        else:
            self.loss_name, v = "train loss", _num(p.get("loss"))
        if v is not None and n > 0:
            self.loss[n] = v
        if status != "done":
            rate = _num(p.get("records_per_s"))
            if self._last is not None and t > self._last[0] and records >= self._last[1]:
                rate = (records - self._last[1]) / (t - self._last[0])  # instantaneous, not the run's mean
            self._last = (t, records)
            self.ts.append([t, _num(rate), _num(p.get("lag")), _num(p.get("latency_p50_ms")),
                            _num(p.get("latency_p99_ms"))])
            self.ts = _thin(self.ts)
        for ev in p.get("events") or ():
            k = (ev.get("kind"), ev.get("t"), ev.get("label"))
            self.events[k] = {**ev, "key": self.key}
        self.info.update({
            "pipeline": self.pipeline, "backend": self.backend, "records": records,
            "records_per_s": _num(p.get("records_per_s")), "lag": p.get("lag", self.info.get("lag")),
            "metric_name": self.headline, "metric": _num(metrics.get(self.headline)), "metric_window": win,
            "latency_p50_ms": _num(p.get("latency_p50_ms")), "latency_p99_ms": _num(p.get("latency_p99_ms")),
            "model_version": p.get("model_version") or self.info.get("model_version", ""),
            "updated": t,
        })
        if "predictions" in p:
            self.info.update(predictions=p.get("predictions"), bad=p.get("bad"))
        if status:
            self.info["status"] = status

    def state(self) -> dict[str, Any]:
        return {
            **self.info, "key": self.key, "loss_name": self.loss_name,
            "acc": _thin([[k, v] for k, v in sorted(self.acc.items())]),
            "loss": _thin([[k, v] for k, v in sorted(self.loss.items())]),
            "ts": self.ts,
            "events": sorted(self.events.values(), key=lambda e: e.get("t") or 0)[-200:],
        }


class DashboardFeed:
    """What the page shows; thread-safe (pipelines write, the server reads)."""

    def __init__(self, title: str = "tensorstream") -> None:
        self.title = title
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self.seq = 0

    def update(self, key: str, payload: dict[str, Any], *, t: float | None = None, status: str | None = None) -> None:
        """A progress (or result) dict of run ``key`` ("<pipeline>/<backend>")."""
        pipeline, _, backend = key.rpartition("/")  # the key groups runs; the payload fills in the rest
        pipeline = pipeline or payload.get("pipeline") or key
        backend = backend or payload.get("backend") or "?"
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                run = self._runs[key] = _Run(key, pipeline, backend)
            run.update(payload, time.time() if t is None else t, status)
            self.seq += 1

    def result(self, key: str, payload: dict[str, Any], *, t: float | None = None) -> None:
        self.update(key, payload, t=t, status="done")

    def error(self, key: str, message: str) -> None:
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                pipeline, _, backend = key.rpartition("/")
                run = self._runs[key] = _Run(key, pipeline or key, backend or "?")
            run.info.update(status="error", error=message)
            self.seq += 1

    def progress_callback(self, key: str) -> Any:
        """``on_progress`` for a :class:`~tensorstream.pipeline.Pipeline` feeding run ``key``."""
        return lambda p: self.update(key, p.__dict__)

    def state(self) -> dict[str, Any]:
        with self._lock:
            pipelines: dict[str, Any] = {}
            for key, run in self._runs.items():
                pipelines.setdefault(run.pipeline, {"runs": {}})["runs"][key] = run.state()
            return {"title": self.title, "seq": self.seq, "now": time.time(), "pipelines": pipelines}


# -- the web app ---------------------------------------------------------------
def static_dir() -> Path:
    return Path(str(resources.files("tensorstream.observe") / "static"))


def create_app(feed: DashboardFeed) -> Any:
    """The Starlette app serving the page, its static files and ``/api/state``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    static = static_dir()
    no_cache = {"Cache-Control": "no-store"}

    async def index(_: Request) -> Response:
        return FileResponse(static / "index.html", headers=no_cache)

    async def state(request: Request) -> Response:
        seen = request.query_params.get("seq")
        if seen is not None and seen == str(feed.seq):
            return Response(status_code=204, headers=no_cache)
        body = orjson.dumps(feed.state(), option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, media_type="application/json", headers=no_cache)

    async def health(_: Request) -> Response:
        return Response("ok", media_type="text/plain")

    return Starlette(routes=[
        Route("/", index),
        Route("/api/state", state),
        Route("/healthz", health),
        Mount("/static", app=StaticFiles(directory=static), name="static"),
    ])


class DashboardServer:
    """uvicorn in a daemon thread, on ``host:port`` (0 = a free port). ``start()`` returns the URL."""

    def __init__(self, feed: DashboardFeed, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.feed = feed
        self.host, self.port = host, port
        self.url: str | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))  # bound here: the port is known before the thread starts
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.feed), log_config=None, access_log=False, lifespan="off",
                                loop="asyncio", http="h11", ws="none", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="tensorstream-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.url = f"http://{self.host}:{self.port}/"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> DashboardServer:
        if self.url is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- standalone sources ----------------------------------------------------------
class RunDirSource:
    """Follows ``RUN_DIR/metrics.jsonl`` (written by ``run --run-dir``) into a feed."""

    def __init__(self, run_dir: str | Path, feed: DashboardFeed) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.feed = feed
        self._pos = 0
        self._partial = b""

    def poll(self) -> int:
        """Read what was appended since the last call; returns the number of lines fed."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
                self._pos = f.tell()
        except FileNotFoundError:
            return 0
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # a line still being written
        n = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            feed_line(self.feed, rec)
            n += 1
        return n


def feed_line(feed: DashboardFeed, rec: dict[str, Any]) -> None:
    """One ``metrics.jsonl`` line into a feed."""
    kind, key, t = rec.get("type"), rec.get("key", "?"), rec.get("t")
    if kind == "progress":
        feed.update(key, rec, t=t)
    elif kind == "result":
        feed.result(key, rec, t=t)
    elif kind == "error":
        feed.error(key, str(rec.get("error")))


class MetricsSource:
    """Scrapes a worker's ``/metrics`` (``run --metrics-port``) into a feed, one run per
    (pipeline, backend) found there. Rates and latency percentiles come from the
    difference between two scrapes."""

    def __init__(self, url: str, feed: DashboardFeed, timeout: float = 2.0) -> None:
        self.url = url if "/metrics" in url else url.rstrip("/") + "/metrics"
        self.feed = feed
        self.timeout = timeout
        self._prev: dict[str, dict[str, Any]] = {}

    def poll(self) -> int:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as r:  # noqa: S310 - a URL the user gave
                text = r.read().decode()
        except OSError as e:
            log.debug("scrape of %s failed: %s", self.url, e)
            return 0
        runs = parse_metrics(text)
        for key, cur in runs.items():
            prev = self._prev.get(key)
            payload = scrape_to_progress(cur, prev)
            self.feed.update(key, payload)
            self._prev[key] = cur
        return len(runs)


def parse_metrics(text: str) -> dict[str, dict[str, Any]]:
    """Prometheus text -> per ``"<pipeline>/<backend>"``: the tensorstream samples, grouped."""
    from prometheus_client.parser import text_string_to_metric_families

    runs: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith("tensorstream_") or "pipeline" not in s.labels:
                continue
            key = f"{s.labels['pipeline']}/{s.labels.get('backend', '?')}"
            run = runs.setdefault(key, {"pipeline": s.labels["pipeline"], "backend": s.labels.get("backend", "?"),
                                        "samples": {}, "lag": 0.0, "preq": {}, "buckets": {}, "drift": 0.0})
            name, labels = s.name, s.labels
            if name == "tensorstream_consumer_lag_records":
                run["lag"] += s.value
            elif name == "tensorstream_prequential_metric":
                suffix = "" if labels.get("scope") == "overall" else "_window"
                run["preq"][labels["metric"] + suffix] = s.value
            elif name == "tensorstream_batch_latency_seconds_bucket":
                run["buckets"][float(labels["le"])] = s.value
            elif name == "tensorstream_model_info":
                run["model_version"] = labels.get("version", "")
            elif name == "tensorstream_drift_events_total":
                run["drift"] += s.value
            else:
                run["samples"][name] = run["samples"].get(name, 0.0) + s.value
    return runs


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``{le: count}`` buckets."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, prev_b, prev_c = q * total, 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / max(c - prev_c, 1e-12))
        prev_b, prev_c = b, c
    return prev_b


def scrape_to_progress(cur: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
    """Two scrapes -> a progress-like dict the feed understands."""
    s = cur["samples"]
    records = int(s.get("tensorstream_records_in_total", 0))
    learned = s.get("tensorstream_records_learned_total", 0.0)
    buckets = cur["buckets"]
    if prev is not None and prev["buckets"]:
        delta = {b: c - prev["buckets"].get(b, 0.0) for b, c in buckets.items()}
        if delta and max(delta.values()) > 0:
            buckets = delta  # latency over the last scrape interval
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    metrics = {**cur["preq"], "n_scored": float(learned or records)}
    payload: dict[str, Any] = {
        "pipeline": cur["pipeline"], "backend": cur["backend"], "records": records,
        "predictions": int(s.get("tensorstream_predictions_total", 0)),
        "bad": int(s.get("tensorstream_dead_letters_total", 0)),
        "lag": int(cur["lag"]), "metrics": metrics, "model_version": cur.get("model_version", ""),
        "latency_p50_ms": None if p50 is None else p50 * 1000, "latency_p99_ms": None if p99 is None else p99 * 1000,
        "loss": s.get("tensorstream_train_loss"),
    }
    events = []
    if prev is not None and cur.get("model_version") and cur.get("model_version") != prev.get("model_version"):
        events.append({"kind": "model_version", "label": cur["model_version"], "records": records, "t": time.time()})
    if prev is not None and cur["drift"] > prev["drift"]:
        events.append({"kind": "drift", "label": "drift", "records": records, "t": time.time()})
    payload["events"] = events
    return payload


def follow(sources: list[Any], stop: threading.Event, interval: float = 1.0) -> None:
    """Poll every source each ``interval`` seconds until ``stop`` is set."""
    while not stop.is_set():
        for src in sources:
            try:
                src.poll()
            except Exception:  # one broken source must not stop the others
                log.exception("dashboard source %s failed", src)
        stop.wait(interval)
