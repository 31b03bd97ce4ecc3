"""The backend protocol: arrays in, arrays out.

Every framework sits behind this one small interface, so the rest of the system
(features, the online loop, the inference loop, checkpoints) never sees a
framework type. Adding a framework means adding one module beside this one.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from tensorstream.spec import ModelSpec

#: The largest gradient magnitude an update may carry. Adam's second moment is a
#: running mean of g**2; keeping |g| below 1e18 keeps g**2 (1e36) two orders of
#: magnitude under float32's max (3.4e38), so no single record can turn an
#: optimizer slot into inf. Larger (or non-finite) gradients are refused.
MAX_GRAD = 1e18


@runtime_checkable
class Backend(Protocol):
    """One model, its optimizer and its compiled steps.

    Shapes: ``x`` is float32 ``[batch, n_features]``. For classification ``y``
    is int64 class indices ``[batch]`` and ``predict`` returns class
    probabilities float32 ``[batch, n_outputs]``; for regression ``y`` is float32
    ``[batch]`` and ``predict`` returns float32 ``[batch, 1]``.
    """

    name: str

    def build(self, model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        """Create model + optimizer, seeded from ``model.seed`` (deterministic)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Inference (no gradient, no state change)."""

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on the batch; returns the mean loss before the step."""

    def get_state(self) -> dict[str, np.ndarray]:
        """Weights and optimizer state as named numpy arrays ("model/..", "optim/..")."""

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what ``get_state`` returned (same architecture)."""


@runtime_checkable
class LearningRateControl(Protocol):
    """What a backend adds so drift policies can change its learning rate at runtime.

    Optional (the ``boost`` drift policy needs it; both built-in backends have
    it). The rate is not part of ``get_state``: a policy that changes it keeps
    its own schedule in the learner's state and sets it again after a restore.
    """

    def set_learning_rate(self, lr: float) -> None:
        """Use ``lr`` from the next ``train_step`` on."""


class SequentialResult(NamedTuple):
    """What :meth:`SequentialLearning.learn_sequential` returns, one entry per row."""

    #: float32 [n, n_outputs]: what ``predict`` gave for row i just before row i was learned
    out: np.ndarray
    #: float32 [n]: the loss of row i's step, before the step; NaN where nothing was learned
    loss: np.ndarray
    #: bool [n]: rows whose update was refused (non-finite loss, or a gradient beyond ``MAX_GRAD``)
    skipped: np.ndarray


@runtime_checkable
class SequentialLearning(Protocol):
    """Exact test-then-train over a batch in one call (both built-in backends have it).

    Row by row: predict with the current weights, then take one optimizer step
    on that row (plus its replay rows), so a batch of n gives what n calls of
    ``predict`` + ``train_step`` on one row each give, in one compiled call.
    """

    def learn_sequential(
        self, x: np.ndarray, y: np.ndarray, learn: np.ndarray | None = None,
        replay: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> SequentialResult:
        """``x`` [n, d], ``y`` [n]; ``learn`` bool [n] (False: predict only, no step;
        default all); ``replay`` (``rx`` [n, k, d], ``ry`` [n, k], ``rw`` float32 [n, k]):
        rows learned in the same step as row i, weighted ``rw`` (0 = no row)."""


@runtime_checkable
class GuardedTraining(Protocol):
    """``train_step`` that reports the rows it refused (both built-in backends have it)."""

    def train_guarded(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        """One step on the rows whose loss and gradient are finite (and below ``MAX_GRAD``).

        Returns the mean loss of the rows learned (NaN if none) and a bool mask
        of the refused rows (None when every row was learned). Refused rows
        change nothing: weights and optimizer slots are as if they were absent.
        """
