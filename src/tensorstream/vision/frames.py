"""Frames on the wire: sources, JPEG / raw encoding, headers, and the producer.

A frame record is keyed by camera id; its value is a JPEG (``--encoding jpeg``)
or a raw ``uint8`` HxWx3 RGB tensor frame (``--encoding raw``, the project's
tensor-frame codec), and its headers say what it is:

==================  ==========================================================
header              value (UTF-8 text)
==================  ==========================================================
``frame.index``     index of the frame in its source (gaps = frames dropped)
``frame.ts_ms``     capture timestamp, ms since the epoch (also the record's
                    Kafka timestamp); latency is measured from it
``frame.width``     width of the source frame in pixels
``frame.height``    height of the source frame in pixels
``frame.encoding``  ``jpeg`` or ``raw``
``frame.truth``     ground truth, JSON ``{"boxes": [[x1, y1, x2, y2], ...],
                    "labels": [int, ...]}`` in source pixels (synthetic
                    frames, or any labelled source); the detector fine-tunes
                    on it and evaluation scores against it
==================  ==========================================================

Sources (``open_frames``):

- ``synthetic:?seed=1&n=200&size=320&shapes=3&classes=3``: seeded moving
  coloured shapes (red squares, green circles, blue triangles) bouncing on a
  noisy background, with exact ground-truth boxes;
- a directory of images (``.jpg .jpeg .png .bmp .webp``, sorted by name);
- a video file (anything FFmpeg reads, through PyAV).

>>> frames = list(open_frames("synthetic:?seed=1&n=2&size=64&shapes=2"))
>>> frames[0].image.shape, frames[0].boxes.shape, frames[0].labels.tolist()
((64, 64, 3), (2, 4), [2, 1])
>>> decode_image(encode_image(frames[0].image, "raw")).shape
(64, 64, 3)
"""

from __future__ import annotations

import io
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tensorstream.codecs import DecodeError, decode_frame, encode_frame

log = logging.getLogger(__name__)

H_INDEX = "frame.index"
H_TS = "frame.ts_ms"
H_WIDTH = "frame.width"
H_HEIGHT = "frame.height"
H_ENCODING = "frame.encoding"
H_TRUTH = "frame.truth"

#: class names of the synthetic shapes, by label id
SYNTHETIC_CLASSES = ("square", "circle", "triangle")
_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230))  # red, green, blue, by class
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: a declared size over this many pixels is refused before decoding (decompression bombs)
MAX_PIXELS = 40_000_000


@dataclass
class SourceFrame:
    """One frame from a source: RGB ``uint8`` HxWx3, and ground truth when known."""

    image: np.ndarray
    boxes: np.ndarray | None = None  # (k, 4) float32, x1 y1 x2 y2 in pixels
    labels: np.ndarray | None = None  # (k,) int64 class ids


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SyntheticParams:
    seed: int = 0
    n: int = 200
    size: int = 320
    shapes: int = 3
    classes: int = 3

    @classmethod
    def parse(cls, source: str) -> SyntheticParams:
        """``synthetic:?seed=1&n=200&size=320&shapes=3`` -> params (unknown keys are errors)."""
        query = source.split(":", 1)[1].lstrip("?")
        kv = dict(urllib.parse.parse_qsl(query, strict_parsing=bool(query)))
        unknown = set(kv) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{source}: unknown parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        try:
            p = cls(**{k: int(v) for k, v in kv.items()})
        except ValueError:
            raise ValueError(f"{source}: parameters must be integers") from None
        if p.size < 32 or p.n < 0 or not 1 <= p.classes <= len(SYNTHETIC_CLASSES) or not 0 <= p.shapes <= 16:
            raise ValueError(f"{source}: need size >= 32, n >= 0, 1 <= classes <= 3, 0 <= shapes <= 16")
        return p


