"""The online loop: test-then-train over micro-batches, prequential metrics, concept
drift (detection, adaptation policies, champion/challenger) and delayed labels.

No Kafka here (the pipeline feeds batches in) and no framework import (the
model sits behind a :class:`~tensorstream.backends.base.Backend`).
"""

from tensorstream.learn.challenger import Challenger
from tensorstream.learn.delayed import LabelJoin
from tensorstream.learn.drift import DriftEvent, DriftMonitor
from tensorstream.learn.learner import BatchOutcome, OnlineLearner
from tensorstream.learn.metrics import PrequentialMetrics
from tensorstream.learn.policies import make_policy

__all__ = ["BatchOutcome", "Challenger", "DriftEvent", "DriftMonitor", "LabelJoin", "OnlineLearner",
           "PrequentialMetrics", "make_policy"]
