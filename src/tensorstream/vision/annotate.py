"""Annotated video from a frames topic and its detections topic.

Detections are read first (small) and indexed by (camera, frame index); then
the frames are streamed in topic order, joined, drawn on (boxes, class names,
scores, and an overlay with the frame index and capture-to-detection latency)
and encoded one by one: memory stays flat for MP4. Output by suffix:

- ``.mp4`` / ``.mkv`` / ``.avi`` / ``.mov``: PyAV (FFmpeg). Default codec
  ``mpeg4`` (FFmpeg's own encoder, LGPL); ``codec="libx264"`` gives H.264
  (plays in browsers; x264 is GPL, bundled in PyAV's wheels);
- ``.gif``: Pillow, no FFmpeg needed (frames are kept in memory until saved).

Every frame of the input is written exactly once, annotated or not (frames
with no detections record say so; skipped frames say "skipped").
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tensorstream.codecs import DecodeError
from tensorstream.kafka import KafkaConfig, Record
from tensorstream.vision.frames import H_INDEX, decode_image, headers_dict

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov")
_PALETTE = [(255, 64, 64), (64, 220, 64), (80, 140, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220),
            (255, 128, 0), (160, 80, 255)]


def read_topic(cfg: KafkaConfig, topic: str, timeout: float = 60.0) -> Iterator[Record]:
    """Every record of ``topic`` from the beginning to its current end, in partition order.

    Assigns partitions directly (no consumer-group join, nothing committed) and
    stops at each partition's EOF, so it is bounded.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer({**cfg.client_settings(), "group.id": f"tensorstream.read.{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            raise KeyError(f"topic {topic!r} does not exist")
        parts = sorted(md.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        todo = set(parts)
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic!r} to its end in {timeout:.0f}s")
            for m in c.consume(500, 0.2):
                err = m.error()
                if err is None:
                    yield Record.from_message(m)
                elif err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(m.partition())
                else:
                    raise RuntimeError(f"reading {topic!r}: {err.str()}")
    finally:
        c.close()


def load_detections(cfg: KafkaConfig, topic: str) -> dict[tuple[bytes | None, int], dict[str, Any]]:
    """(camera key, frame index) -> detections value; a re-emitted frame's last record wins."""
    out = {}
    for rec in read_topic(cfg, topic):
        try:
            v = orjson.loads(rec.value or b"")
            out[(rec.key, int(v["frame_index"]))] = v
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def _frame_index(rec: Record) -> int:
    try:
        return int(headers_dict(rec.headers)[H_INDEX])
    except (KeyError, ValueError):
        return rec.offset


