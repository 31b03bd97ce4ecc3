"""Detection quality on a stream: mAP of a detections topic against the frames' truth.

Ground truth is each frame's ``frame.truth`` header; detections are joined by
(camera, frame index). mAP is computed by torchmetrics' ``MeanAveragePrecision``
(COCO protocol, pycocotools backend), never by hand. Frames that were skipped,
dead-lettered, or carry no truth are left out (and counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorstream.kafka import KafkaConfig
from tensorstream.vision.annotate import _frame_index, load_detections, read_topic
from tensorstream.vision.frames import H_TRUTH, headers_dict, parse_truth


@dataclass
class EvalResult:
    map_50: float
    map: float  # COCO mAP@[.5:.95]
    frames: int  # evaluated
    skipped: int
    missing: int  # frames with truth but no detections record

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mean_average_precision(preds: Sequence[dict[str, np.ndarray]], targets: Sequence[dict[str, np.ndarray]]
                           ) -> dict[str, float]:
    """torchmetrics' MeanAveragePrecision over (boxes xyxy, scores, labels) / (boxes, labels) per image."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    def t(a: Any, dtype: Any) -> Any:
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update(
        [{"boxes": t(p["boxes"], torch.float32).reshape(-1, 4), "scores": t(p["scores"], torch.float32),
          "labels": t(p["labels"], torch.int64)} for p in preds],
        [{"boxes": t(g["boxes"], torch.float32).reshape(-1, 4), "labels": t(g["labels"], torch.int64)}
         for g in targets])
    res = metric.compute()
    return {"map": float(res["map"]), "map_50": float(res["map_50"])}


def evaluate_topics(cfg: KafkaConfig, frames_topic: str, detections_topic: str) -> EvalResult:
    dets = load_detections(cfg, detections_topic)
    preds, targets = [], []
    skipped = missing = 0
    for rec in read_topic(cfg, frames_topic):
        raw = headers_dict(rec.headers).get(H_TRUTH)
        if raw is None:
            continue
        det = dets.get((rec.key, _frame_index(rec)))
        if det is None:
            missing += 1
            continue
        if det.get("skipped"):
            skipped += 1
            continue
        boxes, labels = parse_truth(raw)
        targets.append({"boxes": boxes, "labels": labels})
        preds.append({"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"]})
    if not preds:
        raise ValueError(f"nothing to evaluate: no frame of {frames_topic!r} has both truth and detections")
    m = mean_average_precision(preds, targets)
    return EvalResult(m["map_50"], m["map"], len(preds), skipped, missing)
