"""The detector protocol, and the framework-free half of the tiny grid detector.

Every detector (torchvision's, the Keras grid detector, a user's ``.keras``
file) sits behind :class:`Detector`: ``uint8`` images in (N, H, W, 3 at the
detector's input size), :class:`Detections` out (boxes in input pixels), numpy
arrays only. The pipeline scales boxes back to the source frame.

The **grid detector** (a single-shot, YOLO-v1-style head on a small CNN,
stride 8) predicts, for every cell of a (H/8, W/8) grid, ``5 + C`` numbers:
objectness logit, box centre offset within the cell (2, through a sigmoid),
box width and height as fractions of the image (2, through a sigmoid), and C
class logits. A ground-truth box is assigned to the cell holding its centre.
Target encoding, decoding and NMS live here, in numpy, so the TensorFlow and
PyTorch versions share them exactly.

>>> enc = encode_grid_targets([(np.array([[8., 8., 40., 24.]]), np.array([1]))], (64, 64), stride=8, n_classes=2)
>>> enc.shape, np.argwhere(enc[0, ..., 0] == 1).tolist()
((1, 8, 8, 7), [[2, 3]])
>>> det = decode_grid(_logit_of(enc), (64, 64), stride=8, score_threshold=0.5)[0]
>>> det.boxes.round().tolist(), det.labels.tolist()
([[8.0, 8.0, 40.0, 24.0]], [1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: the grid detector's downsampling factor (input size must be a multiple)
STRIDE = 8


@dataclass
class Detections:
    boxes: np.ndarray  # (k, 4) float32, x1 y1 x2 y2, input pixels
    labels: np.ndarray  # (k,) int64 class ids (0-based)
    scores: np.ndarray  # (k,) float32, descending

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))


Target = tuple[np.ndarray, np.ndarray]  # (boxes (k, 4) in input pixels, labels (k,))


class Detector(Protocol):
    framework: str  # "torch" or "tensorflow"
    kind: str
    input_size: tuple[int, int]  # (width, height)
    class_names: list[str]

    def predict(self, images: np.ndarray) -> list[Detections]:
        """``uint8`` (N, H, W, 3) at ``input_size`` -> one Detections per image."""
        ...

    def train_step(self, images: np.ndarray, targets: Sequence[Target]) -> float:
        """One gradient step on labelled images; returns the loss."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        ...


def encode_grid_targets(targets: Sequence[Target], input_size: tuple[int, int], stride: int,
                        n_classes: int) -> np.ndarray:
    """(N, H/stride, W/stride, 5 + C) float32 targets: objectness, centre offset in
    the cell, width/height as image fractions, one-hot class. When two boxes
    share a cell the larger one wins (drawn last)."""
    w, h = input_size
    gw, gh = w // stride, h // stride
    out = np.zeros((len(targets), gh, gw, 5 + n_classes), np.float32)
    for n, (boxes, labels) in enumerate(targets):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        for i in order:
            x1, y1, x2, y2 = boxes[i]
            if x2 <= x1 or y2 <= y1:
                continue
            cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            gx, gy = min(int(cx), gw - 1), min(int(cy), gh - 1)
            cell = out[n, gy, gx]
            cell[:] = 0
            cell[0] = 1
            cell[1], cell[2] = np.clip(cx - gx, 0, 1), np.clip(cy - gy, 0, 1)
            cell[3], cell[4] = np.clip((x2 - x1) / w, 0, 1), np.clip((y2 - y1) / h, 0, 1)
            cell[5 + int(labels[i])] = 1
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -30, 30)))


def _logit_of(targets: np.ndarray) -> np.ndarray:
    """Raw outputs that decode to exactly ``targets`` (for tests)."""
    p = np.clip(targets.copy(), 1e-4, 1 - 1e-4)
    out = np.log(p / (1 - p))
    out[..., 5:] = np.where(targets[..., 5:] > 0, 10.0, -10.0)
    return out


def decode_grid(raw: np.ndarray, input_size: tuple[int, int], stride: int = STRIDE, *,
                score_threshold: float = 0.3, iou_threshold: float = 0.45,
                max_detections: int = 100) -> list[Detections]:
    """Raw grid outputs (N, GH, GW, 5 + C) -> Detections per image (after NMS)."""
    w, h = input_size
    out = []
    for r in np.asarray(raw, np.float32):
        gh, gw = r.shape[:2]
        obj = _sigmoid(r[..., 0])
        logits = r[..., 5:]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        labels = probs.argmax(-1)
        scores = obj * probs.max(-1)
        ys, xs = np.nonzero(scores >= score_threshold)
        if len(ys) == 0:
            out.append(Detections.empty())
            continue
        cell = r[ys, xs]
        cx = (xs + _sigmoid(cell[:, 1])) * stride
        cy = (ys + _sigmoid(cell[:, 2])) * stride
        bw, bh = _sigmoid(cell[:, 3]) * w, _sigmoid(cell[:, 4]) * h
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        out.append(nms(boxes, labels[ys, xs].astype(np.int64), scores[ys, xs].astype(np.float32),
                       iou_threshold, max_detections))
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x1 y1 x2 y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.45,
        max_detections: int = 100) -> Detections:
    """Per-class greedy non-maximum suppression; result sorted by score."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(order), bool)
    iou = box_iou(boxes[order], boxes[order])
    same = labels[order][:, None] == labels[order][None, :]
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        if len(keep) >= max_detections:
            break
        suppressed |= (iou[i] > iou_threshold) & same[i]
    idx = np.array(keep, np.int64)
    return Detections(boxes[idx], labels[idx], scores[idx])


def postprocess(dets: Detections, score_threshold: float, max_detections: int) -> Detections:
    """Keep the ``max_detections`` best detections at or above ``score_threshold``."""
    keep = np.nonzero(dets.scores >= score_threshold)[0]
    keep = keep[np.argsort(-dets.scores[keep], kind="stable")][:max_detections]
    return Detections(dets.boxes[keep], dets.labels[keep], dets.scores[keep])
