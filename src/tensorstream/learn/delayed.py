"""Delayed labels: join labels that arrive later to the predictions made earlier.

With a ``labels:`` spec section, features and labels travel on two topics. A
features record is predicted as soon as it arrives; its features (as
transformed then) and its prediction wait here, under the record's key, for the
label. When the label comes, the *stored* prediction is scored against it
(River's delayed progressive validation: ``progressive_val_score(...,
delay=...)`` scores the prediction made when the features arrived) and the
record is learned. No Kafka here: the pipeline hands keys and values in.

The state is bounded by ``window``, counted in features records:

- a prediction waits for at most ``window`` later features records, then it
  *expires* (``n_expired``; never learned);
- a label whose prediction already expired is *late* (``n_late``); a label
  that arrives before its features (two topics are read concurrently) waits
  for them, for at most ``window`` features records and ``window`` labels,
  then it is *unmatched* (``n_unmatched``);
- records without a key cannot be joined (``n_no_key``).

Keys may repeat: labels match predictions of the same key oldest first.

>>> import numpy as np
>>> join = LabelJoin(window=1)
>>> x, p = np.zeros((3, 1), np.float32), np.zeros((3, 2), np.float32)
>>> join.add_features([b"a", b"b", b"c"], x, p, np.zeros(3))
[]
>>> [m.index for m in join.add_labels([b"c", b"a", b"z"], np.array([1.0, 0.0, 1.0]))]
[0]
>>> join.n_matched, join.n_expired, join.n_late, len(join.early)
(1, 1, 1, 1)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from tensorstream.features.state import from_json_array, json_array
from tensorstream.learn.outcome import BatchOutcome
from tensorstream.learn.steps import after_learn, learn_batch, learn_in_turn, score


@dataclass
class Match:
    """A prediction and its label, met. ``index``: the record of the current call that completed it."""

    x: np.ndarray
    p: np.ndarray
    yhat: float
    y: float
    index: int
    #: the features record's state key (stateful features: its label joins that key's label history)
    tag: bytes | None = None


def join_key(key: Any) -> str | None:
    """A record key (bytes) or a key field's value -> the join's string form (None: no key)."""
    if key is None:
        return None
    if isinstance(key, bytes | bytearray | memoryview):
        return "b:" + bytes(key).hex()
    if isinstance(key, str):
        return "s:" + key
    return "j:" + orjson.dumps(key).decode()


_COUNTERS = ("n_features", "n_labels", "n_matched", "n_expired", "n_late", "n_unmatched", "n_no_key")


class LabelJoin:
    """Pending predictions and early labels, keyed, bounded by ``window`` features records."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = int(window)
        self._clear()

    def _clear(self) -> None:
        self.clock = 0  # features records added so far (the join's clock)
        # seq -> (key, x, p, yhat, tag); seq = clock when added, so the dict is oldest first
        self.pending: OrderedDict[int, tuple[str, np.ndarray, np.ndarray, float, bytes | None]] = OrderedDict()
        self._pending_by_key: dict[str, deque[int]] = {}
        # label seq -> (key, y, clock when it arrived)
        self.early: OrderedDict[int, tuple[str, float, int]] = OrderedDict()
        self._early_by_key: dict[str, deque[int]] = {}
        self._label_seq = 0
        # keys whose prediction expired recently (to tell late labels from orphans)
        self._expired: OrderedDict[str, int] = OrderedDict()
        for c in _COUNTERS:
            setattr(self, c, 0)

    # ---------------------------------------------------------------- join

    @staticmethod
    def _pop(index: dict[str, deque[int]], key: str) -> int:
        q = index[key]
        seq = q.popleft()
        if not q:
            del index[key]
        return seq

    def _expire(self) -> None:
        limit = self.clock - self.window
        while self.pending:
            seq = next(iter(self.pending))
            if seq >= limit:
                break
            key = self.pending.pop(seq)[0]
            self._pop(self._pending_by_key, key)
            self.n_expired += 1
            self._expired[key] = self._expired.get(key, 0) + 1
            self._expired.move_to_end(key)
            while len(self._expired) > self.window:
                self._expired.popitem(last=False)
        while self.early:
            lseq = next(iter(self.early))
            if self.early[lseq][2] >= limit and len(self.early) <= self.window:
                break
            key = self.early.pop(lseq)[0]
            self._pop(self._early_by_key, key)
            self.n_unmatched += 1

    def add_features(self, keys: Sequence[Any], x: np.ndarray, p: np.ndarray, yhat: np.ndarray,
                     tags: Sequence[bytes | None] | None = None) -> list[Match]:
        """Predictions made now; returns those whose label was already waiting.
        ``tags``: carried to each record's :class:`Match` (the stateful features' key)."""
        matches = []
        for i, raw in enumerate(keys):
            tag = tags[i] if tags is not None else None
            self.clock += 1
            self.n_features += 1
            self._expire()
            key = join_key(raw)
            if key is None:
                self.n_no_key += 1
                continue
            if key in self._early_by_key:
                y = self.early.pop(self._pop(self._early_by_key, key))[1]
                matches.append(Match(x[i], p[i], float(yhat[i]), y, i, tag))
                self.n_matched += 1
            else:
                self.pending[self.clock] = (key, x[i], p[i], float(yhat[i]), tag)
                self._pending_by_key.setdefault(key, deque()).append(self.clock)
        return matches

    def add_labels(self, keys: Sequence[Any], y: np.ndarray) -> list[Match]:
        """Labels (encoded) arriving now; returns the predictions they complete."""
        matches = []
        for i, raw in enumerate(keys):
            self.n_labels += 1
            key = join_key(raw)
            if key is None:
                self.n_no_key += 1
                continue
            if key in self._pending_by_key:
                _, x, p, yhat, tag = self.pending.pop(self._pop(self._pending_by_key, key))
                matches.append(Match(x, p, yhat, float(y[i]), i, tag))
                self.n_matched += 1
            elif key in self._expired:
                self.n_late += 1
                self._expired[key] -= 1
                if not self._expired[key]:
                    del self._expired[key]
            else:
                self._label_seq += 1
                self.early[self._label_seq] = (key, float(y[i]), self.clock)
                self._early_by_key.setdefault(key, deque()).append(self._label_seq)
                self._expire()  # also bounds the number of early labels
        return matches

    def snapshot(self) -> dict[str, float]:
        return {
            "labels_matched": float(self.n_matched), "labels_late": float(self.n_late),
            "labels_unmatched": float(self.n_unmatched), "features_expired": float(self.n_expired),
            "labels_pending": float(len(self.pending)), "no_key": float(self.n_no_key),
        }

    # --------------------------------------------------------------- state

    def state_dict(self) -> dict[str, np.ndarray]:
        """``meta`` (JSON: clock, counters, keys), ``pending_seq``/``_x``/``_p``/``_yhat``,
        ``early_seq``/``_y``/``_clock``."""
        pend = list(self.pending.items())
        early = list(self.early.items())
        meta = {
            "window": self.window, "clock": self.clock, "label_seq": self._label_seq,
            "counters": {c: getattr(self, c) for c in _COUNTERS},
            "pending_keys": [v[0] for _, v in pend], "early_keys": [v[0] for _, v in early],
            "pending_tags": [None if v[4] is None else v[4].hex() for _, v in pend],
            "expired": [[k, n] for k, n in self._expired.items()],
        }
        state = {
            "meta": json_array(meta),
            "pending_seq": np.array([s for s, _ in pend], dtype=np.int64),
            "pending_yhat": np.array([v[3] for _, v in pend], dtype=np.float64),
            "early_seq": np.array([s for s, _ in early], dtype=np.int64),
            "early_y": np.array([v[1] for _, v in early], dtype=np.float64),
            "early_clock": np.array([v[2] for _, v in early], dtype=np.int64),
        }
        if pend:
            state["pending_x"] = np.stack([v[1] for _, v in pend]).astype(np.float32)
            state["pending_p"] = np.stack([v[2] for _, v in pend]).astype(np.float32)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._clear()
        if "meta" not in state:
            return
        meta = from_json_array(state["meta"])
        self.clock, self._label_seq = int(meta["clock"]), int(meta["label_seq"])
        for c in _COUNTERS:
            setattr(self, c, int(meta["counters"][c]))
        seqs = np.asarray(state["pending_seq"]).tolist()
        yhat = np.asarray(state["pending_yhat"]).tolist()
        tags = meta.get("pending_tags") or [None] * len(seqs)
        for i, (seq, key, tag) in enumerate(zip(seqs, meta["pending_keys"], tags, strict=True)):
            self.pending[seq] = (key, np.asarray(state["pending_x"][i]), np.asarray(state["pending_p"][i]), yhat[i],
                                 None if tag is None else bytes.fromhex(tag))
            self._pending_by_key.setdefault(key, deque()).append(seq)
        for lseq, key, y, clk in zip(np.asarray(state["early_seq"]).tolist(), meta["early_keys"],
                                     np.asarray(state["early_y"]).tolist(),
                                     np.asarray(state["early_clock"]).tolist(), strict=True):
            self.early[lseq] = (key, y, clk)
            self._early_by_key.setdefault(key, deque()).append(lseq)
        self._expired = OrderedDict((k, int(n)) for k, n in meta["expired"])
        if int(meta["window"]) > self.window:  # a smaller window now: expire what no longer fits
            self._expire()