def synthetic_frames(p: SyntheticParams) -> Iterator[SourceFrame]:
    """Moving shapes that bounce off the edges; boxes are the exact extents drawn.

    Each shape lives 20-60 frames, then a new one (class, size, colour tint,
    place, velocity drawn afresh) takes its place, and the background changes
    every 100 frames: a long stream shows many different objects, not the same
    three. Shapes start apart and move 1-3 % of the frame per step, so they
    only overlap now and then (an occluded shape keeps its box: the truth is
    the truth). Everything derives from ``seed``: same seed, same frames.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(p.seed)
    s = p.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s

    def new_background() -> np.ndarray:
        grad = xx[..., None] * rng.uniform(-40, 40, 3) + yy[..., None] * rng.uniform(-40, 40, 3)
        return np.clip(rng.integers(60, 140, size=3) + grad, 0, 255)

    def new_object(others: list[dict[str, Any]]) -> dict[str, Any]:
        for _try in range(50):  # start apart from the others
            size = rng.uniform(0.14, 0.26) * s
            cx, cy = rng.uniform(size / 2, s - size / 2, 2)
            if all(np.hypot(cx - o["cx"], cy - o["cy"]) > (size + o["size"]) / 2 + 2 for o in others):
                break
        speed = rng.uniform(0.01, 0.03) * s
        angle = rng.uniform(0, 2 * np.pi)
        return {"cls": int(rng.integers(0, p.classes)), "size": size, "cx": cx, "cy": cy,
                "vx": speed * np.cos(angle), "vy": speed * np.sin(angle),
                "tint": rng.integers(-25, 26, 3), "ttl": int(rng.integers(20, 61))}

    objs: list[dict[str, Any]] = []
    for _ in range(p.shapes):
        objs.append(new_object(objs))
    background = new_background()
    for i in range(p.n):
        if i and i % 100 == 0:
            background = new_background()
        for j, o in enumerate(objs):
            if o["ttl"] <= 0:
                objs[j] = new_object(objs[:j] + objs[j + 1:])
        noise = rng.normal(0, 6, (s, s, 3))
        img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        boxes, labels = [], []
        for o in objs:
            h = o["size"] / 2
            x1, y1, x2, y2 = o["cx"] - h, o["cy"] - h, o["cx"] + h, o["cy"] + h
            colour = tuple(int(c) for c in np.clip(np.array(_COLOURS[o["cls"]]) + o["tint"], 0, 255))
            if o["cls"] == 0:
                draw.rectangle((x1, y1, x2, y2), fill=colour)
            elif o["cls"] == 1:
                draw.ellipse((x1, y1, x2, y2), fill=colour)
            else:
                draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=colour)
            boxes.append((x1, y1, x2 + 1, y2 + 1))  # PIL fills both end pixels
            labels.append(o["cls"])
            # move, bouncing off the edges
            o["ttl"] -= 1
            for c, v in (("cx", "vx"), ("cy", "vy")):
                o[c] += o[v]
                if o[c] - h < 0 or o[c] + h > s:
                    o[v] = -o[v]
                    o[c] = float(np.clip(o[c], h, s - h))
        yield SourceFrame(np.asarray(img), np.clip(np.array(boxes, np.float32).reshape(-1, 4), 0, s),
                          np.array(labels, np.int64))


def _image_dir_frames(path: Path) -> Iterator[SourceFrame]:
    from PIL import Image

    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for f in files:
        with Image.open(f) as im:
            yield SourceFrame(np.asarray(im.convert("RGB")))


def _video_frames(path: Path) -> Iterator[SourceFrame]:
    try:
        import av
    except ModuleNotFoundError:
        raise ValueError("reading video files needs PyAV: pip install 'tensorstream[video]'") from None
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield SourceFrame(frame.to_ndarray(format="rgb24"))


def open_frames(source: str, limit: int | None = None) -> Iterator[SourceFrame]:
    """Frames of ``source`` (see the module doc), at most ``limit``."""
    if source.startswith("synthetic:"):
        it = synthetic_frames(SyntheticParams.parse(source))
    else:
        path = Path(source)
        if path.is_dir():
            it = _image_dir_frames(path)
        elif path.is_file():
            it = _video_frames(path)
        else:
            raise ValueError(f"no such video file or image directory: {source} (or use synthetic:?seed=1&n=200)")
    for i, f in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield f


def source_classes(source: str) -> list[str] | None:
    """The class names a source's ground truth uses (synthetic only)."""
    if source.startswith("synthetic:"):
        return list(SYNTHETIC_CLASSES[: SyntheticParams.parse(source).classes])
    return None


