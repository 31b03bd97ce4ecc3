"""Champion / challenger: a second model trained on the same records, promoted when it wins.

When a drift is detected, :class:`Challenger` builds a second backend
(``init: fresh``: the spec's initial weights; ``clone``: the champion's weights
with a fresh optimizer) and, from then on, every scored record is predicted by
the challenger too, *before* the challenger learns it: both models are scored
test-then-train on the same records. Each keeps its last ``window`` signal
values (0/1 errors or losses, see :mod:`tensorstream.learn.drift`); once the
challenger has ``min_records`` of them and its mean is lower than the
champion's by ``margin``, it wins: the learner swaps it in as the champion (the
pipeline then checkpoints and, with versions enabled, announces it). A
challenger that has not won after ``max_records`` records is dropped.

>>> import numpy as np
>>> c = Challenger(window=4, min_records=4, margin=0.25, max_records=0)
>>> c.active = True
>>> c.score(np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0, 1.0]))
>>> c.verdict()
('promote', 0.75, 0.25)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from tensorstream.features.state import from_json_array, json_array, prefixed, unprefixed


def reset_optimizer(backend: Any) -> None:
    """Zero a backend's optimizer state (step, Adam moments, momentum), keep its weights.

    Through the backend protocol's own state names (``optim/...``), so it works
    on any backend; a zeroed Adam at step 0 is exactly a fresh Adam.
    """
    state = backend.get_state()
    backend.set_state({k: (np.zeros_like(v) if k.startswith("optim/") else v) for k, v in state.items()})


class Challenger:
    """The challenger model and the two windows it is judged on."""

    def __init__(self, *, window: int, min_records: int, margin: float, max_records: int,
                 init: str = "fresh") -> None:
        self.window, self.min_records, self.margin, self.max_records = window, min_records, margin, max_records
        self.init = init
        self.backend: Any = None
        self.active = False
        self._reset_run()
        self.n_started = self.n_promoted = self.n_dropped = 0

    def _reset_run(self) -> None:
        self.n = 0  # records scored since the challenger started
        self.started_at = 0  # learner.n_learned when it started
        self._champ: deque[float] = deque(maxlen=self.window)
        self._chal: deque[float] = deque(maxlen=self.window)

    # ---------------------------------------------------------------- life

    def start(self, champion: Any, factory: Callable[[], Any], build: Callable[[Any], None], n_learned: int) -> None:
        """Build the challenger backend (``build(backend)`` builds it like the champion)."""
        self.backend = factory()
        build(self.backend)
        if self.init == "clone":
            self.backend.set_state(champion.get_state())
            reset_optimizer(self.backend)
        self._reset_run()
        self.started_at = n_learned
        self.active = True
        self.n_started += 1

    def stop(self) -> Any:
        """End the run; returns the challenger backend (the new champion after a win)."""
        backend, self.backend, self.active = self.backend, None, False
        self._reset_run()
        return backend

    def score(self, champion_signal: np.ndarray, challenger_signal: np.ndarray) -> None:
        for a, b in zip(np.asarray(champion_signal, dtype=np.float64).tolist(),
                        np.asarray(challenger_signal, dtype=np.float64).tolist(), strict=True):
            self._champ.append(a)
            self._chal.append(b)
            self.n += 1

    def verdict(self) -> tuple[str, float, float]:
        """``("promote" | "drop" | "wait", champion mean, challenger mean)`` over the window."""
        if not self._champ:
            return "wait", float("nan"), float("nan")
        champ, chal = float(np.mean(self._champ)), float(np.mean(self._chal))
        if self.n >= self.min_records and champ - chal >= self.margin:
            return "promote", champ, chal
        if self.max_records and self.n >= self.max_records:
            return "drop", champ, chal
        return "wait", champ, chal

    # --------------------------------------------------------------- state

    def state_dict(self) -> dict[str, np.ndarray]:
        """``meta`` (JSON), ``champion``/``challenger`` float64 windows, ``backend/...`` (while active)."""
        state = {
            "meta": json_array({"active": self.active, "n": self.n, "started_at": self.started_at,
                                "n_started": self.n_started, "n_promoted": self.n_promoted,
                                "n_dropped": self.n_dropped}),
            "champion": np.array(list(self._champ), dtype=np.float64),
            "challenger": np.array(list(self._chal), dtype=np.float64),
        }
        if self.active:
            state.update(prefixed("backend", self.backend.get_state()))
        return state

    def load_state_dict(self, state: dict[str, np.ndarray], factory: Callable[[], Any],
                        build: Callable[[Any], None]) -> None:
        self.stop()
        if "meta" not in state:
            return
        meta = from_json_array(state["meta"])
        self.n_started, self.n_promoted, self.n_dropped = meta["n_started"], meta["n_promoted"], meta["n_dropped"]
        if meta["active"]:
            self.backend = factory()
            build(self.backend)
            self.backend.set_state(unprefixed("backend", state))
            self.active = True
        self.n, self.started_at = int(meta["n"]), int(meta["started_at"])
        self._champ.extend(np.asarray(state["champion"], dtype=np.float64).tolist())
        self._chal.extend(np.asarray(state["challenger"], dtype=np.float64).tolist())
