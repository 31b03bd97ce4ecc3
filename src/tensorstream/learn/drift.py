"""Concept-drift detection on the prequential error stream, with River's detectors.

After a batch is scored (test-then-train), the learner turns each scored record
into one number (the *signal*) and feeds it, in stream order, to a River drift
detector:

- ``signal: error``: 0/1 misclassification (classification) or absolute error
  (regression);
- ``signal: loss``: ``-log p(true class)`` (clipped at ``p = 1e-7``) or squared
  error. Richer than 0/1 errors: a model that is still right but less sure
  already shows it, so small drifts are seen sooner.

Detectors (``drift.detector``): ``adwin`` (``river.drift.ADWIN``),
``page_hinkley`` (``river.drift.PageHinkley``) and ``kswin``
(``river.drift.KSWIN``), with River's parameters. A detection becomes a
:class:`DriftEvent` with the signal's mean before and after the change (as
``accuracy`` for ``signal: error`` on classification). With ``direction: up``
(the default) only a *worsening* counts: the error of a model that is still
learning falls, and River's detectors fire on that too (those detections are
counted in ``n_ignored``, not reported).

Checkpoints never pickle. Page-Hinkley and KSWIN are stored exactly, as numbers
(their running sums; KSWIN's window and its random generator's state). ADWIN
lives in River's Rust extension, which exposes neither its buckets nor a way to
save them: its state is rebuilt by replaying the values it has seen since its
last reset into a fresh ``ADWIN`` with the same parameters. That is exact while
fewer than ``drift.history`` values were seen since the last reset; beyond
that, only the last ``history`` values (rounded to ADWIN's ``clock`` so its
check cadence is kept) are replayed, which approximates a window that would
otherwise hold more (ADWIN's estimate then rests on fewer, more recent values).

>>> from tensorstream.spec import DriftSpec
>>> mon = DriftMonitor(DriftSpec(detector="page_hinkley", page_hinkley={"threshold": 5, "min_instances": 30}))
>>> events = mon.update([0.0] * 200 + [1.0] * 30)
>>> [(e.detector, e.index, e.metric, e.before, round(e.after, 2)) for e in events]
[('page_hinkley', 205, 'accuracy', 1.0, 0.0)]
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tensorstream.features.state import from_json_array, json_array

log = logging.getLogger(__name__)

#: probabilities are clipped here before ``-log p`` (as River's LogLoss does)
_P_MIN = 1e-7


@dataclass
class DriftEvent:
    """One detected drift.

    ``index`` is the position, in the sequence given to
    :meth:`DriftMonitor.update`, of the value that triggered the detection (the
    learner maps it to the input record; the pipeline to its topic/partition/
    offset). ``n_seen`` counts every value the monitor was ever given, this one
    included. ``before`` / ``after`` are the metric (``metric``) over the
    values since the detector's previous reset, split where the detector puts
    the change (ADWIN: its cut; KSWIN: its recent sample; Page-Hinkley: the
    minimum of its cumulative sum, the CUSUM change-point estimate).
    """

    detector: str
    index: int
    n_seen: int
    signal: str
    metric: str
    before: float
    after: float
    n_before: int
    n_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def signal_values(task: str, signal: str, y: np.ndarray, yhat: np.ndarray, proba: np.ndarray | None) -> np.ndarray:
    """One float per scored record: what the detector watches (lower is better)."""
    y = np.asarray(y)
    if task == "regression":
        diff = np.asarray(yhat, dtype=np.float64) - y.astype(np.float64)
        return np.abs(diff) if signal == "error" else diff**2
    if signal == "error":
        return (np.asarray(yhat) != y).astype(np.float64)
    assert proba is not None
    p = np.asarray(proba, dtype=np.float64)[np.arange(len(y)), y.astype(np.int64)]
    return -np.log(np.clip(p, _P_MIN, 1.0))


def metric_name(task: str, signal: str) -> str:
    """What ``before``/``after`` mean: accuracy (1 - mean 0/1 error), or the mean signal."""
    if task == "regression":
        return "mae" if signal == "error" else "mse"
    return "accuracy" if signal == "error" else "log_loss"


# ---------------------------------------------------------------------------- detectors


class _Detector:
    """A River detector plus what it takes to checkpoint it as arrays."""

    name = ""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.river: Any = self._make()

    def _make(self) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        self.river = self._make()

    def update(self, x: float) -> bool:
        self.river.update(x)
        return bool(self.river.drift_detected)

    def n_after(self, n_since_reset: int) -> int:
        """How many of the latest values the detector sees as the new concept."""
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load(self, state: dict[str, np.ndarray], history: np.ndarray) -> None:
        raise NotImplementedError


class _Adwin(_Detector):
    name = "adwin"

    def _make(self) -> Any:
        from river.drift import ADWIN

        return ADWIN(**self.params)

    def n_after(self, n_since_reset: int) -> int:
        return int(self.river.width)  # after a detection ADWIN keeps only the new sub-window

    def load(self, state: dict[str, np.ndarray], history: np.ndarray) -> None:
        # Not serialisable (Rust): rebuilt by replaying the values since the last reset.
        self.reset()
        pending_reset = bool(np.asarray(state.get("pending_reset", [0])).reshape(-1)[0])
        if pending_reset:
            return  # River resets on the next update anyway: a fresh detector is the same
        for v in history.tolist():
            self.river.update(v)


class _PageHinkley(_Detector):
    name = "page_hinkley"

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._argmin = 0  # values seen (since reset) when the cumulative sum had its minimum

    def _make(self) -> Any:
        from river.drift import PageHinkley

        return PageHinkley(**self.params)

    def reset(self) -> None:
        super().reset()
        self._argmin = 0

    def update(self, x: float) -> bool:
        r = self.river
        if r.drift_detected:  # River resets itself on this update
            self._argmin = 0
        before = r._min_increase
        r.update(x)
        if r._min_increase < before or r._x_mean.n == 1:
            self._argmin = int(r._x_mean.n)
        return bool(r.drift_detected)

    def n_after(self, n_since_reset: int) -> int:
        return max(1, n_since_reset - self._argmin)

    # n, mean, sum_increase, sum_decrease, min_increase, max_decrease, drift_detected, argmin
    def state(self) -> dict[str, np.ndarray]:
        r = self.river
        return {"values": np.array([r._x_mean.n, r._x_mean._mean, r._sum_increase, r._sum_decrease,
                                    r._min_increase, r._max_decrease, float(r.drift_detected), self._argmin],
                                   dtype=np.float64)}

    def load(self, state: dict[str, np.ndarray], history: np.ndarray) -> None:
        self.reset()
        n, mean, si, sd, mi, md, dd, am = np.asarray(state["values"], dtype=np.float64).tolist()
        r = self.river
        r._x_mean.n, r._x_mean._mean = n, mean
        r._sum_increase, r._sum_decrease, r._min_increase, r._max_decrease = si, sd, mi, md
        r._drift_detected = bool(dd)
        self._argmin = int(am)


class _Kswin(_Detector):
    name = "kswin"

    def _make(self) -> Any:
        from river.drift import KSWIN

        return KSWIN(**self.params)

    def n_after(self, n_since_reset: int) -> int:
        return int(self.river.stat_size)

    def state(self) -> dict[str, np.ndarray]:
        r = self.river
        return {
            "values": np.array([r.n, float(r.p_value), float(r.drift_detected)], dtype=np.float64),
            "window": np.array(list(r.window), dtype=np.float64),
            "rng": json_array(r._rng.getstate()),
        }

    def load(self, state: dict[str, np.ndarray], history: np.ndarray) -> None:
        self.reset()
        r = self.river
        n, p, dd = np.asarray(state["values"], dtype=np.float64).tolist()
        r.n, r.p_value, r._drift_detected = int(n), p, bool(dd)
        r.window = deque(np.asarray(state["window"], dtype=np.float64).tolist(), maxlen=r.window_size)
        version, internal, gauss = from_json_array(state["rng"])
        r._rng.setstate((version, tuple(internal), gauss))
        assert isinstance(r._rng, random.Random)


_DETECTORS: dict[str, type[_Detector]] = {d.name: d for d in (_Adwin, _PageHinkley, _Kswin)}


# ---------------------------------------------------------------------------- the monitor


class DriftMonitor:
    """Feeds a River detector and turns its detections into :class:`DriftEvent` s.

    Parameters
    ----------
    spec
        The spec's ``drift`` section (:class:`tensorstream.spec.DriftSpec`).
    task
        ``"classification"`` or ``"regression"`` (names the reported metric).
    """

    def __init__(self, spec: Any, task: str = "classification") -> None:
        self.spec = spec
        self.task = task
        self.enabled = spec.detector != "none"
        self.detector_name = spec.detector
        self.signal = spec.signal
        self.metric = metric_name(task, spec.signal)
        self.params: dict[str, Any] = (
            getattr(spec, spec.detector).model_dump() if self.enabled else {}
        )
        self._det = _DETECTORS[spec.detector](self.params) if self.enabled else None
        self.history_cap = int(spec.history)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.n_seen = 0  # values ever given
        self.n_drifts = 0  # reported events
        self.n_ignored = 0  # detections in the better direction (direction: up)
        self._since_reset = 0  # values given to the detector since it last started afresh
        self._sum_since_reset = 0.0
        self._hist: deque[float] = deque(maxlen=self.history_cap)  # the latest values since reset

    # --------------------------------------------------------------- update

    def reset(self) -> None:
        """Start the detector afresh (e.g. after the model it watched was replaced)."""
        if self._det is not None:
            self._det.reset()
        self._since_reset, self._sum_since_reset = 0, 0.0
        self._hist.clear()

    def update(self, values: Sequence[float] | np.ndarray) -> list[DriftEvent]:
        """Feed values in stream order; returns the drifts they revealed (``index`` into ``values``)."""
        if self._det is None:
            self.n_seen += len(values)
            return []
        events: list[DriftEvent] = []
        det = self._det
        warmup = int(self.spec.warmup)
        for i, v in enumerate(np.asarray(values, dtype=np.float64).tolist()):
            if self.n_seen < warmup:
                self.n_seen += 1
                continue
            if det.river.drift_detected:  # River resets on this update: so does our bookkeeping
                self._since_reset, self._sum_since_reset = 0, 0.0
                self._hist.clear()
            self.n_seen += 1
            self._since_reset += 1
            self._sum_since_reset += v
            self._hist.append(v)
            if det.update(v):
                ev = self._event(i)
                if ev is not None:
                    events.append(ev)
        return events

    def _event(self, i: int) -> DriftEvent | None:
        assert self._det is not None
        n = self._since_reset
        n_after = min(max(1, self._det.n_after(n)), len(self._hist), n - 1) if n > 1 else 1
        recent = list(self._hist)[-n_after:]
        after = float(np.mean(recent))
        n_before = n - n_after
        before = (self._sum_since_reset - float(np.sum(recent))) / n_before if n_before > 0 else after
        if self.spec.direction == "up" and not after > before:
            self.n_ignored += 1
            log.debug("%s: ignored a detection in the better direction (%.4f -> %.4f)", self.detector_name,
                      before, after)
            return None
        self.n_drifts += 1
        if self.metric == "accuracy":
            before, after = 1.0 - before, 1.0 - after
        return DriftEvent(self.detector_name, i, self.n_seen, self.signal, self.metric, before, after,
                          n_before, n_after)

    def snapshot(self) -> dict[str, float]:
        return {"n_drifts": float(self.n_drifts)} if self.enabled else {}

    # ---------------------------------------------------------------- state

    def _config(self) -> dict[str, Any]:
        return {"detector": self.detector_name, "params": self.params, "signal": self.signal}

    def state_dict(self) -> dict[str, np.ndarray]:
        """``meta`` (JSON: detector, params, signal, counters), ``history`` float64 (values since the
        detector's last reset, at most ``history``), ``detector/...`` (its numeric state, if any)."""
        if self._det is None:
            return {}
        meta = {**self._config(), "n_seen": self.n_seen, "n_drifts": self.n_drifts, "n_ignored": self.n_ignored,
                "since_reset": self._since_reset, "sum_since_reset": self._sum_since_reset}
        state = {"meta": json_array(meta), "history": np.array(list(self._hist), dtype=np.float64)}
        det_state = self._det.state()
        det_state["pending_reset"] = np.array([int(self._det.river.drift_detected)], dtype=np.int64)
        state.update({f"detector/{k}": v for k, v in det_state.items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._reset_counters()
        if self._det is None:
            return
        self._det.reset()
        if "meta" not in state:
            return
        meta = from_json_array(state["meta"])
        self.n_seen, self.n_drifts, self.n_ignored = int(meta["n_seen"]), int(meta["n_drifts"]), int(meta["n_ignored"])
        if {k: meta[k] for k in ("detector", "params", "signal")} != self._config():
            log.warning("drift detector changed since the checkpoint (%s %s -> %s %s): starting it afresh",
                        meta["detector"], meta["params"], self.detector_name, self.params)
            return
        self._since_reset, self._sum_since_reset = int(meta["since_reset"]), float(meta["sum_since_reset"])
        hist = np.asarray(state["history"], dtype=np.float64)
        self._hist.extend(hist.tolist())
        det_state = {k[len("detector/"):]: v for k, v in state.items() if k.startswith("detector/")}
        replay = hist
        if isinstance(self._det, _Adwin) and len(hist) < self._since_reset:
            # Truncated: drop whole clock periods from the front so ADWIN checks on the same ticks.
            clock = int(self.params.get("clock", 32))
            dropped = self._since_reset - len(hist)
            extra = (-dropped) % clock
            replay = hist[extra:]
            log.info("ADWIN restored from its last %d values (of %d since its last reset)", len(replay),
                     self._since_reset)
        self._det.load(det_state, replay)
        pending = bool(np.asarray(det_state.get("pending_reset", [0])).reshape(-1)[0])
        if pending and not self._det.river.drift_detected:
            # Rebuilt fresh (ADWIN): River would have reset it on the next value; so do we.
            self._since_reset, self._sum_since_reset = 0, 0.0
            self._hist.clear()
