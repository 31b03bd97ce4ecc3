"""What the learner does when a drift is detected (spec ``drift.policy``).

- ``none``: report the drift, change nothing;
- ``boost``: multiply the learning rate by ``boost.factor`` and let it decay
  linearly back to ``model.optimizer.lr`` over ``boost.records`` learned
  records (a drift restarts the schedule). Needs a backend with
  ``set_learning_rate`` (both built-in backends have it);
- ``reset-optimizer``: zero the optimizer state (Adam's moments and step,
  SGD momentum), keep the weights: the next steps are as large as a fresh
  optimizer's;
- ``challenger``: see :mod:`tensorstream.learn.challenger`.

A policy talks to the learner through a few members (``backend``,
``spec``, ``promote(backend)``); its state is arrays (``state_dict``), so a
restored learner continues the schedule, or the challenger, where it was.

>>> from tensorstream.spec import DriftSpec
>>> make_policy(DriftSpec(detector="adwin", policy="boost")).name
'boost'
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tensorstream.learn.challenger import Challenger, reset_optimizer
from tensorstream.learn.drift import DriftEvent

log = logging.getLogger(__name__)


class Policy:
    """``none``: the base class; every hook does nothing."""

    name = "none"

    def on_drift(self, learner: Any, event: DriftEvent) -> list[dict[str, Any]]:
        """A drift was detected while scoring; returns extra events to report."""
        return []

    def after_learn(self, learner: Any, x_scored: np.ndarray, y_scored: np.ndarray, signal: np.ndarray,
                    x_learned: np.ndarray, t_learned: np.ndarray, n_learned: int) -> list[dict[str, Any]]:
        """The champion learned ``x_learned`` (model targets ``t_learned``); ``x_scored`` (labels
        ``y_scored``) were scored, with drift ``signal``."""
        return []

    def on_restore(self, learner: Any) -> None:
        """After the learner (and its backend) was restored from a checkpoint."""

    def snapshot(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, learner: Any, state: dict[str, np.ndarray]) -> None:
        pass


class BoostPolicy(Policy):
    name = "boost"

    def __init__(self, factor: float, records: int) -> None:
        self.factor, self.records = float(factor), int(records)
        self.remaining = 0  # learned records left in the current boost
        self.n_boosts = 0

    def _lr(self, base: float) -> float:
        frac = min(1.0, self.remaining / self.records) if self.records else 0.0
        return base * (1.0 + (self.factor - 1.0) * frac)

    def _apply(self, learner: Any) -> None:
        backend = learner.backend
        if not hasattr(backend, "set_learning_rate"):
            raise TypeError(f"drift.policy 'boost' needs a backend with set_learning_rate(); "
                            f"{type(backend).__name__} has none")
        backend.set_learning_rate(self._lr(learner.spec.model.optimizer.lr))

    def on_drift(self, learner: Any, event: DriftEvent) -> list[dict[str, Any]]:
        self.remaining = self.records
        self.n_boosts += 1
        self._apply(learner)
        return []

    def after_learn(self, learner: Any, x_scored: np.ndarray, y_scored: np.ndarray, signal: np.ndarray,
                    x_learned: np.ndarray, t_learned: np.ndarray, n_learned: int) -> list[dict[str, Any]]:
        if self.remaining > 0:
            self.remaining = max(0, self.remaining - n_learned)
            self._apply(learner)
        return []

    def on_restore(self, learner: Any) -> None:
        if learner.built and self.remaining > 0:
            self._apply(learner)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"boost": np.array([self.remaining, self.n_boosts], dtype=np.int64)}

    def load_state_dict(self, learner: Any, state: dict[str, np.ndarray]) -> None:
        self.remaining, self.n_boosts = (int(v) for v in np.asarray(state.get("boost", [0, 0])).reshape(-1))


class ResetOptimizerPolicy(Policy):
    name = "reset-optimizer"

    def __init__(self) -> None:
        self.n_resets = 0

    def on_drift(self, learner: Any, event: DriftEvent) -> list[dict[str, Any]]:
        reset_optimizer(learner.backend)
        self.n_resets += 1
        return []

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"resets": np.array([self.n_resets], dtype=np.int64)}

    def load_state_dict(self, learner: Any, state: dict[str, np.ndarray]) -> None:
        self.n_resets = int(np.asarray(state.get("resets", [0])).reshape(-1)[0])


class ChallengerPolicy(Policy):
    name = "challenger"

    def __init__(self, spec: Any) -> None:
        c = spec.challenger
        self.challenger = Challenger(window=c.window, min_records=c.min_records, margin=c.margin,
                                     max_records=c.max_records, init=c.init)

    def on_drift(self, learner: Any, event: DriftEvent) -> list[dict[str, Any]]:
        ch = self.challenger
        if ch.active:  # one challenger at a time: it is already learning the new concept
            return []
        ch.start(learner.backend, learner.backend_factory, learner.build_backend, learner.n_learned)
        log.info("drift: challenger #%d started (%s) at %d records learned", ch.n_started, ch.init, learner.n_learned)
        return [{"type": "challenger_started", "init": ch.init, "n_learned": learner.n_learned}]

    def after_learn(self, learner: Any, x_scored: np.ndarray, y_scored: np.ndarray, signal: np.ndarray,
                    x_learned: np.ndarray, t_learned: np.ndarray, n_learned: int) -> list[dict[str, Any]]:
        ch = self.challenger
        if not ch.active or not len(x_scored):
            return []
        # Test, then train: the challenger predicts these records before it learns them, as one
        # mini-batch whatever learn.learning says (it is judged against the champion, not served).
        P = np.asarray(ch.backend.predict(x_scored))
        ch.score(signal, learner.signal_of(y_scored, P))
        ch.backend.train_step(x_learned, t_learned)
        what, champ, chal = ch.verdict()
        if what == "wait":
            return []
        n = ch.n
        info = {"champion": champ, "challenger": chal, "challenger_records": n, "signal": learner.drift.signal,
                "n_learned": learner.n_learned}
        if what == "drop":
            ch.stop()
            ch.n_dropped += 1
            log.info("challenger dropped after %d records (champion %.4f, challenger %.4f)", n, champ, chal)
            return [{"type": "challenger_dropped", **info}]
        backend = ch.stop()
        ch.n_promoted += 1
        learner.promote(backend)
        log.info("challenger promoted after %d records (champion %.4f, challenger %.4f): generation %d",
                 n, champ, chal, learner.generation)
        return [{"type": "promotion", "generation": learner.generation, **info}]

    def snapshot(self) -> dict[str, float]:
        ch = self.challenger
        return {"n_promotions": float(ch.n_promoted), "challenger_active": float(ch.active)}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"challenger/{k}": v for k, v in self.challenger.state_dict().items()}

    def load_state_dict(self, learner: Any, state: dict[str, np.ndarray]) -> None:
        sub = {k[len("challenger/"):]: v for k, v in state.items() if k.startswith("challenger/")}
        self.challenger.load_state_dict(sub, learner.backend_factory, learner.build_backend)


def make_policy(spec: Any) -> Policy:
    """The policy named by a ``drift`` spec section (``None``: no policy)."""
    name = getattr(spec, "policy", "none") if spec is not None else "none"
    if name == "boost":
        return BoostPolicy(spec.boost.factor, spec.boost.records)
    if name == "reset-optimizer":
        return ResetOptimizerPolicy()
    if name == "challenger":
        return ChallengerPolicy(spec)
    return Policy()


__all__ = ["BoostPolicy", "ChallengerPolicy", "Policy", "ResetOptimizerPolicy", "make_policy"]
