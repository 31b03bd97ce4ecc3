"""Video streams end to end on the real embedded broker: frames in, detections out.

- the tiny Keras grid detector learns online from a synthetic stream and reaches
  mAP@0.5 >= 0.5 on a held-out stream (another seed), evaluated through the full
  pipeline with torchmetrics' MeanAveragePrecision;
- a torchvision SSDlite with a user's local weights file runs through the
  pipeline; malformed JPEGs go to the DLQ;
- annotate writes an MP4 / GIF with exactly one frame per input frame;
- stale frames are skipped (and still committed), labels join from a topic,
  the producer drops frames when the detector lags.

No weights are downloaded: models are randomly initialised or trained here.
"""

from __future__ import annotations

import doctest
import importlib
import time
import uuid

import numpy as np
import orjson
import pytest

from tensorstream.kafka import KafkaSink, KafkaSource
from tensorstream.vision.annotate import annotate_video, count_video_frames, read_topic
from tensorstream.vision.detect import DetectionPipeline
from tensorstream.vision.spec import VideoSpec
from tensorstream.vision.evaluate import evaluate_topics
from tensorstream.vision.frames import (
    H_INDEX,
    H_TS,
    encode_image,
    headers_dict,
    open_frames,
    produce_frames,
    truth_header,
)
from tensorstream.vision.grid import Detections


def _spec(frames: str, **kw) -> VideoSpec:
    data = {"name": f"v-{uuid.uuid4().hex[:8]}", "source": {"topic": frames}, **kw}
    return VideoSpec.model_validate(data)


def _records(cfg, topic):
    return list(read_topic(cfg, topic))


class StubDetector:
    """A detector without a framework: one fixed box per frame, records what it learned."""

    framework, kind = "stub", "stub"

    def __init__(self, size=(64, 64), delay_s=0.0):
        self.input_size, self.class_names, self.delay_s = size, ["square", "circle", "triangle"], delay_s
        self.learned: list = []

    def predict(self, images):
        time.sleep(self.delay_s)
        return [Detections(np.array([[8, 8, 32, 32]], np.float32), np.array([1]), np.array([0.9], np.float32))
                for _ in images]

    def train_step(self, images, targets):
        self.learned += list(targets)
        return 0.5

    def state_dict(self):
        return {"w": np.zeros(1, np.float32)}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("module", ["frames", "grid", "train", "spec"])
def test_doctests(module):
    res = doctest.testmod(importlib.import_module(f"tensorstream.vision.{module}"))
    assert res.failed == 0 and res.attempted > 0


def test_synthetic_source_is_seeded_and_boxes_fit():
    a = list(open_frames("synthetic:?seed=3&n=120&size=96&shapes=3"))
    b = list(open_frames("synthetic:?seed=3&n=120&size=96&shapes=3"))
    assert len(a) == 120 and all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    boxes = np.concatenate([f.boxes for f in a])
    assert (boxes[:, 2] > boxes[:, 0]).all() and boxes.min() >= 0 and boxes.max() <= 96
    assert len({int(c) for f in a for c in f.labels}) == 3  # shapes are replaced: classes vary
    with pytest.raises(ValueError, match="unknown parameter"):
        list(open_frames("synthetic:?sede=1"))


@pytest.mark.slow
def test_grid_detector_learns_online_and_generalises(kafka_config, topic_factory, tmp_path):
    """Keras grid detector: online training on one synthetic stream, mAP@0.5 >= 0.5 on another."""
    train_topic, test_topic = topic_factory(), topic_factory()
    produce_frames(kafka_config, "synthetic:?seed=1&n=800&size=128&shapes=3", train_topic, quality=90)
    produce_frames(kafka_config, "synthetic:?seed=2&n=150&size=128&shapes=3", test_topic, quality=90)
    detector = {"backend": "tensorflow", "kind": "grid", "input_size": 128, "score_threshold": 0.05}

    t0 = time.perf_counter()
    spec = _spec(train_topic, detector=detector, batch={"max_size": 16, "max_wait_ms": 50},
                 train={"enabled": True, "batch_size": 16, "steps_per_batch": 5, "replay": 512,
                        "checkpoint_url": str(tmp_path / "ckpt")})
    trained = DetectionPipeline(spec, kafka_config).run(until_end=True, timeout=120)
    train_s = time.perf_counter() - t0
    assert trained.frames == 800 and trained.detections == 800 and trained.n_learned == 800
    assert trained.train_steps >= 240 and trained.last_checkpoint is not None
    assert train_s < 90, f"online training took {train_s:.0f}s"

    # Held-out stream, inference only, weights from the checkpoint (safetensors) the trainer wrote.
    state = tmp_path / "ckpt" / trained.last_checkpoint / "state.safetensors"
    infer = _spec(test_topic, detector={**detector, "weights_path": str(state)})
    result = DetectionPipeline(infer, kafka_config).run(until_end=True, timeout=60)
    assert result.frames == 150 and result.bad == 0 and result.skipped == 0
    ev = evaluate_topics(kafka_config, test_topic, infer.sink_topic)
    assert ev.frames == 150
    print(f"video eval: mAP@0.5 {ev.map_50:.3f}, mAP {ev.map:.3f}; trained {train_s:.1f}s, "
          f"{trained.train_steps} steps")
    assert ev.map_50 >= 0.5, f"held-out mAP@0.5 {ev.map_50:.3f} after {train_s:.0f}s of training"