def draw_detections(image: np.ndarray, det: dict[str, Any] | None, index: int) -> np.ndarray:
    """The frame with boxes, ``name score`` labels and an info overlay drawn on."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    h = image.shape[0]
    font = ImageFont.load_default(size=max(10, h // 28))
    thick = max(1, h // 240)
    if det is None:
        info = f"#{index}  no detections record"
    elif det.get("skipped"):
        info = f"#{index}  skipped (stale {det.get('staleness_ms') or 0:.0f} ms)"
    else:
        for box, label, name, score in zip(det["boxes"], det["labels"], det["names"], det["scores"], strict=False):
            colour = _PALETTE[int(label) % len(_PALETTE)]
            x1, y1, x2, y2 = box
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=thick)
            text = f"{name} {score:.2f}"
            tb = draw.textbbox((x1, y1), text, font=font)
            ty = y1 - (tb[3] - tb[1]) - 2 if y1 - (tb[3] - tb[1]) - 2 >= 0 else y1
            draw.rectangle((x1, ty, x1 + tb[2] - tb[0] + 2, ty + tb[3] - tb[1] + 2), fill=colour)
            draw.text((x1 + 1, ty), text, fill=(0, 0, 0), font=font)
        lat = det.get("latency_ms")
        info = f"#{index}  {len(det['boxes'])} det  {lat:.0f} ms" if lat is not None else \
            f"#{index}  {len(det['boxes'])} det"
    tb = draw.textbbox((4, 4), info, font=font)
    draw.rectangle((tb[0] - 2, tb[1] - 2, tb[2] + 2, tb[3] + 2), fill=(0, 0, 0))
    draw.text((4, 4), info, fill=(255, 255, 255), font=font)
    return np.asarray(im)


class _Mp4Writer:
    def __init__(self, path: Path, fps: float, codec: str):
        try:
            import av
        except ModuleNotFoundError:
            raise ValueError("writing video files needs PyAV: pip install 'tensorstream[video]' "
                             "(or write a .gif)") from None
        from fractions import Fraction

        self._av = av
        self.container = av.open(str(path), mode="w")
        self.rate = Fraction(fps).limit_denominator(1000)
        self.codec = codec
        self.stream: Any = None
        self.size: tuple[int, int] | None = None

    def write(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        if self.stream is None:
            self.size = (w + w % 2, h + h % 2)  # yuv420p needs even sides
            self.stream = self.container.add_stream(self.codec, rate=self.rate)
            self.stream.width, self.stream.height = self.size
            self.stream.pix_fmt = "yuv420p"
            self.stream.bit_rate = max(500_000, int(w * h * float(self.rate) * 0.3))
        if (w, h) != self.size:
            image = _fit(image, self.size)
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


class _GifWriter:
    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.frames: list[Any] = []
        self.size: tuple[int, int] | None = None

    def write(self, image: np.ndarray) -> None:
        from PIL import Image

        h, w = image.shape[:2]
        self.size = self.size or (w, h)
        if (w, h) != self.size:
            image = _fit(image, self.size)
        self.frames.append(Image.fromarray(image).quantize(colors=255, dither=Image.Dither.NONE))

    def close(self) -> None:
        if self.frames:
            # disposal=1 and optimize=False: Pillow must not merge identical frames (counts must match)
            self.frames[0].save(self.path, save_all=True, append_images=self.frames[1:], loop=0,
                                duration=max(20, int(round(1000 / self.fps))), optimize=False, disposal=1)


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


@dataclass
class AnnotateStats:
    frames: int  # written
    annotated: int  # frames that had a (non-skipped) detections record
    skipped: int  # frames whose record says skipped
    missing: int  # frames with no detections record
    undecodable: int  # frames that could not be decoded (written as a grey frame)
    path: str


def annotate_video(cfg: KafkaConfig, frames_topic: str, detections_topic: str, out: str | Path, *,
                   camera: str | None = None, fps: float = 10.0, codec: str = "mpeg4",
                   max_frames: int | None = None) -> AnnotateStats:
    """Write ``out`` (.mp4/.mkv/.avi/.mov or .gif) from the two topics; see the module doc."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (*VIDEO_SUFFIXES, ".gif"):
        raise ValueError(f"{out}: write a {', '.join(VIDEO_SUFFIXES)} or .gif file")
    if fps <= 0:
        raise ValueError("fps must be > 0")
    dets = load_detections(cfg, detections_topic)
    writer: Any = _GifWriter(out, fps) if suffix == ".gif" else _Mp4Writer(out, fps, codec)
    want = camera.encode() if camera is not None else None
    n = annotated = skipped = missing = bad = 0
    last_size: tuple[int, int] | None = None
    try:
        for rec in read_topic(cfg, frames_topic):
            if want is not None and rec.key != want:
                continue
            if max_frames is not None and n >= max_frames:
                break
            idx = _frame_index(rec)
            try:
                image = decode_image(rec.value)
            except DecodeError:
                bad += 1
                w, h = last_size or (320, 240)
                image = np.full((h, w, 3), 64, np.uint8)
            last_size = (image.shape[1], image.shape[0])
            det = dets.get((rec.key, idx))
            if det is None:
                missing += 1
            elif det.get("skipped"):
                skipped += 1
            else:
                annotated += 1
            writer.write(draw_detections(image, det, idx))
            n += 1
    finally:
        writer.close()
    if n == 0:
        out.unlink(missing_ok=True)
        raise ValueError(f"no frames in {frames_topic!r}" + (f" for camera {camera!r}" if camera else ""))
    return AnnotateStats(n, annotated, skipped, missing, bad, str(out))


def count_video_frames(path: str | Path) -> int:
    """Decode a video (PyAV) or GIF (Pillow) file and count its frames."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        with Image.open(path) as im:
            return int(im.n_frames)
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))
