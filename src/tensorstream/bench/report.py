"""The bench report: ``report.md``, PNG plots (matplotlib, headless) and a rich summary table.

Per stream: prequential accuracy over records (drift marked), throughput
(train and infer), latency CDF, memory over time and warm-up time; once: API
verbosity per framework. Every figure in the tables comes from ``results.json``
in the same directory, so a report can be re-rendered without re-running:

    python -m tensorstream.bench.report reports/bench-20260101-120000/
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import orjson

_COLORS = {"torch": "#ee4c2c", "torch-compile": "#8c1d0e", "tensorflow": "#ff9f00", "tensorflow-xla": "#1f6fb5"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _ok(run: dict[str, Any] | None) -> bool:
    return bool(run) and "error" not in run  # type: ignore[operator]


def _fmt(v: Any, spec: str = "{:,.0f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return spec.format(v)


def _ratio(v: Any, base: Any) -> str:
    if not v or not base:
        return "–"
    return f"{v / base:.2f}×"


# ----------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def plot_accuracy(stream: dict[str, Any], path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, row in stream["variants"].items():
        hist = row.get("train", {}).get("history") or []
        if hist:
            xs, ys = zip(*hist)
            ax.plot(xs, ys, label=row["title"], color=_COLORS.get(key), linewidth=1.4)
    if stream.get("drift_at") is not None:
        ax.axvline(stream["drift_at"], color="black", linestyle="--", linewidth=1)
        ax.annotate("drift", (stream["drift_at"], 0.02), xycoords=("data", "axes fraction"), xytext=(4, 0),
                    textcoords="offset points")
    ax.set(title=f"{stream['title']}: prequential accuracy (window {stream['metrics_window']:,} records)",
           xlabel="records scored", ylabel="windowed accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_throughput(stream: dict[str, Any], path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    keys = list(stream["variants"])
    width = 0.38
    for j, stage in enumerate(("train", "infer")):
        vals = [(stream["variants"][k].get(stage) or {}).get("records_per_s") or 0 for k in keys]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(keys))], vals, width,
                      label="train (test-then-train)" if stage == "train" else "infer (trained state)",
                      color="#4c72b0" if stage == "train" else "#55a868")
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=7)
    ax.set_xticks(range(len(keys)), [stream["variants"][k]["title"] for k in keys], fontsize=8)
    ax.set(title=f"{stream['title']}: throughput through the broker", ylabel="records/s")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_latency(stream: dict[str, Any], path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, row in stream["variants"].items():
        for stage, style in (("train", "-"), ("infer", "--")):
            q = (row.get(stage) or {}).get("latency_quantiles_ms") or []
            if q:
                ys = [i / (len(q) - 1) for i in range(len(q))]
                ax.plot([max(v, 1e-3) for v in q], ys, style, color=_COLORS.get(key), linewidth=1.3,
                        label=f"{row['title']} ({stage})")
    ax.set_xscale("log")
    ax.set(title=f"{stream['title']}: per-record latency in the pipeline (batch hand-over → predictions queued)",
           xlabel="latency (ms, log scale)", ylabel="fraction of records")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_memory(stream: dict[str, Any], path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, row in stream["variants"].items():
        for stage, style in (("train", "-"), ("infer", "--")):
            s = (row.get(stage) or {}).get("rss_samples") or []
            if s:
                ax.plot([p[0] for p in s], [p[1] for p in s], style, color=_COLORS.get(key), linewidth=1.3,
                        label=f"{row['title']} ({stage})")
    ax.set(title=f"{stream['title']}: process memory (RSS, sampled every 0.5 s)",
           xlabel="seconds since the process started", ylabel="RSS (MiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_warmup(stream: dict[str, Any], path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, starts, firsts = [], [], []
    for row in stream["variants"].values():
        for stage in ("train", "infer"):
            run = row.get(stage) or {}
            labels.append(f"{row['title']} ({stage})")
            starts.append(run.get("startup_s") or 0.0)
            firsts.append(run.get("first_prediction_s") or 0.0)
    ys = list(range(len(labels)))
    ax.barh(ys, starts, color="#bbbbbb", label="start-up: interpreter, framework import, model load")
    bars = ax.barh(ys, firsts, left=starts, color="#c44e52", label="first record → first prediction (build, trace, compile)")
    ax.bar_label(bars, labels=[f"{f:.2f}s" for f in firsts], fontsize=7, padding=2)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(title=f"{stream['title']}: warm-up (group join excluded)", xlabel="seconds")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_verbosity(verbosity: dict[str, dict[str, Any]], path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    rows = [v for v in verbosity.values() if "error" not in v]
    names = [f"{r['backend']}\n({r['source']})" for r in rows]
    m = ax.bar(names, [r["model"] for r in rows], color="#4c72b0", label="model definition")
    t = ax.bar(names, [r["training"] for r in rows], bottom=[r["model"] for r in rows], color="#dd8452",
               label="training definition")
    ax.bar_label(m, label_type="center", fontsize=8)
    ax.bar_label(t, labels=[str(r["total"]) for r in rows], fontsize=8)
    ax.set(title="API verbosity (code lines: no blanks, comments, docstrings)", ylabel="lines")
    ax.title.set_fontsize(9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------- markdown


def _speed_table(stream: dict[str, Any]) -> list[str]:
    rows = stream["variants"]
    base = next(iter(rows.values()))
    b_train = (base.get("train") or {}).get("records_per_s")
    b_infer = (base.get("infer") or {}).get("records_per_s")
    lines = [
        "| variant | train rec/s | × | steady train rec/s | infer rec/s | × | train p50 / p99 ms | "
        "infer p50 / p99 ms | first prediction s (train / infer) | start-up s (train / infer) | "
        "peak RSS MiB (train / infer) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        tr, inf = row.get("train") or {}, row.get("infer") or {}
        if not _ok(tr):
            lines.append(f"| {row['title']} | error: {tr.get('error', '?')} |||||||||")
            continue
        inf_ok = _ok(inf)
        lines.append(
            f"| {row['title']} | {_fmt(tr['records_per_s'])} | {_ratio(tr['records_per_s'], b_train)} "
            f"| {_fmt(tr.get('steady_records_per_s'))} "
            f"| {_fmt(inf.get('records_per_s')) if inf_ok else 'error'} "
            f"| {_ratio(inf.get('records_per_s'), b_infer) if inf_ok else '–'} "
            f"| {_fmt(tr.get('latency_p50_ms'), '{:.2f}')} / {_fmt(tr.get('latency_p99_ms'), '{:.2f}')} "
            f"| {_fmt(inf.get('latency_p50_ms'), '{:.2f}')} / {_fmt(inf.get('latency_p99_ms'), '{:.2f}')} "
            f"| {_fmt(tr.get('first_prediction_s'), '{:.3f}')} / {_fmt(inf.get('first_prediction_s'), '{:.3f}')} "
            f"| {_fmt(tr.get('startup_s'), '{:.2f}')} / {_fmt(inf.get('startup_s'), '{:.2f}')} "
            f"| {_fmt(tr.get('peak_rss_mb'))} / {_fmt(inf.get('peak_rss_mb'))} |")
    return lines


def _accuracy_table(stream: dict[str, Any]) -> list[str]:
    drift = stream.get("drift_at") is not None
    head = "| variant | accuracy | window acc. | accuracy (predictions topic) | window acc. (topic) |"
    sep = "|---|---:|---:|---:|---:|"
    if drift:
        head += " before drift | after drift |"
        sep += "---:|---:|"
    lines = [head, sep]
    for row in stream["variants"].values():
        tr = row.get("train") or {}
        if not _ok(tr):
            continue
        m, c = tr.get("metrics", {}), row.get("check", {})
        line = (f"| {row['title']} | {_fmt(m.get('accuracy'), '{:.4f}')} | {_fmt(m.get('accuracy_window'), '{:.4f}')} "
                f"| {_fmt(c.get('accuracy'), '{:.4f}')} | {_fmt(c.get('accuracy_window'), '{:.4f}')} |")
        if drift:
            line += f" {_fmt(c.get('before_drift'), '{:.4f}')} | {_fmt(c.get('after_drift'), '{:.4f}')} |"
        lines.append(line)
    return lines


def _verbosity_table(verbosity: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| framework | model | model lines | training lines | total | counted from |",
             "|---|---|---:|---:|---:|---|"]
    for v in verbosity.values():
        if "error" in v:
            lines.append(f"| {v['backend']} | {v['source']} | error: {v['error']} ||||")
            continue
        lines.append(f"| {v['backend']} | {v['source']} | {v['model']} | {v['training']} | {v['total']} "
                     f"| {', '.join(f'`{c}`' for c in v['counted'])} |")
    return lines


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Render ``report.md`` and the PNGs from a results dict into ``out_dir``; returns the report's path."""
    from tensorstream.bench.machine import describe

    out_dir = Path(out_dir)
    meta = results["meta"]
    vers = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    md = [
        "# tensorstream bench: PyTorch vs TensorFlow on the same stream",
        "",
        f"- machine: {describe(meta)}",
        f"- versions: {vers}",
        f"- command: `{meta.get('command') or 'tensorstream bench'}`",
        f"- broker: {meta.get('bootstrap_servers')}; variants run one after another, each stage in its own "
        "spawned process, `model.threads: 1`",
        "",
        "How to read this: *train* runs the spec's own mode (test-then-train: each record is predicted, scored, "
        "then learned) from the source topic to the predictions topic; *infer* runs `mode: infer` on the same "
        "records from the state the train run saved (`Pipeline.save_state` → `model.weights`). "
        "*rec/s* counts from the first record to the end (warm-up included); *steady* excludes the first batch. "
        "Latency is per record, from the batch's hand-over to the pipeline until its predictions are queued to "
        "the producer (broker round trips excluded; see `benchmarks/bench_inference.py` for end-to-end latency "
        "under an open-loop load). *First prediction*: first record received → first batch's predictions queued "
        "(model build, tracing, compilation). *Start-up*: process start → pipeline ready (interpreter, framework "
        "import, model load for infer); the consumer-group join is excluded. × = ratio to the first variant, "
        "measured in the same run. Accuracy is prequential; *predictions topic* re-scores the emitted "
        "predictions against the source records' labels, an independent check.",
        "",
    ]
    for stream in results["streams"]:
        k = stream["key"]
        files = {
            "accuracy": plot_accuracy(stream, out_dir / f"accuracy-{k}.png"),
            "throughput": plot_throughput(stream, out_dir / f"throughput-{k}.png"),
            "latency": plot_latency(stream, out_dir / f"latency-{k}.png"),
            "memory": plot_memory(stream, out_dir / f"memory-{k}.png"),
            "warm-up": plot_warmup(stream, out_dir / f"warmup-{k}.png"),
        }
        model = stream.get("model", {})
        md += [
            f"## {stream['title']}",
            "",
            f"{stream['records']:,} records from `{stream['topic']}`; mode `{stream['mode']}`; model "
            f"`{model.get('kind')}` {model.get('hidden', '') if model.get('kind') == 'mlp' else ''}; batch "
            f"max {stream['batch']['max_size']} records / {stream['batch']['max_wait_ms']:g} ms"
            + (f"; drift at record {stream['drift_at']:,}" if stream.get("drift_at") is not None else "") + ".",
            "",
            "### Speed and memory",
            "",
            *_speed_table(stream),
            "",
            "### Accuracy",
            "",
            *_accuracy_table(stream),
            "",
            *[f"![{name}]({f})" for name, f in files.items()],
            "",
        ]
    if results.get("verbosity"):
        vfile = plot_verbosity(results["verbosity"], out_dir / "verbosity.png")
        md += [
            "## API verbosity",
            "",
            "Code lines (no blank lines, comments or docstrings) of the model definition and of the training "
            "definition (optimizer, loss, step; for TensorFlow also the `tf.function` wrapping), counted from "
            "the code the runs above used. The compiled variants share their framework's code "
            "(`model.compile: true` is one spec line).",
            "",
            *_verbosity_table(results["verbosity"]),
            "",
            f"![verbosity]({vfile})",
            "",
        ]
    errors = [(s["key"], k, st, r[st]["error"]) for s in results["streams"] for k, r in s["variants"].items()
              for st in ("train", "infer") if isinstance(r.get(st), dict) and "error" in r[st]]
    if errors:
        md += ["## Errors", ""] + [f"- {s} / {k} / {st}: {e}" for s, k, st, e in errors] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def summary_table(results: dict[str, Any]) -> Any:
    """A rich table of the headline figures, one row per stream and variant."""
    from rich.table import Table

    t = Table(title="tensorstream bench", title_justify="left",
              caption="rec/s through the broker (train: test-then-train; infer: trained state); latency per record "
                      "in the pipeline; × = ratio to the first variant", caption_justify="left")
    for c in ("stream", "variant", "train rec/s", "×", "infer rec/s", "×", "p50 ms", "p99 ms", "1st pred s",
              "peak RSS MiB", "accuracy", "window acc.", "code lines"):
        t.add_column(c, justify="left" if c in ("stream", "variant") else "right")
    verb = results.get("verbosity", {})
    for stream in results["streams"]:
        rows = stream["variants"]
        base = next(iter(rows.values()))
        bt, bi = (base.get("train") or {}).get("records_per_s"), (base.get("infer") or {}).get("records_per_s")
        for row in rows.values():
            tr, inf = row.get("train") or {}, row.get("infer") or {}
            if not _ok(tr):
                t.add_row(stream["key"], row["title"], f"[red]{tr.get('error', '?')}[/]", *[""] * 10)
                continue
            m = tr.get("metrics", {})
            v = verb.get(f"{row['backend']}:{row['kind']}", {})
            t.add_row(stream["key"], row["title"], _fmt(tr["records_per_s"]), _ratio(tr["records_per_s"], bt),
                      _fmt(inf.get("records_per_s")) if _ok(inf) else "[red]error[/]",
                      _ratio(inf.get("records_per_s"), bi) if _ok(inf) else "",
                      _fmt(tr.get("latency_p50_ms"), "{:.2f}"), _fmt(tr.get("latency_p99_ms"), "{:.2f}"),
                      _fmt(tr.get("first_prediction_s"), "{:.2f}"),
                      f"{_fmt(tr.get('peak_rss_mb'))} / {_fmt(inf.get('peak_rss_mb'))}",
                      _fmt(m.get("accuracy"), "{:.4f}"), _fmt(m.get("accuracy_window"), "{:.4f}"),
                      str(v.get("total", "–")))
    return t


def main(argv: list[str] | None = None) -> None:
    """Re-render a report directory from its ``results.json``."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m tensorstream.bench.report REPORT_DIR")
    out_dir = Path(args[0])
    results = orjson.loads((out_dir / "results.json").read_bytes())
    print(write_report(results, out_dir))


if __name__ == "__main__":
    main()