# --------------------------------------------------------------------------- encoding


def encode_image(image: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> bytes:
    """RGB ``uint8`` HxWx3 -> JPEG bytes or a raw tensor frame."""
    if encoding == "raw":
        return encode_frame(np.ascontiguousarray(image, dtype=np.uint8))
    if encoding != "jpeg":
        raise ValueError(f"unknown frame encoding {encoding!r}: use jpeg or raw")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _decode_raw(data: bytes) -> np.ndarray:
    arr = decode_frame(data)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        desc = "named fields" if isinstance(arr, dict) else f"{arr.dtype} {arr.shape}"
        raise DecodeError(f"raw frame: expected one uint8 HxWx3 array, got {desc}")
    return arr


def decode_image(data: bytes | None, size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG / PNG bytes or a raw tensor frame -> RGB ``uint8`` HxWx3 (resized to
    ``size`` = (width, height) when given). Anything malformed raises
    :class:`~tensorstream.codecs.DecodeError` with the reason."""
    return decode_sized(data, size)[2]


def decode_sized(data: bytes | None, size: tuple[int, int] | None = None) -> tuple[int, int, np.ndarray]:
    """Like :func:`decode_image`, also returning the source (width, height)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DecodeError("empty frame value")
    if data[:4] == b"TSF1":
        arr = _decode_raw(data)
        h, w = arr.shape[:2]
        if size is not None and (w, h) != size:
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))
        return w, h, arr
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise DecodeError(f"image: {w}x{h} exceeds {MAX_PIXELS} pixels")
        if size is not None and im.format == "JPEG":
            im.draft("RGB", size)  # decode at a reduced DCT scale when downscaling: much cheaper
        im = im.convert("RGB")  # forces the full decode: truncated data fails here
        if size is not None and im.size != size:
            im = im.resize(size, Image.BILINEAR)
        return w, h, np.asarray(im)
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeError(f"image: {type(e).__name__}: {e}") from None


def headers_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, bytes]:
    return {k: v for k, v in (headers or []) if v is not None}


def truth_header(boxes: np.ndarray, labels: np.ndarray) -> bytes:
    return orjson.dumps({"boxes": np.round(boxes, 2).tolist(), "labels": labels.tolist()})


