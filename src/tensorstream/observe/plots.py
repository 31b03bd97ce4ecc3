"""PNG plots from plain data (lists and dicts in, a file path out).

Every function takes plain Python data and an output path, so other commands
(``tensorstream bench``) reuse them without knowing about run directories;
:func:`render_report` is the one that reads a run directory (``run --run-dir``).
Matplotlib's object API with the Agg canvas: no pyplot global state, no display,
safe from any thread.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "acc.png"
>>> line_plot({"torch": [(100, 0.8), (200, 0.85)], "tensorflow": [(100, 0.79), (200, 0.86)]}, out,
...           title="accuracy", xlabel="records", ylabel="accuracy").read_bytes()[:4]
b'\\x89PNG'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BACKEND_COLORS = {"torch": "#ee4c2c", "tensorflow": "#1565c0"}
PALETTE = ("#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#ad1457", "#5d4037", "#455a64")
MARK_COLORS = {"drift": "#d32f2f", "model_version": "#1e88e5", "checkpoint": "#9e9e9e", "rebalance": "#fb8c00"}

Points = Sequence[tuple[float, float | None]] | Sequence[Sequence[float | None]]


def color_for(name: str, i: int = 0) -> str:
    """The color of a series: by backend when the name ends in one (``phishing/torch``)."""
    return BACKEND_COLORS.get(name.rsplit("/", 1)[-1].split(" ")[0], PALETTE[i % len(PALETTE)])


def _figure(width: float = 8.0, height: float = 4.2) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def line_plot(series: Mapping[str, Points], path: str | Path, *, title: str = "", xlabel: str = "",
              ylabel: str = "", markers: Sequence[Mapping[str, Any]] = (), ylim: tuple[float, float] | None = None,
              styles: Mapping[str, Mapping[str, Any]] | None = None, logy: bool = False) -> Path:
    """One line per series: ``{"name": [(x, y), ...]}``; ``None`` ys leave gaps.

    ``markers``: vertical lines ``{"x": ..., "kind": "drift"|"model_version"|..., "label": ...}``.
    ``styles``: per series extra matplotlib line options (``{"name": {"linestyle": "--"}}``);
    ``logy``: a logarithmic y axis (latencies: a warm-up second next to sub-millisecond steps).
    """
    fig, ax = _figure()
    for i, (name, pts) in enumerate(series.items()):
        xs = [p[0] for p in pts]
        ys = [float("nan") if p[1] is None else p[1] for p in pts]
        opts = {"color": color_for(name, i), "linewidth": 1.8, **((styles or {}).get(name, {}))}
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3, **opts)
    seen_kinds: set[str] = set()
    for m in markers:
        kind = str(m.get("kind", "event"))
        ax.axvline(m["x"], color=MARK_COLORS.get(kind, "#555"), linestyle="--" if kind != "checkpoint" else ":",
                   linewidth=1.2, alpha=0.8, label=None if kind in seen_kinds else kind.replace("_", " "))
        seen_kinds.add(kind)
        if m.get("label") and kind != "checkpoint":
            ax.annotate(str(m["label"])[:28], (m["x"], 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=7,
                        color=MARK_COLORS.get(kind, "#555"))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series or markers:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def bar_plot(values: Mapping[str, float | None], path: str | Path, *, title: str = "", ylabel: str = "",
             fmt: str = "{:,.3g}") -> Path:
    """One bar per name: ``{"torch": 1234.0, "tensorflow": 987.0}``, each labelled with its value."""
    return grouped_bar_plot({"": values}, path, title=title, ylabel=ylabel, fmt=fmt)


def grouped_bar_plot(groups: Mapping[str, Mapping[str, float | None]], path: str | Path, *, title: str = "",
                     ylabel: str = "", fmt: str = "{:,.3g}") -> Path:
    """Bars grouped: ``{"p50 ms": {"torch": 1.2, "tensorflow": 1.9}, "p99 ms": {...}}``."""
    fig, ax = _figure()
    names: list[str] = []
    for g in groups.values():
        names.extend(n for n in g if n not in names)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [gi + (i - (len(names) - 1) / 2) * width for gi in range(len(groups))]
        ys = [g.get(name) for g in groups.values()]
        bars = ax.bar(xs, [0.0 if y is None else y for y in ys], width * 0.95, label=name, color=color_for(name, i))
        for b, y in zip(bars, ys, strict=True):
            ax.annotate("n/a" if y is None else fmt.format(y), (b.get_x() + b.get_width() / 2, b.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if names:
        ax.legend(fontsize=8)
    return _save(fig, path)


# -- a run directory ------------------------------------------------------------
def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """All the plots of a run directory into ``out_dir`` (default ``RUN_DIR/plots``); returns the files.

    ``metric.png`` (windowed prequential metric over records scored, markers for
    drift and model versions), ``loss.png``, ``throughput.png``, ``lag.png``,
    ``latency.png`` (over seconds since each run started) and ``summary_throughput.png``,
    ``summary_latency.png``, ``summary_metric.png`` (whole-run figures from ``result.json``).
    """
    from tensorstream.observe.rundir import load_run

    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / "plots"
    files: list[Path] = []
    headline = "accuracy"
    for res in run.results.values():
        if "mae" in (res.get("metrics") or {}):
            headline = "mae"
    markers = [{"x": ev.get("records"), "kind": ev.get("kind"), "label": ev.get("label")}
               for evs in run.events.values() for ev in evs
               if ev.get("records") is not None]
    curves = {k: v for k, v in run.history.items() if v}
    if not curves:  # no history points: fall back to the per-second samples
        curves = {k: [(ln["metrics"].get("n_scored", ln.get("records")), ln["metrics"].get(f"{headline}_window"))
                      for ln in lines if ln.get("metrics")] for k, lines in run.progress.items()}
    if any(curves.values()):
        files.append(line_plot(curves, out / "metric.png", title=f"prequential {headline} (window)",
                               xlabel="records scored", ylabel=headline, markers=markers))
    loss: dict[str, list[tuple[float, float | None]]] = {}
    loss_name = "loss"
    for k, lines in run.progress.items():
        for ln in lines:
            m = ln.get("metrics") or {}
            name = next((n for n in ("log_loss", "cross_entropy", "rmse") if f"{n}_window" in m), None)
            v = m.get(f"{name}_window") if name else ln.get("loss")
            loss_name = f"{name} (window)" if name else "train loss"
            if v is not None:
                loss.setdefault(k, []).append((m.get("n_scored", ln.get("records")), v))
    if loss:
        files.append(line_plot(loss, out / "loss.png", title=loss_name, xlabel="records scored", ylabel=loss_name,
                               markers=markers))

    def over_time(field: str) -> dict[str, list[tuple[float, float | None]]]:
        return {k: [(ln.get("elapsed_s", 0.0), ln.get(field)) for ln in lines] for k, lines in run.progress.items()
                if any(ln.get(field) is not None for ln in lines)}

    rates: dict[str, list[tuple[float, float | None]]] = {}
    for k, lines in run.progress.items():  # per-interval rates, not the running mean
        prev = None
        for ln in lines:
            if prev is not None and ln.get("elapsed_s", 0) > prev.get("elapsed_s", 0):
                r = (ln["records"] - prev["records"]) / (ln["elapsed_s"] - prev["elapsed_s"])
                rates.setdefault(k, []).append((ln["elapsed_s"], max(r, 0.0)))
            prev = ln
    if rates:
        files.append(line_plot(rates, out / "throughput.png", title="throughput", xlabel="seconds",
                               ylabel="records/s"))
    lag = over_time("lag")
    if lag:
        files.append(line_plot(lag, out / "lag.png", title="consumer lag", xlabel="seconds", ylabel="records"))
    lat: dict[str, list[tuple[float, float | None]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for field, tag in (("latency_p50_ms", "p50"), ("latency_p99_ms", "p99")):
        for k, pts in over_time(field).items():
            lat[f"{k} {tag}"] = pts
            if tag == "p99":
                styles[f"{k} {tag}"] = {"linestyle": "--"}
    if lat:
        files.append(line_plot(lat, out / "latency.png", title="latency per record", xlabel="seconds",
                               ylabel="ms (log scale)", styles=styles, logy=True))
    done = {k: r for k, r in run.results.items() if "error" not in r}
    if done:
        files.append(grouped_bar_plot({
            "records/s": {k: r.get("records_per_s") for k, r in done.items()},
        }, out / "summary_throughput.png", title="throughput (whole run)", ylabel="records/s", fmt="{:,.0f}"))
        files.append(grouped_bar_plot({
            "p50 ms": {k: r.get("latency_p50_ms") for k, r in done.items()},
            "p99 ms": {k: r.get("latency_p99_ms") for k, r in done.items()},
        }, out / "summary_latency.png", title="latency per record (whole run)", ylabel="ms", fmt="{:.2f}"))
        files.append(grouped_bar_plot({
            headline: {k: (r.get("metrics") or {}).get(headline) for k, r in done.items()},
        }, out / "summary_metric.png", title=f"prequential {headline} (whole run)", ylabel=headline, fmt="{:.4f}"))
    return files
