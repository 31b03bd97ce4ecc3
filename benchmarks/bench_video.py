"""Detection pipeline throughput, latency and frame dropping (320x320 JPEG frames).

    python benchmarks/bench_video.py [--backlog 64] [--live-seconds 6] [--fps 30] [--staleness-ms 250] [--threads 1]

For SSDlite (torchvision ``ssdlite320_mobilenet_v3_large``, random init) and the
Keras grid detector (random init), at micro-batch 1 and 8, on the embedded broker:

- **frames/s**: a backlog of ``--backlog`` frames, read to the end (group join
  excluded); baseline measured in the same run: the bare detector's
  ``predict`` on already-decoded frames at the same batch size, so the ratio
  is what the pipeline (Kafka, JPEG decode, resize, JSON, delivery) costs;
- **live**: a camera at ``--fps`` for ``--live-seconds`` while the pipeline runs
  with ``max_staleness_ms``: p50/p99 capture-to-detection latency of the frames
  detected, and the ratio of frames skipped as stale (dropped).

Random weights make SSDlite's post-processing (score filter, NMS over many
near-uniform candidates) heavier than a trained model's; the grid detector's
untrained objectness keeps almost no box.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tensorstream.kafka import EmbeddedBroker, KafkaConfig  # noqa: E402
from tensorstream.vision.detect import DetectionPipeline  # noqa: E402
from tensorstream.vision.spec import VideoSpec, build_detector  # noqa: E402
from tensorstream.vision.frames import decode_image, encode_image, open_frames, produce_frames  # noqa: E402

SIZE = 320
MODELS = {
    "SSDlite (torch)": {"backend": "torch", "kind": "ssdlite320_mobilenet_v3_large"},
    "Keras grid (TF)": {"backend": "tensorflow", "kind": "grid"},
}


def bare_fps(detector, batch: int, n: int = 48) -> float:
    source = f"synthetic:?seed=3&n={batch}&size={SIZE}"
    imgs = np.stack([decode_image(encode_image(f.image)) for f in open_frames(source)])
    detector.predict(imgs)  # warm-up (tracing, allocations)
    t = time.perf_counter()
    for _ in range(max(1, n // batch)):
        detector.predict(imgs)
    return max(1, n // batch) * batch / (time.perf_counter() - t)


def run_case(cfg: KafkaConfig, detector, det_spec: dict, batch: int, args) -> dict:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    # 1. backlog throughput
    topic = f"{name}-backlog"
    produce_frames(cfg, f"synthetic:?seed=1&n={args.backlog}&size={SIZE}", topic)
    spec = VideoSpec.model_validate({"name": name, "source": {"topic": topic}, "detector": det_spec,
                                     "batch": {"max_size": batch, "max_wait_ms": 5}})
    backlog = DetectionPipeline(spec, cfg, detector=detector).run(until_end=True, timeout=600)
    # 2. live camera at --fps, stale frames skipped
    live_topic = f"{name}-live"
    n_live = int(args.fps * args.live_seconds)
    spec = VideoSpec.model_validate({"name": name + "-live", "source": {"topic": live_topic}, "detector": det_spec,
                                     "batch": {"max_size": batch, "max_wait_ms": 5},
                                     "max_staleness_ms": args.staleness_ms})
    pipe = DetectionPipeline(spec, cfg, detector=detector)
    from tensorstream.kafka import KafkaAdmin

    KafkaAdmin(cfg).ensure_topic(live_topic)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(r=pipe.run(max_frames=n_live, timeout=600)))
    runner.start()
    while not getattr(pipe, "source", None) or not pipe.source.assigned:  # the camera starts once we are in
        time.sleep(0.05)
    produce_frames(cfg, f"synthetic:?seed=2&n={n_live}&size={SIZE}", live_topic, fps=args.fps)
    runner.join()
    live = result["r"]
    return {"fps": backlog.fps, "p50": live.latency_p50_ms, "p99": live.latency_p99_ms,
            "dropped": live.skipped / max(live.frames, 1), "live_frames": live.frames}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backlog", type=int, default=64)
    ap.add_argument("--live-seconds", type=float, default=6.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--staleness-ms", type=int, default=250)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=1,
                    help="framework intra-op threads (0: its default). On a shared 2-core machine two torch "
                         "threads stall each other whenever other processes hold a core.")
    args = ap.parse_args()

    rows = []
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig.local(broker.bootstrap_servers)
        for label in args.models.split(","):
            from tensorstream.vision.spec import DetectorSpec

            det_spec = {**MODELS[label], "input_size": SIZE, "threads": args.threads or None}
            detector = build_detector(DetectorSpec.model_validate(det_spec))
            for batch in (1, 8):
                base = bare_fps(detector, batch)
                r = run_case(cfg, detector, det_spec, batch, args)
                rows.append((label, batch, base, r))
                print(f"  {label} batch {batch}: {r}", flush=True)

    print(f"\n320x320 JPEG frames; live camera at {args.fps:g} fps for {args.live_seconds:g}s, "
          f"max_staleness_ms={args.staleness_ms}; {os.cpu_count()} CPU cores, {args.threads or 'default'} "
          f"intra-op thread(s); load average at the end {os.getloadavg()[0]:.1f}")
    head = (f"{'model':<17} {'batch':>5} {'bare fps':>9} {'pipeline fps':>13} {'ratio':>6} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'dropped':>8}")
    print(head)
    print("-" * len(head))
    for label, batch, base, r in rows:
        p50 = f"{r['p50']:.0f}" if r["p50"] is not None else "-"
        p99 = f"{r['p99']:.0f}" if r["p99"] is not None else "-"
        print(f"{label:<17} {batch:>5} {base:>9.1f} {r['fps']:>13.1f} {r['fps'] / base:>6.2f} "
              f"{p50:>8} {p99:>8} {r['dropped']:>8.1%}")


if __name__ == "__main__":
    main()