# ------------------------------------------------------------------ the learner's side
# OnlineLearner.process_features / process_labels, here beside the join they drive.


def features_step(learner: Any, records: Sequence[Any], keys: Sequence[Any], train: bool = True,
                  record_keys: Sequence[Any] | None = None, timestamps: Sequence[Any] | None = None) -> BatchOutcome:
    """``OnlineLearner.process_features``."""
    if learner.join is None or learner.labels is None or learner.metrics is None:
        raise RuntimeError("process_features() needs a spec with 'label' and 'labels' sections")
    n = len(records)
    X, good_idx, bad, P, yhat = learner._predict_records(records, update=train, n_known=learner.labels.n_known,
                                                         keys=record_keys, timestamps=timestamps)
    if P is None:
        return BatchOutcome([None] * n, bad)
    keyed = learner.features.keyed
    tags = keyed.last_keys if keyed is not None and keyed.spec.label_history else None
    matches = learner.join.add_features([keys[i] for i in good_idx.tolist()], X, P, yhat, tags)
    _label_history(learner, matches)
    for m in matches:
        m.index = int(good_idx[m.index])
    loss, n_learned, events = learn_matches(learner, matches, train)
    matched = {m.index for m in matches}
    waiting = [i for i in good_idx.tolist() if i not in matched]
    return learner._outcome(n, good_idx, P, yhat, bad=bad, loss=loss, n_learned=n_learned,
                            n_scored=len(matches), unlabelled=waiting, events=events)

