"""Video streams: frames in, object detections out, on PyTorch or TensorFlow.

- :mod:`~tensorstream.vision.frames`: frame sources (video file, image
  directory, ``synthetic:`` moving shapes with ground-truth boxes), JPEG / raw
  tensor-frame encoding, record headers, the frame producer.
- :mod:`~tensorstream.vision.spec`: the video spec (``VideoSpec``) and ``build_detector``.
- :mod:`~tensorstream.vision.detect`: the detection pipeline (``DetectionPipeline``):
  batched threaded decode, resize, detector, one detections record per frame,
  stale-frame skipping, DLQ; the tabular pipeline's loop and delivery engine.
- :mod:`~tensorstream.vision.models_torch` / :mod:`~tensorstream.vision.models_tf`:
  the detectors behind one small protocol (:class:`~tensorstream.vision.grid.Detector`).
- :mod:`~tensorstream.vision.train`: online fine-tuning on labelled frames.
- :mod:`~tensorstream.vision.annotate`: annotated MP4 / GIF from frames + detections.
- :mod:`~tensorstream.vision.evaluate`: mAP of a detections topic against the
  frames' ground truth (torchmetrics).

Framework imports happen only inside the ``models_*`` modules, when a detector
is built. See ``docs/video.md``.
"""
