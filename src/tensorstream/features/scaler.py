"""Running standardisation with a checkpointable state.

Welford's running mean and sum of squared deviations (M2), merged batch by batch
with Chan et al.'s parallel formula, in float64 so that long streams do not lose
precision. The variance is the population variance (``ddof=0``, like River's
``preprocessing.StandardScaler``); a feature with no spread yet is only centred.

>>> import numpy as np
>>> s = RunningStandardizer(2)
>>> s.update(np.array([[1.0, 10.0], [3.0, 10.0]]))
>>> s.mean.tolist(), s.var.tolist()
([2.0, 10.0], [1.0, 0.0])
>>> s.transform(np.array([[3.0, 12.0]])).tolist()
[[1.0, 2.0]]
"""

from __future__ import annotations

import numpy as np


class RunningStandardizer:
    """Per-feature running mean/variance (Welford) and ``(x - mean) / std``."""

    def __init__(self, n_features: int) -> None:
        self.count = np.zeros(n_features, dtype=np.float64)
        self.mean = np.zeros(n_features, dtype=np.float64)
        self.m2 = np.zeros(n_features, dtype=np.float64)

    @property
    def n_features(self) -> int:
        return self.mean.shape[0]

    @property
    def var(self) -> np.ndarray:
        return np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0)

    def update(self, x: np.ndarray) -> None:
        """Fold the rows of ``x`` [n, d] into the running statistics."""
        x = np.asarray(x, dtype=np.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.count = n

    @staticmethod
    def _std(var: np.ndarray) -> np.ndarray:
        return np.sqrt(var, out=np.ones_like(var), where=var > 1e-24)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` in float64; features with zero variance are only centred."""
        return (np.asarray(x, dtype=np.float64) - self.mean) / self._std(self.var)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """``z * std + mean``: undoes :meth:`transform` (float64)."""
        return np.asarray(z, dtype=np.float64) * self._std(self.var) + self.mean

    def running(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fold the rows of ``x`` [n, d] in one at a time, vectorised.

        Returns ``(mean, std)``, each [n + 1, d]: row 0 the statistics before
        ``x``, row i + 1 those after its first i + 1 rows (so ``(x[i] - mean[i + 1])
        / std[i + 1]`` is what :meth:`update` then :meth:`transform`, one row at a
        time, would give). Prefix sums around a shift (the running mean, or the
        first row of a fresh scaler) keep the cancellation small.

        >>> s = RunningStandardizer(1)
        >>> mean, std = s.running(np.array([[1.0], [3.0], [5.0]]))
        >>> mean[:, 0].tolist(), std[:, 0].round(4).tolist(), s.count.tolist()
        ([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.633], [3.0])
        """
        x = np.asarray(x, dtype=np.float64)
        n = len(x)
        if n == 0:
            return self.mean[None].copy(), self._std(self.var)[None]
        n0 = self.count
        shift = np.where(n0 > 0, self.mean, x[0])
        u = x - shift
        old = n0 * (self.mean - shift)  # the old points' sum, and sum of squares, around the shift
        s1 = old + np.cumsum(u, axis=0)
        s2 = self.m2 + old * (self.mean - shift) + np.cumsum(u * u, axis=0)
        counts = n0 + np.arange(1, n + 1, dtype=np.float64)[:, None]
        means = shift + s1 / counts
        m2 = np.maximum(s2 - s1 * s1 / counts, 0.0)
        var = m2 / counts
        mean_out = np.concatenate([self.mean[None], means])
        std_out = np.concatenate([self._std(self.var)[None], self._std(var)])
        self.count, self.mean, self.m2 = counts[-1].copy(), means[-1].copy(), m2[-1].copy()
        return mean_out, std_out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"count": self.count.copy(), "mean": self.mean.copy(), "m2": self.m2.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        arrays = {k: np.asarray(state[k], dtype=np.float64) for k in ("count", "mean", "m2")}
        for k, a in arrays.items():
            if a.shape != (self.n_features,):
                raise ValueError(f"scaler/{k} has shape {a.shape}, expected ({self.n_features},)")
        self.count, self.mean, self.m2 = (arrays[k].copy() for k in ("count", "mean", "m2"))