def labels_step(learner: Any, keys: Sequence[Any], values: Sequence[Any], train: bool = True) -> BatchOutcome:
    """``OnlineLearner.process_labels``."""
    if learner.join is None or learner.labels is None or learner.metrics is None:
        raise RuntimeError("process_labels() needs a spec with 'label' and 'labels' sections")
    y, good, bad = learner.labels.encode_batch([{learner.labels.field: v} for v in values], update=True)
    learner.n_bad += len(bad)
    good_list = good.tolist()
    matches = learner.join.add_labels([keys[i] for i in good_list], y)
    for m in matches:
        m.index = int(good_list[m.index])
    _label_history(learner, matches)
    loss, n_learned, events = learn_matches(learner, matches, train)
    return BatchOutcome([], bad, loss, n_learned, len(matches), [], events)

def _label_history(learner: Any, matches: list[Match]) -> None:
    """Labels that arrived join their features records' label history (stateful features)."""
    keyed = learner.features.keyed
    tagged = [m for m in matches if m.tag is not None]
    if keyed is not None and tagged:
        keyed.add_labels([m.tag for m in tagged], np.array([m.y for m in tagged]))


def learn_matches(learner: Any, matches: list[Match], train: bool) -> tuple[float | None, int, list[dict[str, Any]]]:
    """Score the stored predictions of completed matches, then learn their records."""
    if not matches:
        return None, 0, []
    if not learner.built:  # restored from an unbuilt checkpoint while predictions were pending
        learner._ensure_built()
    X = np.stack([m.x for m in matches]).astype(np.float32)
    P = np.stack([m.p for m in matches]).astype(np.float32)
    dtype = np.float32 if learner.task == "regression" else np.int64
    y = np.array([m.y for m in matches], dtype=dtype)
    yhat = np.array([m.yhat for m in matches], dtype=np.float64 if learner.task == "regression" else np.int64)
    where = np.array([m.index for m in matches], dtype=np.int64)
    scored = np.isfinite(P).all(axis=1)
    signal, events = score(learner, y[scored], P[scored], yhat[scored], where[scored])
    if not train:
        return None, 0, events
    every = np.ones(len(X), dtype=bool)
    if learner.per_record:  # the records as if their labels had come one at a time
        n_known = learner.labels.n_known if learner.labels else 0
        _, _, loss, learned, _, targets = learn_in_turn(learner, X, y, every, n_known)
    else:
        loss, learned, targets = learn_batch(learner, X, y)
    events += after_learn(learner, X, y, targets, scored, learned, signal, where)
    return loss, int(learned.sum()), events
