"""PyTorch detectors: torchvision's mobile detection models behind the Detector protocol.

- ``ssdlite320_mobilenet_v3_large`` and ``fasterrcnn_mobilenet_v3_large_320_fpn``,
  built with ``weights=None, weights_backbone=None`` (nothing is downloaded)
  and ``num_classes = len(classes) + 1`` (torchvision's label 0 is background;
  our labels are 0-based, so ours = torchvision's - 1);
- weights from a local file (``weights_path``): a state dict saved with
  ``torch.save(model.state_dict(), "det.pt")`` and read back with
  ``torch.load(path, weights_only=True)`` (tensors only, no pickled code), or
  a ``.safetensors`` file (ours: a checkpoint's ``state.safetensors``);
- ``pretrained=True``: torchvision's weights API (COCO, 91 classes, downloaded
  once into torch's cache). Only for machines that are online: tests never use it.

Images arrive as ``uint8`` NHWC at the pipeline's input size; torchvision's
own transform normalises (and resizes to the model's size) inside the model,
and boxes come back in the coordinates of the image we gave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.models import detection as tvd

from tensorstream.vision.grid import Detections, Target, postprocess

#: name -> (builder, weights enum name) of the torchvision detectors we support
TORCH_DETECTORS = {
    "ssdlite320_mobilenet_v3_large": (tvd.ssdlite320_mobilenet_v3_large, "SSDLite320_MobileNet_V3_Large_Weights"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
                                              "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights"),
}


def load_torch_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    A file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (a common
    training-checkpoint shape) is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (name -> tensor)")
    return obj


class TorchvisionDetector:
    """A torchvision detection model behind the :class:`~tensorstream.vision.grid.Detector` protocol."""

    framework = "torch"

    def __init__(self, model: torch.nn.Module, kind: str, input_size: tuple[int, int], class_names: Sequence[str],
                 *, lr: float = 1e-4, score_threshold: float = 0.3, max_detections: int = 100):
        self.model = model.eval()
        self.kind = kind
        self.input_size = input_size
        self.class_names = list(class_names)
        self.score_threshold, self.max_detections = score_threshold, max_detections
        self.lr = lr
        self._optimizer: torch.optim.Optimizer | None = None  # made on the first train step

    @staticmethod
    def _tensors(images: np.ndarray) -> list[torch.Tensor]:
        # uint8 NHWC -> float CHW in [0, 1]; the model's transform normalises from there
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255).contiguous()
        return list(x)

    def predict(self, images: np.ndarray) -> list[Detections]:
        self.model.eval()
        with torch.inference_mode():
            outs = self.model(self._tensors(images))
        return [postprocess(Detections(o["boxes"].numpy().astype(np.float32),
                                       o["labels"].numpy().astype(np.int64) - 1,
                                       o["scores"].numpy().astype(np.float32)),
                            self.score_threshold, self.max_detections) for o in outs]

    def train_step(self, images: np.ndarray, targets: Sequence[Target]) -> float:
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)
        self.model.train()
        tgts = [{"boxes": torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4)),
                 "labels": torch.as_tensor(np.asarray(lab, np.int64).reshape(-1) + 1)} for b, lab in targets]
        losses = self.model(self._tensors(images), tgts)
        loss = sum(losses.values())
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer.step()
        self.model.eval()
        return float(loss.detach())

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, np.ndarray] | dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                                    for k, v in state.items()})


def build_torch_detector(*, kind: str, input_size: tuple[int, int], class_names: Sequence[str],
                         weights_path: str | None = None, pretrained: bool = False, lr: float = 1e-4,
                         score_threshold: float = 0.3, max_detections: int = 100,
                         seed: int = 0) -> TorchvisionDetector:
    """Build ``kind`` with random weights, then load ``weights_path`` (or the
    torchvision weights when ``pretrained``)."""
    if kind not in TORCH_DETECTORS:
        raise ValueError(f"unknown PyTorch detector {kind!r}; known: {', '.join(TORCH_DETECTORS)}")
    builder, weights_enum = TORCH_DETECTORS[kind]
    torch.manual_seed(seed)
    names = list(class_names)
    if pretrained:
        # The torchvision weights API: downloads on first use (online machines only).
        weights = getattr(tvd, weights_enum).DEFAULT
        model = builder(weights=weights)
        names = list(weights.meta["categories"])[1:]  # drop "__background__": our labels are 0-based
    else:
        model = builder(weights=None, weights_backbone=None, num_classes=len(names) + 1)
    det = TorchvisionDetector(model, kind, input_size, names, lr=lr, score_threshold=score_threshold,
                              max_detections=max_detections)
    if weights_path:
        try:
            model.load_state_dict(load_torch_state(weights_path))
        except RuntimeError as e:  # missing/unexpected keys, shape mismatch (e.g. another class count)
            raise ValueError(f"{weights_path} does not fit {kind} with {len(names)} classes: "
                             f"{str(e).splitlines()[0]}") from None
    return det


__all__ = ["TORCH_DETECTORS", "TorchvisionDetector", "build_torch_detector", "load_torch_state"]
