"""Run every benchmark; regenerate the README's block of targets and the tables in docs/benchmarks.md.

    python benchmarks/run_all.py                     # run all (about 30-40 min on 2 cores), rewrite README
    python benchmarks/run_all.py --quick             # smaller runs (a few minutes), same table
    python benchmarks/run_all.py --from DIR          # only re-render the table from DIR's JSON files
    python benchmarks/run_all.py --only soak,peers --out DIR
    python benchmarks/run_all.py --only tax,inference,peers --quick --json FILE   # + the figures as JSON

Each benchmark writes JSON to ``--out`` (default ``reports/benchmarks-<date>/``)
and prints its own table there (``*.txt``). The block between
``<!-- results:begin -->`` and ``<!-- results:end -->`` of README.md gets one row
per target (from the ``--json`` figures); the same block of docs/benchmarks.md
gets the full tables; both name the machine (``nproc``, CPU model from
/proc/cpuinfo, memory), the date and the command.

``--json FILE`` also writes the target figures, each a ratio measured within
one run: ``{"tax": {backend: {batch: pipeline / in-memory learner}},
"inference": {backend: pipeline / in-memory predict}, "peers": {stream:
{backend: our fastest pipeline's records/s / deep-river's, among our rows at
deep-river's accuracy or better (null: none)}}}``, plus ``details`` (CPU-time
ratios, learner / raw framework call, records/s, the machine, date, command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: issue #14: our records/s over deep-river's at equal or better prequential accuracy (stretch: 20)
PEERS_TARGET = 10

#: name -> (command after `python`, extra args for --quick)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "tax": ([str(HERE / "bench_streaming_tax.py")], ["--repeats", "1", "--scale", "0.3"]),
    "inference": ([str(HERE / "bench_inference.py")], ["--repeats", "1", "--records", "20000", "--seconds", "4"]),
    # replay 3: the per-record learner that also relearns 3 recent records per step (learn.replay)
    "peers": ([str(HERE / "bench_peers.py"), "--replay", "3"], ["--agrawal-records", "20000"]),
    "soak": ([str(HERE / "bench_soak.py")], ["--records", "200000", "--every", "50000"]),
    "bench": (["-m", "tensorstream.cli", "bench", "--demo"], ["--records", "2000"]),
}


def run(names: list[str], out: Path, quick: bool, extra: dict[str, list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cmd, quick_args = BENCHES[name]
        args = [sys.executable, *cmd, *(quick_args if quick else []), *extra.get(name, [])]
        args += ["--out", str(out / "bench-demo")] if name == "bench" else ["--json", str(out / f"{name}.json")]
        print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
        t = time.perf_counter()
        with (out / f"{name}.txt").open("w") as log:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                    env={**__import__("os").environ, "COLUMNS": "160"})
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            if proc.wait() != 0:
                print(f"!! {name} failed (exit {proc.returncode}); its figures are left out", flush=True)
        print(f"[{name}: {time.perf_counter() - t:.0f}s]", flush=True)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _f(v: Any, spec: str = "{:,.0f}") -> str:
    return "–" if v is None or v != v else spec.format(v)  # v != v: NaN (e.g. p99 with records never received)


def _ok(flag: str | None) -> str:
    return {"met": "✅ met", "MISSED": "❌ missed"}.get(flag or "", "–")


def _verdict(rows: Any, target: float) -> str:
    """``"≥ 0.9×: wall ❌ missed, CPU ✅ met"`` from rows with ``pipe_over_learner`` (wall) and ``_cpu`` ratios."""
    rows = list(rows)
    wall = all(r["pipe_over_learner"] >= target for r in rows)
    cpu = all(r["pipe_over_learner_cpu"] >= target for r in rows)
    return f"≥ {target}×: wall {_ok('met' if wall else 'MISSED')}, CPU {_ok('met' if cpu else 'MISSED')}"


def _median_rate(runs: list[dict[str, Any]]) -> float:
    return sorted(r["records_per_s"] for r in runs)[len(runs) // 2]


def peers_vs_deep_river(rows: dict[str, list[dict[str, Any]]], backend: str
                        ) -> tuple[float, float, float, str] | None:
    """(deep-river's accuracy and records/s, our fastest pipeline row's records/s at that accuracy or
    better and its name), or None when deep-river did not run; the rate is NaN when no row of ours qualifies."""
    dr = rows.get("deep-river Classifier (same MLP)") or []
    if not dr or any("error" in r for r in dr):
        return None
    dr_acc, dr_rate = dr[0]["accuracy"], _median_rate(dr)
    mine = [(_median_rate(runs), name) for name, runs in rows.items()
            if name.startswith(f"tensorstream pipeline ({backend}") and runs and "error" not in runs[0]
            and runs[0]["accuracy"] >= dr_acc]
    rate, name = max(mine) if mine else (float("nan"), "")
    return dr_acc, dr_rate, rate, name


def summary(out: Path, command: str) -> dict[str, Any]:
    """The target figures of the runs in ``out`` (see ``--json``)."""
    from tensorstream.bench.machine import machine_info

    tax, inf, peers = (_load(out / f"{n}.json") for n in ("tax", "inference", "peers"))
    res: dict[str, Any] = {}
    details: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command}
    if tax:
        res["tax"], details["tax"] = {}, {}
        for r in tax["rows"]:
            res["tax"].setdefault(r["backend"], {})[str(r["batch"])] = r["pipe_over_learner"]
            details["tax"].setdefault(r["backend"], {})[str(r["batch"])] = {
                k: r.get(k) for k in ("pipe_over_learner_cpu", "learner_over_raw", "pipeline", "learner", "raw",
                                      "learning", "records")}
    if inf:
        res["inference"] = {r["backend"]: r["pipe_over_learner"] for r in inf["throughput"]}
        details["inference"] = {r["backend"]: {k: r[k] for k in ("pipe_over_learner_cpu", "pipeline", "learner")}
                                for r in inf["throughput"]}
        if inf.get("p50_over_echo"):  # {backend: {rate: pipeline p50 / bare echo p50}}
            res["open_loop"] = {b: v.get("500") for b, v in inf["p50_over_echo"].items()}
            details["open_loop"] = inf["p50_over_echo"]
    if peers:
        res["peers"], details["peers"] = {}, {}
        for stream, rows in peers["streams"].items():
            for b in ("torch", "tensorflow"):
                found = peers_vs_deep_river(rows, b)
                if found is None:
                    continue
                dr_acc, dr_rate, rate, name = found
                res["peers"].setdefault(stream, {})[b] = None if rate != rate else rate / dr_rate
                details["peers"].setdefault(stream, {})[b] = {"deep_river_accuracy": dr_acc,
                                                              "deep_river_records_per_s": dr_rate,
                                                              "records_per_s": rate, "row": name}
    details["machine"] = next((d["machine"] for d in (tax, inf, peers) if d), None) or machine_info()
    return {**res, "details": details}


def render(out: Path, command: str) -> str:
    from tensorstream.bench.machine import describe, machine_info

    tax, inf, peers, soak = (_load(out / f"{n}.json") for n in ("tax", "inference", "peers", "soak"))
    demo = _load(out / "bench-demo" / "results.json")
    info = next((d["machine"] for d in (tax, inf, peers, soak) if d), None) or (demo or {}).get("meta") or machine_info()
    raw = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    kept = "" if str(raw).startswith("benchmarks/") else ", not committed"
    lines = [BEGIN, "", f"Machine: {describe(info)}. Command: `{command}` (raw output and JSON in `{raw}/`{kept}"
             "). Method, profiles and discussion: [docs/benchmarks.md](docs/benchmarks.md). Wall-clock "
             "ratios on this shared machine move with the neighbours' load; the CPU-time ratios much less.", ""]

    lines += ["**Targets** (each a ratio or figure measured in the same run):", "",
              "| benchmark | figure | torch | tensorflow | target |", "|---|---|---:|---:|---|"]
    if tax:
        for batch in sorted({r["batch"] for r in tax["rows"]}):
            by = {r["backend"]: r for r in tax["rows"] if r["batch"] == batch}
            cell = {b: (f"{r['pipe_over_learner']:.2f}× wall, {r['pipe_over_learner_cpu']:.2f}× CPU "
                        f"({r['pipeline']:,.0f} vs {r['learner']:,.0f} rec/s); checkpoints on time only: "
                        f"{r['pipe_ckpt_time_over_learner_cpu']:.2f}× CPU") for b, r in by.items()}
            lines.append(f"| streaming tax, batch {batch} | pipeline / in-memory learner (online training) | "
                         f"{cell.get('torch', '–')} | {cell.get('tensorflow', '–')} | "
                         f"{_verdict(by.values(), tax['target'])} |")
        by = {r["backend"]: r for r in tax["rows"] if r["batch"] == 32 and "learner_over_raw" in r}
        if by:
            target = tax.get("learner_target", 0.6)
            ok = all(r["learner_over_raw"] >= target for r in by.values())
            lines.append("| learner, batch 32 | in-memory learner / raw framework call (same learning) | "
                         + " | ".join(f"{by[b]['learner_over_raw']:.2f}× ({by[b]['learner']:,.0f} vs "
                                      f"{by[b]['raw']:,.0f} rec/s)" if b in by else "–" for b in ("torch", "tensorflow"))
                         + f" | ≥ {target}× {_ok('met' if ok else 'MISSED')} |")
    if inf:
        by = {r["backend"]: r for r in inf["throughput"]}
        lines.append(f"| inference, batch {inf['batch']} | pipeline topic→topic / in-memory batched predict | "
                     + " | ".join(f"{by[b]['pipe_over_learner']:.2f}× wall, {by[b]['pipe_over_learner_cpu']:.2f}× "
                                  f"CPU ({by[b]['pipeline']:,.0f} vs {by[b]['learner']:,.0f} rec/s)"
                                  if b in by else "–" for b in ("torch", "tensorflow"))
                     + f" | {_verdict(by.values(), inf['target_ratio'])} |")
        keys = list(dict.fromkeys((x["load"], round(x["rate"])) if x["load"] is None else (x["load"], None)
                                  for rs in inf["latency"].values() for x in rs))
        for load, fixed in keys:
            cells, flags = [], set()
            for b in ("torch", "tensorflow"):
                r = next((x for x in inf["latency"].get(b, []) if x["load"] == load
                          and (fixed is None or round(x["rate"]) == fixed)), None)
                cells.append("–" if r is None else f"p50 {_f(r.get('p50'), '{:,.1f}')} / p99 {_f(r.get('p99'), '{:,.1f}')} ms "
                                                   f"at {r['rate']:,.0f} rec/s")
                if r is not None and r.get("target") in ("met", "MISSED"):
                    flags.add(r["target"])
            what = f"{load:.0%} of max" if load is not None else f"{fixed:,} rec/s"
            tgt = (f"p99 ≤ {inf['target_p99_ms']:g} ms {_ok('MISSED' if 'MISSED' in flags else 'met')}"
                   if load == 0.5 else "–")
            lines.append(f"| inference latency, open loop, {what} | scheduled send → prediction received "
                         f"(fetch.wait.max.ms {inf.get('fetch_wait_ms', '?')}) | {cells[0]} | {cells[1]} | {tgt} |")
    if inf and inf.get("p50_over_echo"):
        r500 = {b: v.get("500") for b, v in inf["p50_over_echo"].items()}
        echo = next((x for x in inf["latency"].get("echo", []) if round(x["rate"]) == 500), {})
        target = inf.get("target_echo_ratio", 1.2)
        ok = all(v is not None and v <= target for v in r500.values())
        lines.append(f"| inference latency, open loop, 500 rec/s | pipeline p50 / bare confluent-kafka echo p50 "
                     f"({_f(echo.get('p50'), '{:,.1f}')} ms) | "
                     + " | ".join("–" if r500.get(b) is None else f"{r500[b]:.2f}×" for b in ("torch", "tensorflow"))
                     + f" | ≤ {target}× {_ok('met' if ok else 'MISSED')} |")
    if peers:
        for stream, rows in peers["streams"].items():
            cells, ok, dr_acc = [], True, None
            for b in ("torch", "tensorflow"):
                # our fastest pipeline row (any batch size) at deep-river's accuracy or better
                found = peers_vs_deep_river(rows, b)
                if found is None:
                    break
                dr_acc, dr_rate, rate, name = found
                if rate != rate:
                    cells.append("none at its accuracy")
                    ok = False
                    continue
                ok = ok and rate >= PEERS_TARGET * dr_rate
                cells.append(f"{rate / dr_rate:.1f}× ({name.removeprefix('tensorstream ')}, {rate:,.0f} vs "
                             f"{dr_rate:,.0f} rec/s)")
            if dr_acc is None:
                continue
            lines.append(f"| peers, {stream} | fastest pipeline at ≥ deep-river's accuracy ({dr_acc:.4f}) / "
                         f"deep-river | {cells[0]} | {cells[1]} | ≥ {PEERS_TARGET}× {_ok('met' if ok else 'MISSED')} |")
    if soak:
        res = soak["results"]
        for key, label, fmt, tgt_key, tgt in (
                ("rss_growth_mb", "RSS growth (MB) after warm-up (first line → highest)", "{:+.1f}", "target_rss",
                 f"< {soak['target_rss_mb']:g} MB"),
                ("rate_last_over_first", "throughput, median of the last 3 / first 3 intervals", "{:.2f}×", "target_rate",
                 f"≥ {soak['target_decay']}×")):
            flags = {r[tgt_key] for r in res.values()}
            lines.append(f"| soak, {soak['records']:,} records train+infer | {label} | "
                         + " | ".join(_f(res[b][key], fmt) + (f" ({res[b]['final']['steady_rate']:,.0f} rec/s)"
                                                             if key == "rss_growth_mb" else "") if b in res else "–"
                                      for b in ("torch", "tensorflow"))
                         + f" | {tgt} {_ok('MISSED' if 'MISSED' in flags else 'met')} |")
    lines.append("")

    if demo:
        lines += [f"**PyTorch vs TensorFlow** (`tensorstream bench --demo`; full report with plots: "
                  f"`{(out / 'bench-demo' / 'report.md').relative_to(ROOT) if out.is_relative_to(ROOT) else out / 'bench-demo' / 'report.md'}`):", "",
                  "| stream | variant | train rec/s | infer rec/s | first prediction s | peak RSS MiB | accuracy | code lines |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        verb = demo.get("verbosity", {})
        for s in demo["streams"]:
            for row in s["variants"].values():
                tr, inf_ = row.get("train") or {}, row.get("infer") or {}
                if "error" in tr:
                    lines.append(f"| {s['key']} | {row['title']} | error | | | | | |")
                    continue
                v = verb.get(f"{row['backend']}:{row['kind']}", {})
                lines.append(f"| {s['key']} ({s['records']:,}) | {row['title']} | {_f(tr.get('records_per_s'))} | "
                             f"{_f(inf_.get('records_per_s'))} | {_f(tr.get('first_prediction_s'), '{:.2f}')} | "
                             f"{_f(tr.get('peak_rss_mb'))} | {_f(tr.get('metrics', {}).get('accuracy'), '{:.4f}')} | "
                             f"{v.get('total', '–')} |")
        lines.append("")
    if peers:
        lines += ["**Peers** (prequential accuracy, records/s, one process each):", "",
                  "| learner | " + " | ".join(f"{k} acc. | {k} rec/s" for k in peers["streams"]) + " |",
                  "|---|" + "---:|---:|" * len(peers["streams"])]
        names = list(dict.fromkeys(n for rows in peers["streams"].values() for n in rows))
        for name in names:
            cells = []
            for rows in peers["streams"].values():
                runs = rows.get(name) or []
                if not runs or any("error" in r for r in runs):
                    cells += ["error", "–"]
                    continue
                rates = sorted(r["records_per_s"] for r in runs)
                cells += [f"{runs[0]['accuracy']:.4f}", f"{rates[len(rates) // 2]:,.0f}"]
            lines.append(f"| {name.replace('|', '&#124;')} | " + " | ".join(cells) + " |")
        check = peers.get("deep_river_readme_example") or {}
        if check:
            lines += ["", "deep-river 0.3.4 ran in its own venv (river 0.25) on the project's torch "
                      f"{info.get('versions', {}).get('torch', '')}; its README Classifier example "
                      + ("runs there (" + check["stdout"].splitlines()[0] + ")." if check.get("ok")
                         else "fails there: " + check.get("stderr", "").splitlines()[-1])]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def render_summary(figures: dict[str, Any], out: Path) -> str:
    """The README's short block: one row per target, from :func:`summary`'s figures."""
    from tensorstream.bench.machine import describe

    d = figures.get("details", {})
    tgt = {"tax": 0.9, "learner": 0.6, "inference": 0.8, "open_loop": 1.2, "peers": PEERS_TARGET}

    def cells(values: dict[str, Any], fmt: str = "{:.2f}×") -> list[str]:
        return ["–" if values.get(b) is None else fmt.format(values[b]) for b in ("torch", "tensorflow")]

    def verdict(values: dict[str, Any], target: float, below: bool = False) -> str:
        vals = [v for v in values.values() if v is not None]
        if not vals:
            return "–"
        ok = len(vals) == len(values) and all(v <= target if below else v >= target for v in vals)
        return f"{'≤' if below else '≥'} {target:g}× {_ok('met' if ok else 'MISSED')}"

    rows = []
    for batch in ("1", "32", "256"):
        by = {b: v.get(batch) for b, v in figures.get("tax", {}).items()}
        if any(v is not None for v in by.values()):
            rows.append((f"training pipeline / in-memory learner, batch {batch}", cells(by), verdict(by, tgt["tax"])))
    lr = {b: (v.get("32") or {}).get("learner_over_raw") for b, v in d.get("tax", {}).items()}
    if any(v is not None for v in lr.values()):
        rows.append(("in-memory learner / raw framework call, batch 32", cells(lr), verdict(lr, tgt["learner"])))
    if figures.get("inference"):
        rows.append(("inference pipeline / in-memory predict, batch 32", cells(figures["inference"]),
                     verdict(figures["inference"], tgt["inference"])))
    if figures.get("open_loop"):
        rows.append(("open-loop p50 at 500 rec/s / a bare confluent-kafka echo's", cells(figures["open_loop"]),
                     verdict(figures["open_loop"], tgt["open_loop"], below=True)))
    for stream, by in figures.get("peers", {}).items():
        rows.append((f"peers, {stream}: records/s over deep-river's at ≥ its accuracy", cells(by, "{:.1f}×"),
                     verdict(by, tgt["peers"])))
    raw = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    lines = [BEGIN, "", f"Machine: {describe(d['machine'])}, {d.get('date', '')}. Command: `{d.get('command', '')}` "
             f"(JSON in `{raw}/`). Every figure is a ratio of two rates measured in the same run; the full tables "
             "and the method: [docs/benchmarks.md](docs/benchmarks.md).", "",
             "| target | torch | tensorflow | target |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {c[0]} | {c[1]} | {v} |" for name, c, v in rows]
    lines += ["", END]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif "RESULTS_PLACEHOLDER" in text:
        text = text.replace("RESULTS_PLACEHOLDER", block, 1)
    elif "\n## Results\n" in text:  # first run: append the block at the end of the Results section
        head, rest = text.split("\n## Results\n", 1)
        nxt = rest.find("\n## ")
        body, tail = (rest, "") if nxt < 0 else (rest[: nxt + 1], rest[nxt + 1 :])
        text = head + "\n## Results\n" + body.rstrip("\n") + "\n\n" + block + "\n\n" + tail
    else:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block, no RESULTS_PLACEHOLDER and no '## Results'")
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (figures are noisier)")
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--out", type=Path, help="results directory (default reports/benchmarks-<date>)")
    ap.add_argument("--from", dest="from_dir", type=Path, help="do not run: render the table from this directory")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="gets the short block of targets")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="gets the full tables")
    ap.add_argument("--no-readme", action="store_true", help="print the tables, leave README.md and the docs alone")
    ap.add_argument("--command", help="the command to credit in the table (a directory assembled from several runs)")
    ap.add_argument("--json", type=Path, help="also write the target figures here (see the module docstring)")
    args = ap.parse_args()
    command = args.command or "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    if args.from_dir:
        out = args.from_dir.resolve()
    else:
        out = (args.out or ROOT / "reports" / f"benchmarks-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
        unknown = [n for n in names if n not in BENCHES]
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}: choose from {', '.join(BENCHES)}")
        run(names, out, args.quick, {})
    command_line = args.command or "python benchmarks/run_all.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    figures = summary(out, command_line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nfigures written to {args.json}")
    block = render(out, command)
    short = render_summary(figures, out)
    print("\n" + block + "\n\n" + short)
    if not args.no_readme:
        update_readme(args.docs, block)
        update_readme(args.readme, short)
        print(f"\n{args.docs} and {args.readme} updated")


if __name__ == "__main__":
    main()