def parse_truth(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A ``frame.truth`` header -> (boxes (k, 4) float32, labels (k,) int64); ValueError if malformed."""
    try:
        t = orjson.loads(raw)
        boxes = np.asarray(t["boxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(t["labels"], np.int64).reshape(-1)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"frame.truth header: {e}") from None
    if len(boxes) != len(labels) or not np.isfinite(boxes).all():
        raise ValueError("frame.truth header: boxes and labels differ in length, or a box is not finite")
    return boxes, labels


# --------------------------------------------------------------------------- producer


@dataclass
class ProduceStats:
    frames: int  # sent
    dropped: int  # skipped by --drop-policy lag
    seconds: float
    bytes: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class _LagWatch:
    """How far the detector is behind: frames sent minus detections written.

    Polls the detections topic's high watermark in a thread (never on the send
    path). On the embedded Tansu broker the watermark undercounts by up to one
    producer batch (see the README's known limits), so lag reads a little high.
    """

    def __init__(self, cfg: Any, topic: str, interval: float = 0.2):
        from confluent_kafka import Consumer, TopicPartition

        from tensorstream.kafka import KafkaAdmin

        KafkaAdmin(cfg).ensure_topic(topic)
        self._consumer = Consumer({**cfg.client_settings(), "group.id": f"tensorstream.lagwatch.{id(self)}"})
        n = KafkaAdmin(cfg).list_topics().get(topic, 1)
        self._tps = [TopicPartition(topic, p) for p in range(n)]
        self.base = self._end()
        self.written = self.base
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tensorstream-lagwatch", daemon=True)
        self._thread.start()

    def _end(self) -> int:
        return sum(max(0, self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1]) for tp in self._tps)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.written = self._end()
            except Exception as e:  # noqa: BLE001 - a missed reading only delays dropping
                log.debug("lag watch: %s", e)

    def lag(self, sent: int) -> int:
        return sent - (self.written - self.base)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._consumer.close()


def produce_frames(cfg: Any, source: str, topic: str, *, camera: str = "cam0", encoding: str = "jpeg",
                   quality: int = 90, fps: float = 0.0, limit: int | None = None, partitions: int = 1,
                   drop_policy: str = "none", detections_topic: str | None = None, max_lag: int = 30,
                   on_frame: Any = None) -> ProduceStats:
    """Send ``source``'s frames to ``topic``, keyed by ``camera``.

    ``fps > 0`` paces frames at that rate (a late frame is sent at once, the
    schedule is not shifted); 0 sends as fast as possible. ``drop_policy="lag"``
    skips frames while the detector is more than ``max_lag`` frames behind
    (read from ``detections_topic``), like a live camera that cannot wait:
    the frame index keeps counting, so dropped frames show as gaps.
    """
    from tensorstream.kafka import KafkaAdmin, KafkaSink

    if drop_policy not in ("none", "lag"):
        raise ValueError(f"unknown drop policy {drop_policy!r}: use none or lag")
    if drop_policy == "lag" and not detections_topic:
        raise ValueError("--drop-policy lag needs --detections-topic (where the detector writes)")
    if encoding not in ("jpeg", "raw"):
        raise ValueError(f"unknown frame encoding {encoding!r}: use jpeg or raw")
    frames_iter = open_frames(source, limit)  # validates the source before any connection work
    KafkaAdmin(cfg).ensure_topic(topic, partitions)
    watch = _LagWatch(cfg, detections_topic) if drop_policy == "lag" else None
    sink = KafkaSink(cfg, **{"linger.ms": 0 if fps else 5})
    key = camera.encode()
    sent = dropped = nbytes = 0
    t0 = time.perf_counter()
    try:
        for i, f in enumerate(frames_iter):
            if fps > 0:
                wait = t0 + i / fps - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            if watch is not None and watch.lag(sent) > max_lag:
                dropped += 1
                continue
            ts = int(time.time() * 1000)  # captured now: sources here have no clock of their own
            value = encode_image(f.image, encoding, quality)
            h, w = f.image.shape[:2]
            headers: list[tuple[str, bytes]] = [
                (H_INDEX, str(i).encode()), (H_TS, str(ts).encode()), (H_WIDTH, str(w).encode()),
                (H_HEIGHT, str(h).encode()), (H_ENCODING, encoding.encode()),
            ]
            if f.boxes is not None and f.labels is not None:
                headers.append((H_TRUTH, truth_header(f.boxes, f.labels)))
            sink.produce(topic, value, key=key, headers=headers, timestamp_ms=ts)
            sent += 1
            nbytes += len(value)
            sink.poll(0)
            if on_frame is not None:
                on_frame(sent, dropped)
        sink.flush()
    finally:
        sink.close()
        if watch is not None:
            watch.close()
    return ProduceStats(sent, dropped, time.perf_counter() - t0, nbytes)
