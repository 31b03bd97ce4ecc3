"""Online fine-tuning of a detector on labelled frames (test-then-train).

Each labelled frame is first predicted (its detections record goes out with
the model as it was), then learned. Frames are few and a gradient step on one
micro-batch is noisy, so learned frames also go into a bounded **replay
buffer**: every ``batch_size`` new labelled frames trigger ``steps_per_batch``
steps, the first on those frames, the others on random draws from the buffer.
Every labelled frame is in exactly one first step; ``n_learned`` counts them.

>>> import numpy as np
>>> class Dummy:                      # anything with train_step(images, targets)
...     def train_step(self, images, targets): return float(len(images))
>>> t = OnlineTrainer(Dummy(), batch_size=4, steps_per_batch=2, replay=8, seed=0)
>>> img = np.zeros((8, 8, 3), np.uint8); truth = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
>>> t.learn([(img, truth)] * 4)
4.0
>>> t.n_learned, t.steps
(4, 2)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorstream.vision.grid import Target

Sample = tuple[np.ndarray, Target]  # (image at the detector's input size, truth in its pixels)


class OnlineTrainer:
    def __init__(self, detector: Any, *, batch_size: int = 16, steps_per_batch: int = 1, replay: int = 256,
                 seed: int = 0):
        self.detector = detector
        self.batch_size = batch_size
        self.steps_per_batch = steps_per_batch
        self.buffer: deque[Sample] = deque(maxlen=max(replay, batch_size))
        self.rng = np.random.default_rng(seed)
        self.n_learned = 0
        self.steps = 0
        self.last_loss: float | None = None
        self._pending: list[Sample] = []

    def learn(self, samples: Sequence[Sample]) -> float | None:
        """Take new labelled frames; for every full ``batch_size`` of them, run
        ``steps_per_batch`` steps (a remainder waits for more, or for ``flush``).
        Returns the mean loss of the steps run, or None if none ran."""
        self._pending.extend(samples)
        self.n_learned += len(samples)
        self.buffer.extend(samples)
        return self._run(full_only=True)

    def flush(self) -> float | None:
        """Learn every queued frame now (a short last batch is topped up from the buffer)."""
        return self._run(full_only=False)

    def _run(self, full_only: bool) -> float | None:
        losses = []
        while len(self._pending) >= self.batch_size or (self._pending and not full_only):
            new, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size:]
            losses.append(self._step(self._top_up(new)))
            for _ in range(self.steps_per_batch - 1):
                losses.append(self._step(self._draw(self.batch_size)))
        if not losses:
            return None
        self.last_loss = float(np.mean(losses))
        return self.last_loss

    def _draw(self, n: int) -> list[Sample]:
        idx = self.rng.integers(0, len(self.buffer), min(n, len(self.buffer)))
        return [self.buffer[i] for i in idx]

    def _top_up(self, new: list[Sample]) -> list[Sample]:
        return new + self._draw(self.batch_size - len(new)) if len(new) < self.batch_size else new

    def _step(self, batch: list[Sample]) -> float:
        images = np.stack([s[0] for s in batch])
        loss = self.detector.train_step(images, [s[1] for s in batch])
        self.steps += 1
        return loss
