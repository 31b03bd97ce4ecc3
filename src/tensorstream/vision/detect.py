"""The detection pipeline: frames topic -> decode -> detector -> detections topic.

One detections record per frame, same key (camera id), JSON value::

    {"camera": "cam0", "frame_index": 17, "capture_ts_ms": 1767312000123,
     "width": 640, "height": 480,
     "boxes": [[x1, y1, x2, y2], ...],   # in the SOURCE frame's pixels
     "labels": [0, ...], "names": ["square", ...], "scores": [0.91, ...],
     "skipped": false, "latency_ms": 38.5, "model_version": "video-tensorflow-grid",
     "source": {"topic": "frames", "partition": 0, "offset": 17}}

with the pipeline headers (``model.version``, ``source.topic``,
``source.partition``, ``source.offset``, ``event.timestamp.ms``) plus
``frame.index``, ``frame.ts_ms`` and ``latency.ms``. ``latency_ms`` is
end-to-end: from the frame's capture timestamp to its detections record being
handed to the producer.

The loop, per micro-batch (``batch.max_size`` frames or ``batch.max_wait_ms``):

1. **stale-frame skipping** (``max_staleness_ms``): a frame older than that
   when its batch is taken is not decoded or detected; it gets a detections
   record with ``"skipped": true`` and empty detections (so every frame still
   has exactly one record and annotate/eval can tell skipped from "nothing
   found"), is counted, and its offset is committed like any other. A
   detector slower than the camera thus stays near real time instead of
   growing lag without bound;
2. **decode** in a thread pool (PIL releases the GIL; JPEGs decode at a reduced
   DCT scale when downscaling), resized to the detector's input size;
   undecodable frames go to ``<name>.dlq`` with ``error.type`` /
   ``error.message`` headers;
3. **detect** the batch, scale boxes back to each frame's size, emit;
4. **learn** (``train.enabled``): labelled frames (``frame.truth`` header, or
   a labels topic joined on camera + frame index) fine-tune the detector
   after their detections went out (test-then-train).

Offsets: inference commits every ``commit_interval_s`` after the detections
and dead letters they cover are delivered (flush, then commit). Training
commits only after a checkpoint (``CheckpointStore``: weights as safetensors,
plus the offsets they reflect) is durable, and resumes from it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import KafkaException

from tensorstream.codecs import DecodeError
from tensorstream.delivery import DeadLetters, DeliveryEngine, RunControl
from tensorstream.kafka import TP, KafkaAdmin, KafkaConfig, KafkaSink, KafkaSource, Record
from tensorstream.pipeline.batching import next_batch
from tensorstream.pipeline.loop import StopConditions, run_loop
from tensorstream.vision.frames import H_HEIGHT, H_INDEX, H_TRUTH, H_TS, H_WIDTH, decode_sized, headers_dict, parse_truth
from tensorstream.vision.grid import Detections, Detector
from tensorstream.vision.spec import VideoSpec, build_detector

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the loop


@dataclass
class VideoProgress:
    frames: int
    fps: float
    skipped: int
    bad: int
    latency_p50_ms: float | None
    n_learned: int
    loss: float | None
    elapsed_s: float


@dataclass
class VideoResult:
    frames: int  # frame records consumed (decoded, skipped or bad)
    detections: int  # detections records emitted (skipped frames included)
    skipped: int
    bad: int
    seconds: float
    fps: float  # frames per second, from the first frame on (group join excluded)
    latency_p50_ms: float | None  # capture -> detections, frames detected (not skipped)
    latency_p99_ms: float | None
    model_version: str
    n_learned: int = 0
    train_steps: int = 0
    loss: float | None = None
    checkpoints: int = 0
    last_checkpoint: str | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("latencies_ms")
        return d


def _capture_ts(rec: Record, h: dict[str, bytes]) -> int | None:
    raw = h.get(H_TS)
    if raw is not None:
        try:
            return int(raw)
        except ValueError:
            pass
    return rec.timestamp_ms


def _int_header(h: dict[str, bytes] | None, name: str) -> int | None:
    try:
        return int(h[name]) if h else None
    except (KeyError, ValueError):
        return None


def _frame_index(rec: Record, h: dict[str, bytes]) -> int:
    try:
        return int(h[H_INDEX])
    except (KeyError, ValueError):
        return rec.offset  # no index header: the offset is the best stable id


class DetectionPipeline:
    """A :class:`VideoSpec` running against a broker.

    ``run()`` processes micro-batches until ``max_frames`` frames, ``until_end``
    (every assigned partition read to its end), ``timeout`` seconds,
    ``idle_timeout`` seconds without data, or ``stop()``; then it checkpoints
    (training) or commits, and closes: the tabular pipeline's loop
    (:func:`~tensorstream.pipeline.loop.run_loop`) and commit order
    (:class:`~tensorstream.delivery.DeliveryEngine`). ``detector`` may be passed
    in (tests, benchmarks) instead of built from the spec.
    """

    def __init__(self, spec: VideoSpec, kafka: KafkaConfig, *, detector: Detector | None = None,
                 on_progress: Callable[[VideoProgress], None] | None = None, control: RunControl | None = None):
        self.spec = spec
        self.kafka = kafka
        self.on_progress = on_progress
        self.control = control or RunControl()
        self.detector = detector if detector is not None else build_detector(spec.detector)
        self.input_size = tuple(self.detector.input_size)
        self.class_names = list(self.detector.class_names)
        self.frames = self.emitted = self.skipped = self.bad = self.bad_labels = 0
        self._latencies: list[float] = []
        self._t_first: float | None = None
        self._last_commit = time.perf_counter()
        self.model_version = self._initial_version()
        self.trainer = None
        self.store = None
        self.checkpoints = 0
        self.last_checkpoint: str | None = None
        self.engine = DeliveryEngine(control=self.control, resume_from_positions=spec.train.enabled,
                                     persist=self._persist if spec.train.enabled else None,
                                     refusals=(KafkaException,))
        # labels-topic join: (camera, frame index) -> waiting frame image / waiting truth
        self._frames_waiting: OrderedDict[tuple[bytes | None, int], tuple[np.ndarray, float, float]] = OrderedDict()
        self._labels_waiting: OrderedDict[tuple[bytes | None, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        if spec.train.enabled:
            from tensorstream.checkpoint import CheckpointStore
            from tensorstream.vision.train import OnlineTrainer

            t = spec.train
            self.trainer = OnlineTrainer(self.detector, batch_size=t.batch_size, steps_per_batch=t.steps_per_batch,
                                         replay=t.replay, seed=spec.detector.seed)
            self.store = CheckpointStore(spec.checkpoint_url, keep_last=t.keep_last)
            self._restore()
        self._ckpt_n = self.trainer.n_learned if self.trainer else 0
        self._ckpt_t = time.monotonic()

    def _initial_version(self) -> str:
        d = self.spec.detector
        base = f"{self.spec.name}-{d.backend}-{d.kind}"
        if d.weights_path:
            return f"{base}:{Path(d.weights_path).name}"
        return f"{base}:pretrained" if d.pretrained else base

    def stop(self) -> None:
        self.control.request_stop("stop()")

    # -- state ------------------------------------------------------------
    def _restore(self) -> None:
        from tensorstream.checkpoint import CheckpointError

        assert self.store is not None and self.trainer is not None
        found = self.store.latest()
        if found is None:
            return
        state, info = found
        if info.spec_hash != self.spec.spec_hash():
            raise CheckpointError(f"checkpoint {info.id} in {self.spec.checkpoint_url} was written for another "
                                  "detector (backend/kind/classes/input size); use another state_dir or name")
        self.detector.load_state_dict(state)
        self.trainer.n_learned = info.n_learned
        self.engine.positions = dict(info.offsets)
        self.engine.durable = dict(info.offsets)
        self.last_checkpoint = info.id
        log.info("restored checkpoint %s: %d frames learned; resuming from %s", info.id, info.n_learned,
                 info.offsets)

    def _persist(self, offsets: dict[TP, int]) -> Any:
        """Training (called by the engine, after the flush): write the checkpoint (fsynced)."""
        assert self.store is not None and self.trainer is not None
        self.trainer.flush()  # learn what is queued, so the checkpoint reflects every offset it stores
        metrics = {"loss": self.trainer.last_loss} if self.trainer.last_loss is not None else {}
        info = self.store.save(self.detector.state_dict(), offsets=offsets,
                               n_learned=self.trainer.n_learned, backend=self.spec.detector.backend,
                               spec_hash=self.spec.spec_hash(), metrics=metrics, parent=self.last_checkpoint,
                               extra={"kind": self.spec.detector.kind, "classes": self.class_names})
        self.checkpoints += 1
        self.last_checkpoint = info.id
        self._ckpt_n, self._ckpt_t = self.trainer.n_learned, time.monotonic()
        log.info("checkpoint %s: %d frames learned", info.id, info.n_learned)
        return info

    def checkpoint(self) -> str | None:
        """Training: flush outputs -> write the checkpoint (fsynced) -> commit the offsets it reflects."""
        outcome = self.engine.commit(force_persist=self.trainer is not None and self.trainer.n_learned != self._ckpt_n)
        return outcome.persisted.id if outcome.persisted is not None else None

    # -- the loop (a LoopWorker: pipeline/loop.py) ------------------------------
    def run(self, *, max_frames: int | None = None, until_end: bool = False, timeout: float | None = None,
            idle_timeout: float | None = None) -> VideoResult:
        spec = self.spec
        admin = KafkaAdmin(self.kafka)
        topics = [spec.source.topic]
        if spec.train.enabled and spec.train.labels_topic:
            topics.append(spec.train.labels_topic)
        for t in (*topics, spec.sink_topic):
            admin.ensure_topic(t)
        self.source = KafkaSource(self.kafka, spec.group_id, topics, auto_offset_reset=spec.source.auto_offset_reset,
                                  on_revoke=self.engine.on_revoke,
                                  start_offsets=self.engine.start_offset if self.trainer else None,
                                  # frames are big: prefetch 16 MiB per partition, not librdkafka's 64 MiB
                                  **{"queued.max.messages.kbytes": 16384,
                                     "fetch.wait.max.ms": spec.source.fetch_wait_ms})
        self.sink = KafkaSink(self.kafka)
        self.engine.sink, self.engine.committer = self.sink, self.source.commit
        self.engine._owned = lambda: self.source.assigned
        self.dead_letters = DeadLetters(self.sink, spec.dlq_topic)
        self._pool = ThreadPoolExecutor(spec.decode_threads, thread_name_prefix="tensorstream-decode")
        t0 = time.perf_counter()
        run_loop(self, StopConditions(max_frames, until_end, timeout, idle_timeout), self.on_progress)
        return self._result(t0)

    def before_batch(self) -> None:
        pass

    def next_batch(self) -> list[Record]:
        b = self.spec.batch
        return next_batch(self.source, b.max_size, b.max_wait_ms / 1000, lambda: self.control.stopping)

    def processed(self) -> int:
        return self.frames

    def commit_due(self) -> bool:
        if self.trainer is None:
            return time.perf_counter() - self._last_commit >= self.spec.commit_interval_s
        t = self.spec.train
        learned = self.trainer.n_learned - self._ckpt_n
        owed = learned > 0 or self.engine.positions != self.engine.durable
        return learned >= t.checkpoint_every_frames or (owed and time.monotonic() - self._ckpt_t >= t.checkpoint_every_s)

    def commit(self) -> None:
        """Training: flush -> checkpoint -> commit; inference: flush -> commit (see DeliveryEngine)."""
        self.engine.commit(force_persist=self.trainer is not None and self.trainer.n_learned != self._ckpt_n)
        self._last_commit = time.perf_counter()
        self._ckpt_t = time.monotonic()

    def progress(self, t0: float) -> VideoProgress:
        return self._progress(t0)

    def close_extras(self) -> None:
        self._pool.shutdown(wait=True)

    def process(self, batch: list[Record]) -> None:
        batch = self.engine.admit(batch, self.source.assigned)
        if self._t_first is None:
            self._t_first = time.perf_counter()
        labels_topic = self.spec.train.labels_topic if self.trainer else None
        now_ms = time.time() * 1000
        staleness = self.spec.max_staleness_ms
        todo: list[tuple[Record, dict[str, bytes], int | None, int]] = []
        for rec in batch:
            h = headers_dict(rec.headers)
            if labels_topic is not None and rec.topic == labels_topic:
                self._on_label(rec, h)
                continue
            self.frames += 1
            ts = _capture_ts(rec, h)
            idx = _frame_index(rec, h)
            if staleness is not None and ts is not None and now_ms - ts > staleness:
                self.skipped += 1
                self._emit(rec, idx, ts, None, None, skipped=True, hdrs=h)
            else:
                todo.append((rec, h, ts, idx))
        if todo:
            self._detect(todo)
        self.engine.advance(batch)
        self.sink.poll(0)

    def _decode(self, value: bytes | None) -> tuple[int, int, np.ndarray] | DecodeError:
        try:
            return decode_sized(value, self.input_size)  # type: ignore[arg-type]
        except DecodeError as e:
            return e

    def _detect(self, todo: list[tuple[Record, dict[str, bytes], int | None, int]]) -> None:
        decoded = list(self._pool.map(self._decode, [t[0].value for t in todo]))
        ok: list[tuple[Record, dict[str, bytes], int | None, int, int, int, np.ndarray]] = []
        for (rec, h, ts, idx), d in zip(todo, decoded, strict=True):
            if isinstance(d, DecodeError):
                self._dead_letter(rec, "decode_error", str(d))
            else:
                ok.append((rec, h, ts, idx, *d))
        if not ok:
            return
        images = np.stack([o[6] for o in ok])
        dets = self.detector.predict(images)
        iw, ih = self.input_size
        samples = []
        for (rec, h, ts, idx, w, hh, img), det in zip(ok, dets, strict=True):
            sx, sy = w / iw, hh / ih
            self._emit(rec, idx, ts, det, (w, hh, sx, sy))
            if self.trainer is not None:
                samples += self._labelled(rec, h, idx, img, sx, sy)
        if samples:
            self.trainer.learn(samples)  # type: ignore[union-attr]

    # -- labels -----------------------------------------------------------
    def _labelled(self, rec: Record, h: dict[str, bytes], idx: int, img: np.ndarray, sx: float,
                  sy: float) -> list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]:
        """The training sample of a frame, if its truth is known (header, or already joined)."""
        if self.spec.train.labels_topic is None:
            raw = h.get(H_TRUTH)
            if raw is None:
                return []
            try:
                boxes, labels = parse_truth(raw)
            except ValueError as e:
                self._bad_label(rec, str(e))
                return []
            return [self._sample(img, boxes, labels, sx, sy)]
        key = (rec.key, idx)
        truth = self._labels_waiting.pop(key, None)
        if truth is not None:
            return [self._sample(img, *truth, sx, sy)]
        self._remember(self._frames_waiting, key, (img, sx, sy))
        return []

    def _on_label(self, rec: Record, h: dict[str, bytes]) -> None:
        try:
            boxes, labels = parse_truth(rec.value or b"")
            idx = int(h[H_INDEX])
        except (ValueError, KeyError) as e:
            self._bad_label(rec, f"label record: {e}")
            return
        key = (rec.key, idx)
        frame = self._frames_waiting.pop(key, None)
        if frame is None:
            self._remember(self._labels_waiting, key, (boxes, labels))
        else:
            img, sx, sy = frame
            self.trainer.learn([self._sample(img, boxes, labels, sx, sy)])  # type: ignore[union-attr]

    def _remember(self, d: OrderedDict, key: Any, value: Any) -> None:
        d[key] = value
        while len(d) > self.spec.train.join_window:
            d.popitem(last=False)

    def _sample(self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, sx: float,
                sy: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        keep = (labels >= 0) & (labels < len(self.class_names))
        b = boxes[keep] / np.array([sx, sy, sx, sy], np.float32)
        return img, (b.astype(np.float32), labels[keep])

    def _bad_label(self, rec: Record, message: str) -> None:
        self.bad_labels += 1
        if self.bad_labels <= 3:
            log.warning("%s[%d]@%d: unusable label (%s); not learned", rec.topic, rec.partition, rec.offset, message)

    # -- output -----------------------------------------------------------
    def _version(self) -> str:
        if self.trainer is not None:
            return f"{self.spec.name}@{self.trainer.n_learned}"
        return self.model_version

    def _emit(self, rec: Record, idx: int, ts: int | None, det: Detections | None,
              geom: tuple[int, int, float, float] | None, skipped: bool = False,
              hdrs: dict[str, bytes] | None = None) -> None:
        version = self._version()
        value: dict[str, Any] = {"camera": rec.key.decode(errors="replace") if rec.key else None,
                                 "frame_index": idx, "capture_ts_ms": ts}
        if det is not None and geom is not None:
            w, h, sx, sy = geom
            boxes = det.boxes.astype(np.float64) * [sx, sy, sx, sy]  # float64: round to clean JSON decimals
            value.update(width=w, height=h, boxes=np.round(boxes, 1).tolist(), labels=det.labels.tolist(),
                         names=[self._name(int(c)) for c in det.labels],
                         scores=np.round(det.scores.astype(np.float64), 4).tolist())
        else:
            value.update(width=_int_header(hdrs, H_WIDTH), height=_int_header(hdrs, H_HEIGHT), boxes=[], labels=[],
                         names=[], scores=[])
        now_ms = time.time() * 1000
        latency = round(now_ms - ts, 2) if ts is not None else None
        value.update(skipped=skipped, latency_ms=latency, model_version=version,
                     source={"topic": rec.topic, "partition": rec.partition, "offset": rec.offset})
        if skipped and latency is not None:
            value["staleness_ms"] = latency
        headers = [
            ("model.version", version.encode()),
            ("source.topic", rec.topic.encode()),
            ("source.partition", str(rec.partition).encode()),
            ("source.offset", str(rec.offset).encode()),
            (H_INDEX, str(idx).encode()),
        ]
        if ts is not None:
            headers += [(H_TS, str(ts).encode()), ("event.timestamp.ms", str(ts).encode())]
        if latency is not None:
            headers.append(("latency.ms", str(latency).encode()))
            if not skipped:
                self._latencies.append(latency)
        if skipped:
            headers.append(("detections.skipped", b"1"))
        self.sink.produce(self.spec.sink_topic, orjson.dumps(value), key=rec.key, headers=headers,
                          timestamp_ms=ts or 0)
        self.emitted += 1

    def _name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    def _dead_letter(self, rec: Record, error_type: str, message: str) -> None:
        self.bad += 1
        self.dead_letters.send(rec, error_type, message)

    # -- reporting --------------------------------------------------------
    def _fps(self) -> float:
        if self._t_first is None:
            return 0.0
        return self.frames / max(time.perf_counter() - self._t_first, 1e-9)

    def _progress(self, t0: float) -> VideoProgress:
        lat = self._latencies[-1000:]
        return VideoProgress(self.frames, self._fps(), self.skipped, self.bad,
                             float(np.percentile(lat, 50)) if lat else None,
                             self.trainer.n_learned if self.trainer else 0,
                             self.trainer.last_loss if self.trainer else None, time.perf_counter() - t0)

    def _result(self, t0: float) -> VideoResult:
        lat = np.asarray(self._latencies)
        p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if len(lat) else (None, None)
        tr = self.trainer
        return VideoResult(self.frames, self.emitted, self.skipped, self.bad, time.perf_counter() - t0, self._fps(),
                           p50, p99, self._version(), tr.n_learned if tr else 0, tr.steps if tr else 0,
                           tr.last_loss if tr else None, self.checkpoints, self.last_checkpoint,
                           list(self._latencies))
