"""The backend protocol: arrays in, arrays out.

Every framework sits behind this one small interface, so the rest of the system
(features, the online loop, the inference loop, checkpoints) never sees a
framework type. Adding a framework means adding one module beside this one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from tensorstream.spec import ModelSpec


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
