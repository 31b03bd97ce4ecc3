"""The video pipeline's spec (YAML ⇄ typed config) and the detectors it names.

See :class:`VideoSpec` for an example; ``tensorstream video run SPEC.yaml`` runs one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tensorstream.vision.frames import SYNTHETIC_CLASSES
from tensorstream.vision.grid import Detector

TORCH_KINDS = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectorSpec(_Strict):
    """Which detector, on which framework.

    ``backend: tensorflow`` + ``kind: grid``: the built-in Keras grid detector
    (``weights_path``: a user's ``.keras`` model, loaded with ``safe_mode=True``,
    or a ``.safetensors`` state of the built-in one, e.g. a checkpoint's).
    ``backend: torch`` + ``kind: ssdlite320_mobilenet_v3_large`` or
    ``fasterrcnn_mobilenet_v3_large_320_fpn`` (``weights_path``: a
    ``torch.save``'d state dict, read with ``weights_only=True``, or
    ``.safetensors``; ``pretrained: true``: torchvision's COCO weights, online only).
    """

    backend: Literal["torch", "tensorflow"] = "tensorflow"
    kind: str = "grid"
    weights_path: str | None = None
    pretrained: bool = False
    classes: list[str] = Field(default_factory=lambda: list(SYNTHETIC_CLASSES), min_length=1)
    #: the detector's input (width, height); frames are resized to it. An int means square.
    input_size: tuple[int, int] = (320, 320)
    score_threshold: float = Field(default=0.3, ge=0, le=1)
    iou_threshold: float = Field(default=0.45, gt=0, le=1)
    max_detections: int = Field(default=100, ge=1, le=10_000)
    lr: float | None = Field(default=None, gt=0)  # default: 2e-3 (grid), 1e-4 (torchvision)
    seed: int = 0
    width: int = Field(default=32, ge=4, le=512)  # the grid detector's channel width
    #: intra-op threads of the framework (None: its default, one per core). On a
    #: machine whose cores are busy with other work, 1 avoids threads waiting on each other.
    threads: int | None = Field(default=None, ge=1, le=1024)

    @field_validator("input_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _kind_fits_backend(self) -> DetectorSpec:
        if self.backend == "torch" and self.kind not in TORCH_KINDS:
            raise ValueError(f"kind {self.kind!r} is not a PyTorch detector; use one of {', '.join(TORCH_KINDS)}")
        if self.backend == "tensorflow" and self.kind != "grid":
            raise ValueError("the TensorFlow detector is kind: grid (a user model: weights_path: model.keras)")
        if self.backend == "tensorflow" and self.pretrained:
            raise ValueError("pretrained: true is for the torchvision detectors")
        if min(self.input_size) < 32:
            raise ValueError("input_size must be at least 32 pixels")
        return self


class BatchSpec(_Strict):
    max_size: int = Field(default=8, ge=1, le=1024)
    max_wait_ms: int = Field(default=20, ge=0, le=60_000)


class TrainSpec(_Strict):
    """Online fine-tuning on labelled frames (test-then-train)."""

    enabled: bool = False
    #: labels in each frame's ``frame.truth`` header, or in records of ``labels_topic``
    #: (key = camera id, header ``frame.index``, value = the same JSON as ``frame.truth``)
    labels_topic: str | None = None
    batch_size: int = Field(default=16, ge=1, le=4096)
    steps_per_batch: int = Field(default=1, ge=1, le=100)
    replay: int = Field(default=256, ge=1, le=1_000_000)
    #: frames awaiting their label (or labels their frame) in a labels-topic join
    join_window: int = Field(default=512, ge=1, le=100_000)
    checkpoint_every_frames: int = Field(default=1000, ge=1)
    checkpoint_every_s: float = Field(default=30.0, gt=0)
    keep_last: int = Field(default=3, ge=1)
    #: any fsspec URL; default ``<state_dir>/<name>/checkpoints``
    checkpoint_url: str | None = None


class VideoSourceSpec(_Strict):
    topic: str = Field(min_length=1)
    group_id: str | None = None
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: librdkafka ``fetch.wait.max.ms``: how long the broker may hold a fetch that
    #: found no new frame. Kafka answers as soon as data arrives; the embedded Tansu
    #: broker holds it the whole time, which adds up to this much latency per frame.
    fetch_wait_ms: int = Field(default=10, ge=0, le=10_000)


class VideoSinkSpec(_Strict):
    topic: str = Field(min_length=1)


class VideoSpec(_Strict):
    """A detection pipeline (``task: detection``): YAML or Python.

    >>> spec = VideoSpec.model_validate({"name": "cams", "source": {"topic": "frames"},
    ...                                  "detector": {"backend": "torch", "kind": "ssdlite320_mobilenet_v3_large"}})
    >>> spec.sink_topic, spec.dlq_topic, spec.group_id, spec.detector.input_size
    ('frames.detections', 'cams.dlq', 'tensorstream.video.cams', (320, 320))
    """

    name: str = Field(default="video", pattern=r"^[A-Za-z0-9._-]+$")
    task: Literal["detection"] = "detection"
    source: VideoSourceSpec
    sink: VideoSinkSpec | None = None
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    decode_threads: int = Field(default=2, ge=1, le=64)
    #: skip (do not detect) frames older than this when taken; None: never skip
    max_staleness_ms: int | None = Field(default=None, ge=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    commit_interval_s: float = Field(default=0.5, gt=0)
    state_dir: str = ".tensorstream"

    @property
    def sink_topic(self) -> str:
        return self.sink.topic if self.sink else f"{self.source.topic}.detections"

    @property
    def dlq_topic(self) -> str:
        return f"{self.name}.dlq"

    @property
    def group_id(self) -> str:
        return self.source.group_id or f"tensorstream.video.{self.name}"

    @property
    def checkpoint_url(self) -> str:
        return self.train.checkpoint_url or str(Path(self.state_dir) / self.name / "checkpoints")

    def spec_hash(self) -> str:
        """What a checkpoint must match: the detector's architecture and classes."""
        d = self.detector
        part = {"backend": d.backend, "kind": d.kind, "classes": d.classes, "input_size": d.input_size,
                "width": d.width}
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


class VideoSpecError(ValueError):
    """A video spec that does not validate; the message names each bad field."""


def parse_video_spec(data: Any, origin: str = "") -> VideoSpec:
    if not isinstance(data, dict):
        raise VideoSpecError(f"invalid video spec {origin}: the top level must be a mapping")
    try:
        return VideoSpec.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid video spec {origin}:"]
        lines += [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]
        raise VideoSpecError("\n".join(lines)) from None


def load_video_spec(path: str | Path) -> VideoSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VideoSpecError(f"video spec not found: {path}") from None
    except yaml.YAMLError as err:
        raise VideoSpecError(f"invalid YAML in {path}: {err}") from None
    return parse_video_spec(data, f"({path})")


# --------------------------------------------------------------------------- detectors


def build_detector(d: DetectorSpec) -> Detector:
    """The detector a spec names (imports its framework now, not before)."""
    common = dict(input_size=tuple(d.input_size), class_names=d.classes, score_threshold=d.score_threshold,
                  max_detections=d.max_detections, seed=d.seed)
    if d.backend == "torch":
        import torch

        from tensorstream.vision.models_torch import build_torch_detector

        if d.threads:
            torch.set_num_threads(d.threads)

        return build_torch_detector(kind=d.kind, weights_path=d.weights_path, pretrained=d.pretrained,
                                    lr=d.lr or 1e-4, **common)
    from tensorstream.vision.models_tf import build_keras_detector, set_threads

    if d.threads:
        set_threads(d.threads)
    keras_path = d.weights_path if d.weights_path and d.weights_path.endswith(".keras") else None
    det = build_keras_detector(kind=d.kind, keras_path=keras_path, lr=d.lr or 2e-3, iou_threshold=d.iou_threshold,
                               width=d.width, **common)
    if d.weights_path and not keras_path:
        from tensorstream.checkpoint import load_state

        state, _ = load_state(d.weights_path)
        det.load_state_dict(state)
    return det


