"""``tensorstream video ...``: produce frames, run a detector, annotate, evaluate.

See ``docs/video.md``. Frameworks are imported only by the commands that
build a detector (``run``/``detect``), and only the one the spec names.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from tensorstream.cli.common import STOP_GRACE_S, console, fail, kafka_settings, out, resolve_bootstrap, stop_signals

app = typer.Typer(help="Video streams: frames in, object detections out (PyTorch or TensorFlow).",
                  no_args_is_help=True)

BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", envvar="TENSORSTREAM_BOOTSTRAP_SERVERS",
                 help="Kafka bootstrap servers. Default: the local `tensorstream broker`."),
]




@app.command()
def produce(
    source: Annotated[str, typer.Argument(help="A video file, a directory of images, or "
                                               "synthetic:?seed=1&n=200&size=320&shapes=3 (moving shapes with "
                                               "ground-truth boxes).")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Frames topic (created if missing).")] = "frames",
    bootstrap_servers: BootstrapOpt = None,
    camera: Annotated[str, typer.Option(help="Camera id: the record key.")] = "cam0",
    encoding: Annotated[str, typer.Option(help="jpeg, or raw (uint8 HxWx3 tensor frames).")] = "jpeg",
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality.")] = 90,
    fps: Annotated[float, typer.Option(help="Frames per second (0 = as fast as possible).")] = 0.0,
    limit: Annotated[int | None, typer.Option(help="Stop after N source frames.")] = None,
    partitions: Annotated[int, typer.Option(help="Partitions when the topic is created.")] = 1,
    drop_policy: Annotated[str, typer.Option(
        help="none, or lag: skip frames while the detector is more than --max-lag frames behind "
             "(read from --detections-topic).")] = "none",
    detections_topic: Annotated[str | None, typer.Option(help="With --drop-policy lag: where the detector "
                                                              "writes.")] = None,
    max_lag: Annotated[int, typer.Option(help="With --drop-policy lag: frames the detector may lag.")] = 30,
) -> None:
    """Send frames to a topic, keyed by camera, with index/timestamp/size (and truth) headers."""
    from tensorstream.vision.frames import produce_frames

    servers = resolve_bootstrap(bootstrap_servers)
    with kafka_settings(servers) as cfg:
        try:
            stats = produce_frames(cfg, source, topic, camera=camera, encoding=encoding, quality=quality, fps=fps,
                                   limit=limit, partitions=partitions, drop_policy=drop_policy,
                                   detections_topic=detections_topic, max_lag=max_lag)
        except ValueError as e:
            fail(str(e))
    console.print(f"produced [bold]{stats.frames}[/] frames to {topic} in {stats.seconds:.2f}s "
                      f"({stats.fps:,.1f} fps, {stats.bytes / max(stats.frames, 1) / 1024:.1f} KiB/frame)"
                      + (f", dropped {stats.dropped}" if stats.dropped else ""))


def _spec(spec_path: Path | None, o: dict[str, Any]) -> Any:
    """The spec from YAML (or defaults), with the command-line options laid over it."""
    from tensorstream.vision.spec import VideoSpecError, load_video_spec, parse_video_spec

    try:
        data = load_video_spec(spec_path).model_dump(exclude_unset=True) if spec_path else {}
    except VideoSpecError as e:
        fail(str(e), code=2)
    data.setdefault("source", {"topic": "frames"})
    det = data.setdefault("detector", {})
    train = data.setdefault("train", {})
    for key, value in (("name", o["name"]), ("max_staleness_ms", o["max_staleness_ms"])):
        if value is not None:
            data[key] = value
    if o["frames"]:
        data["source"]["topic"] = o["frames"]
    if o["detections"]:
        data["sink"] = {"topic": o["detections"]}
    if o["batch_size"]:
        data.setdefault("batch", {})["max_size"] = o["batch_size"]
    for key in ("backend", "kind", "weights_path", "input_size", "score_threshold", "threads"):
        if o[key] is not None:
            det[key] = o[key]
    if o["pretrained"]:
        det["pretrained"] = True
    if o["classes"]:
        det["classes"] = [c.strip() for c in o["classes"].split(",") if c.strip()]
    if o["backend"] == "torch" and "kind" not in det:
        det["kind"] = "ssdlite320_mobilenet_v3_large"
    if o["train"] is not None:
        train["enabled"] = o["train"]
    if o["state_dir"]:
        data["state_dir"] = o["state_dir"]
    try:
        return parse_video_spec(data, f"({spec_path})" if spec_path else "(command line)")
    except VideoSpecError as e:
        fail(str(e), code=2)


@app.command()
def run(
    spec_path: Annotated[Path | None, typer.Argument(metavar="[VIDEO.yaml]", help="A video spec (optional: "
                                                                                   "options alone work too).")] = None,
    bootstrap_servers: BootstrapOpt = None,
    frames: Annotated[str | None, typer.Option(help="Frames topic (default: frames).")] = None,
    detections: Annotated[str | None, typer.Option(help="Detections topic (default: <frames>.detections).")] = None,
    name: Annotated[str | None, typer.Option(help="Pipeline name (DLQ <name>.dlq, group, checkpoints).")] = None,
    backend: Annotated[str | None, typer.Option(help="torch or tensorflow.")] = None,
    kind: Annotated[str | None, typer.Option(
        "--model", help="grid (tensorflow), ssdlite320_mobilenet_v3_large or "
                        "fasterrcnn_mobilenet_v3_large_320_fpn (torch).")] = None,
    weights_path: Annotated[str | None, typer.Option(
        "--weights", help="Local weights: .pt/.pth state dict (torch), .keras model (tensorflow), "
                          ".safetensors state (either).")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="torchvision's COCO weights (downloads; "
                                                                   "online machines only).")] = False,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names.")] = None,
    input_size: Annotated[int | None, typer.Option(help="Detector input size (square).")] = None,
    score_threshold: Annotated[float | None, typer.Option(help="Drop detections scoring below this.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Frames per micro-batch.")] = None,
    threads: Annotated[int | None, typer.Option(help="Framework intra-op threads (default: one per core).")] = None,
    max_staleness_ms: Annotated[int | None, typer.Option(help="Skip frames older than this (ms).")] = None,
    train: Annotated[bool | None, typer.Option("--train/--no-train", help="Fine-tune online on labelled "
                                                                           "frames.")] = None,
    produce_from: Annotated[str | None, typer.Option(
        "--produce", help="First send this source (see `video produce`) to the frames topic.")] = None,
    until_end: Annotated[bool, typer.Option("--until-end", help="Stop when the frames topic is read to its "
                                                                "end.")] = False,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after N seconds.")] = None,
    idle_timeout: Annotated[float | None, typer.Option(help="Stop after N seconds without frames.")] = None,
    state_dir: Annotated[str | None, typer.Option(help="Where checkpoints live (default .tensorstream; with the "
                                                       "embedded broker a temporary directory).")] = None,
    save_weights: Annotated[str | None, typer.Option(
        help="At the end, write the detector's weights (safetensors) here: pass it as --weights later.")] = None,
    evaluate: Annotated[bool, typer.Option("--eval", help="At the end, print mAP against the frames' "
                                                          "ground truth (torchmetrics).")] = False,
    result_json: Annotated[Path | None, typer.Option(help="Write the run's result here.")] = None,
) -> None:
    """Run a detector on a frames topic: one detections record per frame. Ctrl-C stops cleanly."""
    spec = _spec(spec_path, dict(frames=frames, detections=detections, name=name, backend=backend, kind=kind,
                                 weights_path=weights_path, pretrained=pretrained, classes=classes,
                                 input_size=input_size, score_threshold=score_threshold, batch_size=batch_size,
                                 threads=threads,
                                 max_staleness_ms=max_staleness_ms, train=train, state_dir=state_dir))
    from tensorstream.delivery import RunControl
    from tensorstream.pipeline.loop import PipelineError
    from tensorstream.vision.detect import DetectionPipeline, VideoProgress
    from tensorstream.vision.frames import produce_frames

    servers = resolve_bootstrap(bootstrap_servers, allow_embedded=True)
    tmp_state = None
    if servers is None and not state_dir and spec.train.enabled:
        tmp_state = tempfile.TemporaryDirectory(prefix="tensorstream-video-")
        spec = spec.model_copy(update={"state_dir": tmp_state.name})
    with kafka_settings(servers) as cfg:
        if produce_from:
            try:
                st = produce_frames(cfg, produce_from, spec.source.topic)
            except ValueError as e:
                fail(str(e))
            console.print(f"produced {st.frames} frames to {spec.source.topic}")
        status = console.status(f"[bold]{spec.name}[/] ({spec.detector.backend} {spec.detector.kind}): "
                                "loading the detector ...")

        def show(p: VideoProgress) -> None:
            lat = "-" if p.latency_p50_ms is None else f"{p.latency_p50_ms:,.0f} ms"
            extra = f"  learned {p.n_learned:,} (loss {p.loss:.3f})" if p.loss is not None else ""
            status.update(f"[bold]{spec.name}[/]: {p.frames:,} frames  {p.fps:,.1f} fps  latency p50 {lat}  "
                          f"skipped {p.skipped:,}  bad {p.bad:,}{extra}")

        control = RunControl(grace_s=STOP_GRACE_S)
        with status, stop_signals(control, summary=lambda: pipe.engine.summary()):
            try:
                pipe = DetectionPipeline(spec, cfg, on_progress=show, control=control)
            except (ValueError, OSError) as e:
                fail(str(e))
            try:
                result = pipe.run(until_end=until_end, max_frames=max_frames, timeout=timeout,
                                  idle_timeout=idle_timeout)
            except PipelineError as e:
                fail(str(e), code=e.exit_code)
        lat = "-" if result.latency_p50_ms is None else \
            f"{result.latency_p50_ms:,.0f} / {result.latency_p99_ms:,.0f} ms"
        console.print(f"[green]done[/]: {result.frames:,} frames, {result.detections:,} detections records to "
                      f"{spec.sink_topic}, {result.skipped:,} skipped, {result.bad:,} dead letters; "
                      f"{result.fps:,.1f} fps, latency p50/p99 {lat}")
        if result.n_learned:
            console.print(f"learned {result.n_learned:,} labelled frames in {result.train_steps:,} steps; "
                          f"last checkpoint {result.last_checkpoint} in {spec.checkpoint_url}"
                          + (" (temporary: pass --state-dir to keep it)" if tmp_state else ""))
        out: dict[str, Any] = result.to_dict()
        if evaluate:
            from tensorstream.vision.evaluate import evaluate_topics

            try:
                ev = evaluate_topics(cfg, spec.source.topic, spec.sink_topic)
            except ValueError as e:
                fail(str(e))
            out.print(f"mAP@0.5 {ev.map_50:.4f}  mAP@[.5:.95] {ev.map:.4f}  ({ev.frames} frames)")
            out["eval"] = ev.to_dict()
    if save_weights:
        from tensorstream.checkpoint import save_state

        save_state(save_weights, pipe.detector.state_dict(), {"backend": spec.detector.backend,
                                                               "kind": spec.detector.kind,
                                                               "version": result.model_version})
        console.print(f"weights written to {save_weights}")
    if result_json:
        result_json.write_text(json.dumps(out, indent=2, default=str))
    if tmp_state is not None:
        tmp_state.cleanup()


@app.command()
def annotate(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .mp4 / .mkv / .avi / .mov, or .gif.")],
    frames: Annotated[str, typer.Option(help="Frames topic.")] = "frames",
    detections: Annotated[str | None, typer.Option(help="Detections topic (default: <frames>.detections).")] = None,
    bootstrap_servers: BootstrapOpt = None,
    camera: Annotated[str | None, typer.Option(help="Only this camera's frames (default: all, in topic "
                                                    "order).")] = None,
    fps: Annotated[float, typer.Option(help="Frame rate of the output.")] = 10.0,
    codec: Annotated[str, typer.Option(help="Video codec: mpeg4 (FFmpeg's own), or libx264 for H.264.")] = "mpeg4",
    max_frames: Annotated[int | None, typer.Option(help="Stop after N frames.")] = None,
) -> None:
    """Write a video of the frames with their detections drawn on (boxes, labels, scores, latency)."""
    from tensorstream.vision.annotate import annotate_video

    servers = resolve_bootstrap(bootstrap_servers)
    with kafka_settings(servers) as cfg:
        try:
            st = annotate_video(cfg, frames, detections or f"{frames}.detections", output, camera=camera, fps=fps,
                                codec=codec, max_frames=max_frames)
        except (ValueError, KeyError) as e:
            fail(str(e))
    console.print(f"wrote {st.frames} frames to {st.path} ({st.annotated} annotated, {st.skipped} skipped, "
                      f"{st.missing} without detections, {st.undecodable} undecodable)")


@app.command("eval")
def evaluate(
    frames: Annotated[str, typer.Option(help="Frames topic (with frame.truth headers).")] = "frames",
    detections: Annotated[str | None, typer.Option(help="Detections topic (default: <frames>.detections).")] = None,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """mAP of a detections topic against the frames' ground truth (torchmetrics, COCO protocol)."""
    from tensorstream.vision.evaluate import evaluate_topics

    servers = resolve_bootstrap(bootstrap_servers)
    with kafka_settings(servers) as cfg:
        try:
            ev = evaluate_topics(cfg, frames, detections or f"{frames}.detections")
        except (ValueError, KeyError) as e:
            fail(str(e))
    out.print(json.dumps(ev.to_dict()))


# `detect` is another name for `run`
app.command("detect", help="Same as `run`.")(run)
