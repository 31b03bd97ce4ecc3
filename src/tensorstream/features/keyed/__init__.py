"""Stateful stream features: per-key windows, lags, label history and time features.

See :mod:`tensorstream.features.keyed.stage` (the stage), :mod:`.windows`,
:mod:`.ring` (the vectorised computations), :mod:`.store` / :mod:`.disk` (where
the per-key rows live) and docs/features.md.
"""

from tensorstream.features.keyed.parse import KeyedRows
from tensorstream.features.keyed.stage import KeyedFeatures, KeyPartitioningError

__all__ = ["KeyPartitioningError", "KeyedFeatures", "KeyedRows"]