def test_ssdlite_with_local_weights_file_and_dlq(kafka_config, topic_factory, tmp_path, group_id):
    import torch
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(7)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    weights = tmp_path / "ssd.pt"
    torch.save(model.state_dict(), weights)

    topic = topic_factory()
    produce_frames(kafka_config, "synthetic:?seed=4&n=5&size=320&shapes=2", topic)
    good = encode_image(next(open_frames("synthetic:?seed=5&n=1&size=320")).image)
    with KafkaSink(kafka_config) as sink:
        for i, value in enumerate([b"\xff\xd8\xff\xe0 this is not a jpeg", good[: len(good) // 3]]):
            sink.produce(topic, value, key=b"cam0", headers=[(H_INDEX, str(100 + i).encode()),
                                                             (H_TS, str(int(time.time() * 1000)).encode())])
        sink.flush()

    spec = _spec(topic, source={"topic": topic, "group_id": group_id},
                 detector={"backend": "torch", "kind": "ssdlite320_mobilenet_v3_large", "weights_path": str(weights),
                           "score_threshold": 0.0, "max_detections": 20})
    threads = torch.get_num_threads()
    try:  # one intra-op thread: two stall each other on a busy 2-core machine (set back after)
        torch.set_num_threads(1)
        pipe = DetectionPipeline(spec, kafka_config)
        result = pipe.run(until_end=True, timeout=60)
    finally:
        torch.set_num_threads(threads)
    loaded = pipe.detector.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert (result.frames, result.detections, result.bad) == (7, 5, 2)

    dets = _records(kafka_config, spec.sink_topic)
    assert len(dets) == 5
    for rec in dets:
        v = orjson.loads(rec.value)
        h = headers_dict(rec.headers)
        assert rec.key == b"cam0" and v["camera"] == "cam0" and (v["width"], v["height"]) == (320, 320)
        version = f"{spec.name}-torch-ssdlite320_mobilenet_v3_large:ssd.pt"
        assert v["model_version"] == h["model.version"].decode() == version
        assert int(h["frame.index"]) == v["frame_index"] and h["source.topic"].decode() == topic
        assert len(v["boxes"]) == len(v["labels"]) == len(v["names"]) == len(v["scores"]) <= 20
        assert all(len(b) == 4 for b in v["boxes"]) and set(v["names"]) <= {"square", "circle", "triangle"}
        assert v["skipped"] is False and v["latency_ms"] >= 0
    assert sorted(orjson.loads(r.value)["frame_index"] for r in dets) == [0, 1, 2, 3, 4]

    dlq = _records(kafka_config, spec.dlq_topic)
    assert len(dlq) == 2
    for rec in dlq:
        h = headers_dict(rec.headers)
        assert h["error.type"] == b"decode_error" and h["error.message"].startswith(b"image:")
        assert h["source.topic"].decode() == topic and int(h["frame.index"]) in (100, 101)
    # offsets were committed after delivery: the group is at the end of the topic
    with KafkaSource(kafka_config, group_id, [topic]) as src:
        assert src.committed([(topic, 0)]) == {(topic, 0): 7}


def test_safetensors_weights_for_torch_detector(tmp_path):
    import torch  # noqa: F401
    from safetensors.torch import save_file

    from tensorstream.vision.models_torch import build_torch_detector

    kw = dict(kind="fasterrcnn_mobilenet_v3_large_320_fpn", input_size=(320, 320), class_names=["a", "b"])
    a = build_torch_detector(seed=1, **kw)
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    b = build_torch_detector(seed=2, weights_path=str(tmp_path / "w.safetensors"), **kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    out = b.predict(np.zeros((2, 320, 320, 3), np.uint8))
    assert len(out) == 2 and all(d.boxes.shape[1] == 4 for d in out)
    with pytest.raises(ValueError, match="does not fit"):
        build_torch_detector(weights_path=str(tmp_path / "w.safetensors"),
                             **{**kw, "class_names": ["a", "b", "c", "d"]})


def test_user_keras_model_file(tmp_path):
    from tensorstream.vision.models_tf import build_grid_model, build_keras_detector

    path = tmp_path / "mine.keras"
    build_grid_model((64, 64), 2, width=8).save(path)
    det = build_keras_detector(kind="grid", keras_path=str(path), input_size=(64, 64), class_names=["x", "y"],
                               score_threshold=0.0)
    assert det.input_size == (64, 64) and det.kind == "keras:mine.keras"
    out = det.predict(np.zeros((3, 64, 64, 3), np.uint8))
    assert len(out) == 3
    loss = det.train_step(np.zeros((2, 64, 64, 3), np.uint8),
                          [(np.array([[4, 4, 20, 20]], np.float32), np.array([1]))] * 2)
    assert np.isfinite(loss)


def _send_frames(cfg, topic, n, *, size=64, ts_ms=None, truth=True, key=b"cam0"):
    with KafkaSink(cfg) as sink:
        for i, f in enumerate(open_frames(f"synthetic:?seed=9&n={n}&size={size}")):
            ts = ts_ms(i) if ts_ms else int(time.time() * 1000)
            headers = [(H_INDEX, str(i).encode()), (H_TS, str(ts).encode()), ("frame.width", str(size).encode()),
                       ("frame.height", str(size).encode())]
            if truth:
                headers.append(("frame.truth", truth_header(f.boxes, f.labels)))
            sink.produce(topic, encode_image(f.image), key=key, headers=headers, timestamp_ms=ts)
        sink.flush()


def test_annotate_writes_one_video_frame_per_input_frame(kafka_config, topic_factory, tmp_path):
    import av  # noqa: F401
    frames = topic_factory()
    _send_frames(kafka_config, frames, 12, size=96)
    with KafkaSink(kafka_config) as sink:  # detections for frames 0..9; 3 skipped; 10, 11 have none
        for i in range(10):
            v = {"camera": "cam0", "frame_index": i, "skipped": i == 3, "latency_ms": 12.5, "staleness_ms": 900,
                 "boxes": [[10, 10, 40, 50 + i]] if i != 3 else [], "labels": [0] if i != 3 else [],
                 "names": ["square"] if i != 3 else [], "scores": [0.87] if i != 3 else []}
            sink.produce(f"{frames}.detections", orjson.dumps(v), key=b"cam0")
        sink.flush()
    mp4 = annotate_video(kafka_config, frames, f"{frames}.detections", tmp_path / "out.mp4", fps=5)
    assert (mp4.frames, mp4.annotated, mp4.skipped, mp4.missing) == (12, 9, 1, 2)
    assert count_video_frames(tmp_path / "out.mp4") == 12
    import av

    with av.open(str(tmp_path / "out.mp4")) as c:  # playable: a real video stream, decodable frames
        s = c.streams.video[0]
        assert (s.width, s.height) == (96, 96)
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert first.std() > 0
    gif = annotate_video(kafka_config, frames, f"{frames}.detections", tmp_path / "out.gif", fps=5)
    assert gif.frames == 12 and count_video_frames(tmp_path / "out.gif") == 12


def test_stale_frames_are_skipped_counted_and_committed(kafka_config, topic_factory, group_id):
    topic = topic_factory()
    now = int(time.time() * 1000)
    _send_frames(kafka_config, topic, 20, ts_ms=lambda i: now - 60_000 if i < 15 else now + 60_000)
    spec = _spec(topic, source={"topic": topic, "group_id": group_id}, max_staleness_ms=5_000)
    result = DetectionPipeline(spec, kafka_config, detector=StubDetector(delay_s=0.01)).run(until_end=True,
                                                                                           timeout=60)
    assert (result.frames, result.detections, result.skipped) == (20, 20, 15)
    values = [orjson.loads(r.value) for r in _records(kafka_config, spec.sink_topic)]
    skipped = [v for v in values if v["skipped"]]
    assert len(skipped) == 15 and all(v["boxes"] == [] and v["staleness_ms"] > 5000 for v in skipped)
    assert all(v["width"] == 64 for v in skipped)
    assert sorted(v["frame_index"] for v in values if not v["skipped"]) == list(range(15, 20))
    with KafkaSource(kafka_config, group_id, [topic]) as src:
        assert src.committed([(topic, 0)]) == {(topic, 0): 20}


def test_labels_topic_join_trains_on_matching_frames(kafka_config, topic_factory, tmp_path):
    frames, labels = topic_factory(), topic_factory()
    _send_frames(kafka_config, frames, 10, truth=False)
    with KafkaSink(kafka_config) as sink:  # labels for even frames only, boxes in source pixels (64 px)
        for i in range(0, 10, 2):
            sink.produce(labels, truth_header(np.array([[0, 0, 32, 32]], np.float32), np.array([i % 3])),
                         key=b"cam0", headers=[(H_INDEX, str(i).encode())])
        sink.flush()
    det = StubDetector(size=(32, 32))
    spec = _spec(frames, train={"enabled": True, "labels_topic": labels, "batch_size": 1,
                                "checkpoint_url": str(tmp_path / "ck")})
    result = DetectionPipeline(spec, kafka_config, detector=det).run(until_end=True, timeout=60)
    assert result.frames == 10 and result.n_learned == 5 and result.last_checkpoint is not None
    assert len(det.learned) == 5  # each joined frame learned once (batch_size 1)
    boxes = {tuple(np.asarray(b).ravel().tolist()) for b, _ in det.learned}
    assert boxes == {(0.0, 0.0, 16.0, 16.0)}  # scaled to the detector's 32 px input
    assert sorted({int(lab[0]) for _, lab in det.learned}) == [0, 1, 2]


def test_producer_drops_frames_while_the_detector_lags(kafka_config, topic_factory):
    frames, dets = topic_factory(), topic_factory()
    stats = produce_frames(kafka_config, "synthetic:?seed=1&n=40&size=48", frames, drop_policy="lag",
                           detections_topic=dets, max_lag=5)
    assert (stats.frames, stats.dropped) == (6, 34)  # nobody detects: 5 frames of slack, then drops
    recs = _records(kafka_config, frames)
    assert [int(headers_dict(r.headers)[H_INDEX]) for r in recs] == list(range(6))
    with pytest.raises(ValueError, match="detections-topic"):
        produce_frames(kafka_config, "synthetic:?n=1", frames, drop_policy="lag")


def test_cli_produce_and_eval(kafka_config, topic_factory):
    from typer.testing import CliRunner

    from tensorstream.cli import app

    topic = topic_factory()
    servers = kafka_config.bootstrap_servers
    r = CliRunner().invoke(app, ["video", "produce", "synthetic:?seed=1&n=6&size=64", "-t", topic, "-b", servers,
                                 "--encoding", "raw"])
    assert r.exit_code == 0, r.output
    recs = _records(kafka_config, topic)
    assert len(recs) == 6 and recs[0].value[:4] == b"TSF1"
    # perfect "detections" (the truth itself) score mAP 1 through `video eval`
    with KafkaSink(kafka_config) as sink:
        for rec in recs:
            t = orjson.loads(headers_dict(rec.headers)["frame.truth"])
            v = {"frame_index": int(headers_dict(rec.headers)[H_INDEX]), "boxes": t["boxes"],
                 "labels": t["labels"], "scores": [1.0] * len(t["labels"]), "skipped": False}
            sink.produce(f"{topic}.detections", orjson.dumps(v), key=rec.key)
        sink.flush()
    r = CliRunner().invoke(app, ["video", "eval", "--frames", topic, "-b", servers])
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout.strip().splitlines()[-1])["map_50"] == pytest.approx(1.0)
    r = CliRunner().invoke(app, ["video", "produce", "synthetic:?n=1", "-t", topic, "-b", servers,
                                 "--drop-policy", "sometimes"])
    assert r.exit_code == 1


def test_video_spec_errors_name_the_field():
    from tensorstream.vision.spec import VideoSpecError, parse_video_spec

    with pytest.raises(VideoSpecError, match="detector"):
        parse_video_spec({"source": {"topic": "f"}, "detector": {"backend": "torch", "kind": "grid"}})
    with pytest.raises(VideoSpecError, match="max_staleness_ms"):
        parse_video_spec({"source": {"topic": "f"}, "max_staleness_ms": -1})
