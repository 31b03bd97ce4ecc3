"""The online loop: test-then-train over micro-batches, prequential metrics.

No Kafka here (the pipeline feeds batches in) and no framework import (the
model sits behind a :class:`~tensorstream.backends.base.Backend`).
"""

from tensorstream.learn.learner import BatchOutcome, OnlineLearner
from tensorstream.learn.metrics import PrequentialMetrics

__all__ = ["BatchOutcome", "OnlineLearner", "PrequentialMetrics"]
