"""Running standardisation of columns with missing values (NaN), checkpointable.

Like :class:`~tensorstream.features.scaler.RunningStandardizer`, but each column
counts only its present values: a window mean is missing while the window is
empty, a lag while the key has fewer values. Missing values stay NaN (the
caller turns them into 0, the mean, beside an indicator column).

>>> s = MaskedStandardizer(1)
>>> z = s.running(np.array([[1.0], [np.nan], [3.0]]))
>>> z[:, 0].tolist(), s.count.tolist(), s.mean.tolist()
([0.0, nan, 1.0], [2.0], [2.0])
"""

from __future__ import annotations

import numpy as np

from tensorstream.features.scaler import RunningStandardizer


class MaskedStandardizer(RunningStandardizer):
    """Per-column running mean/variance over the present (non-NaN) values."""

    def update(self, x: np.ndarray) -> None:
        self.running(x)

    def running(self, x: np.ndarray) -> np.ndarray:
        """Fold the rows of ``x`` in one at a time; returns each row standardised with the
        statistics that include it (as :meth:`RunningStandardizer.running`, vectorised)."""
        x = np.asarray(x, dtype=np.float64)
        n = len(x)
        if n == 0:
            return x.copy()
        present = ~np.isnan(x)
        n0 = self.count
        first = np.where(present.any(axis=0), x[present.argmax(axis=0), np.arange(x.shape[1])], 0.0)
        shift = np.where(n0 > 0, self.mean, first)
        u = np.where(present, x - shift, 0.0)
        old = n0 * (self.mean - shift)
        s1 = old + np.cumsum(u, axis=0)
        s2 = self.m2 + old * (self.mean - shift) + np.cumsum(u * u, axis=0)
        counts = n0 + np.cumsum(present, axis=0)
        safe = np.maximum(counts, 1)
        means = np.where(counts > 0, shift + s1 / safe, 0.0)
        m2 = np.where(counts > 0, np.maximum(s2 - s1 * s1 / safe, 0.0), 0.0)
        std = self._std(m2 / safe)
        z = (x - means) / std
        self.count, self.mean, self.m2 = counts[-1].astype(np.float64), means[-1].copy(), m2[-1].copy()
        return z
