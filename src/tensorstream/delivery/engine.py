"""The delivery engine: the one owner of commit order, for every loop.

Every loop of tensorstream (tabular train/infer, distributed ranks, video, the
DataLoader / tf.data bridges) hands its progress to a :class:`DeliveryEngine`
and never commits by itself. A unit of work is everything processed since the
last commit; :meth:`DeliveryEngine.commit` makes it durable in one order
(learned from Quix Streams' ``Checkpoint``):

1. **flush** the outputs (predictions, dead letters, events): wait until the
   broker confirmed every one of them;
2. **persist** the state that reflects those records (training: a checkpoint
   holding the weights *and* the offsets; inference: nothing to persist);
3. **commit** the source offsets the unit covers.

Rules that hold on every path (the loop, a rebalance callback, ``close``, a
``finally``):

- **A failure is sticky.** Once a delivery (or a persist) of the unit failed,
  nothing of it, and nothing after it, is persisted or committed: every later
  call raises :class:`DeliveryFailed` with the first cause. The loop stops with
  a non-zero exit; a restart re-processes from the last commit.
- **A forced stop commits nothing.** After :meth:`RunControl.request_abort`
  the engine neither waits nor persists nor commits.
- **A refused commit is not a failure.** The broker may refuse an offset
  commit (a rebalance, an expired member): the offsets stay uncommitted and
  the next commit carries them (at-least-once; training resumes from the
  offsets stored in its checkpoint, so its lineage stays exactly-once).
- **Training resumes where its model is.** :meth:`start_offset` gives the
  offset a (re)assigned partition must start from: the position of the
  in-memory model (which equals its last checkpoint's once a revoke was
  committed), never the group's older commit.

>>> engine = DeliveryEngine(committer=lambda offsets: print("commit", offsets))
>>> engine.advance_to({("t", 0): 10})
>>> engine.commit().committed
commit {('t', 0): 10}
True
>>> engine.commit().committed     # nothing new: no call
False
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tensorstream.delivery.control import RunAborted, RunControl

log = logging.getLogger(__name__)

TP = tuple[str, int]


class DeliveryFailed(RuntimeError):
    """Sticky: a unit of work could not be made durable; nothing of it is persisted or committed."""


class CommitRefused(RuntimeError):
    """The broker refused an offset commit (raise it from a committer; it is retried later)."""


class _Positioned(Protocol):
    topic: str
    partition: int
    offset: int


class Flushable(Protocol):
    """What the engine needs of a sink (``KafkaSink`` has it)."""

    def flush(self, timeout: float = 30.0) -> None: ...

    @property
    def pending(self) -> int: ...


@dataclass
class CommitOutcome:
    """What one :meth:`DeliveryEngine.commit` did."""

    #: what ``persist`` returned (e.g. the checkpoint written), None when nothing was persisted
    persisted: Any = None
    #: the offsets were committed to the group
    committed: bool = False
    #: the offsets this unit covered
    offsets: dict[TP, int] | None = None


class DeliveryEngine:
    """Tracks the source positions a unit of work covers; ``commit()`` makes them durable.

    Parameters
    ----------
    committer
        Commits offsets (next offset to read per partition) to the group; raises
        :class:`CommitRefused` (or the client's own exception, listed in
        ``refusals``) when the broker refuses. None: offsets are never committed
        here (a distributed rank other than 0).
    sink
        Where the unit's outputs went (flushed before anything is persisted).
    persist
        Training: writes the state that reflects ``offsets`` and returns what it
        wrote; may return a ``(result, offsets_to_commit)`` pair via
        :class:`Persisted` to commit other offsets than the unit's (a
        distributed rank 0 commits every rank's). None: nothing to persist.
    control
        The run's stop/abort flags: bounds every wait.
    positions
        Where the state starts (the offsets stored in a restored checkpoint).
    resume_from_positions
        Training: (re)assigned partitions start from the model's position and
        records before it are never read again (see :meth:`start_offset`).
    owned
        The partitions this process holds now; offsets of others are not
        committed (a member must not move a partition another member reads).
    transaction
        Exactly-once inference: ``(offsets) -> None`` committing the produced
        records and the offsets in one Kafka transaction (replaces flush + commit).
    """

    def __init__(self, *, committer: Callable[[dict[TP, int]], Any] | None = None,
                 sink: Flushable | None = None,
                 persist: Callable[[dict[TP, int]], Any] | None = None,
                 control: RunControl | None = None,
                 positions: Mapping[TP, int] | None = None,
                 resume_from_positions: bool = False,
                 owned: Callable[[], set[TP]] | None = None,
                 transaction: Callable[[dict[TP, int]], None] | None = None,
                 refusals: tuple[type[BaseException], ...] = (),
                 on_commit: Callable[[float], None] | None = None) -> None:
        self.committer = committer
        self.sink = sink
        self.persist_fn = persist
        self.control = control or RunControl()
        self.resume_from_positions = resume_from_positions
        self._owned = owned
        self._transaction = transaction
        self._refusals = (CommitRefused, *refusals)
        self._on_commit = on_commit
        #: next offset after the last processed record, per partition
        self.positions: dict[TP, int] = dict(positions or {})
        #: the offsets the last persisted state reflects (training), or the last flushed ones
        self.durable: dict[TP, int] = dict(positions or {})
        #: the offsets last committed to the group
        self.committed: dict[TP, int] = {}
        self.failure: BaseException | None = None
        self.commits = 0
        self.refused = 0
        self._commit_lock = threading.RLock()  # a revoke callback may commit from inside a commit's poll
        self._lock = threading.RLock()  # rebalance callbacks run inside poll, on the loop's thread; bridges commit
        # from another thread than the one marking

    # -- the unit of work --------------------------------------------------
    def admit(self, batch: Sequence[_Positioned], owned: set[TP] | None = None) -> list[Any]:
        """The records of ``batch`` this process may work on.

        Records of partitions not in ``owned`` (revoked while the batch was
        gathered: their new owner starts from our last commit) are dropped. In
        training, a partition whose offsets went back (the broker reset it: the
        topic was recreated, or the offsets fell out of retention) is logged:
        the records are new data, and they are learned.
        """
        first: dict[TP, int] = {}
        for r in batch:  # a partition's records come in offset order: the first is the smallest
            tp = (r.topic, r.partition)
            if tp not in first:
                first[tp] = r.offset
        if self.resume_from_positions:
            for tp, off in first.items():
                pos = self.positions.get(tp)
                if pos is not None and off < pos:
                    log.warning("offsets of %s[%d] went back from %d to %d: the broker reset the partition "
                                "(topic recreated, or records past retention); learning what it holds now",
                                tp[0], tp[1], pos, off)
                    with self._lock:
                        self.positions[tp] = off
        if owned is None or all(tp in owned for tp in first):
            return list(batch)
        out = [r for r in batch if (r.topic, r.partition) in owned]
        log.debug("dropped %d record(s) of revoked partitions", len(batch) - len(out))
        return out

    def advance(self, batch: Iterable[_Positioned]) -> None:
        """The records of ``batch`` are processed (outputs queued, state updated in memory)."""
        ends = {(r.topic, r.partition): r.offset + 1 for r in batch}
        with self._lock:
            self.positions.update(ends)

    def advance_to(self, offsets: Mapping[TP, int]) -> None:
        """Like :meth:`advance`, with next offsets per partition (never moves back)."""
        with self._lock:
            for tp, off in offsets.items():
                if off > self.positions.get(tp, -1):
                    self.positions[tp] = off

    @property
    def dirty(self) -> bool:
        """Something processed is not committed yet."""
        return any(self.committed.get(tp) != off for tp, off in self._committable(self.positions).items())

    @property
    def uncommitted(self) -> dict[TP, tuple[int | None, int]]:
        """Per partition: (committed offset, processed position), where they differ."""
        return {tp: (self.committed.get(tp), off) for tp, off in self.positions.items()
                if self.committed.get(tp) != off}

    def start_offset(self, tp: TP) -> int | None:
        """Where a newly assigned partition starts: the model's position (training), else
        None (the group's committed offset)."""
        return self.positions.get(tp) if self.resume_from_positions else None

    def forget(self, tps: Iterable[TP]) -> None:
        """Inference: revoked partitions are no longer ours; stop tracking them."""
        with self._lock:
            for tp in tps:
                self.positions.pop(tp, None)
                self.durable.pop(tp, None)
                self.committed.pop(tp, None)

    # -- the commit order --------------------------------------------------
    def check(self) -> None:
        """Raise :class:`DeliveryFailed` if a failure happened (sticky)."""
        if self.failure is not None:
            raise DeliveryFailed(f"not committing: an earlier delivery failed ({self.failure})") from self.failure

    def fail(self, cause: BaseException) -> DeliveryFailed:
        """Record a failure of the unit (the first one sticks) and return the error to raise."""
        with self._lock:
            if self.failure is None:
                self.failure = cause
                log.error("stopping: %s; nothing past offsets %s will be committed", cause, self.committed)
        return DeliveryFailed(str(self.failure))

    def flush(self) -> None:
        """Step 1: wait until every output of the unit is delivered (bounded by the control).

        While records are merely queued (the broker is unreachable) the wait goes
        on, logging every 5 s, until a stop's grace period is spent; a record that
        *failed* is a sticky failure.
        """
        from tensorstream.kafka.sink import DeliveryError, DeliveryTimeout

        self.check()
        if self.sink is None:
            return
        t0 = last_log = time.monotonic()
        while True:
            if self.control.aborted:
                raise RunAborted(self.control.reason or "forced stop")
            try:
                left = self.control.wait_left()
                self.sink.flush(timeout=1.0 if left is None else max(0.0, min(1.0, left)))
                return
            except DeliveryTimeout:
                self.control.check()  # a forced stop or a spent grace period ends the wait
                if time.monotonic() - last_log >= 5:
                    last_log = time.monotonic()
                    log.warning("broker unreachable? %d record(s) waiting for delivery for %.0fs; not committing",
                                self.sink.pending, last_log - t0)
            except DeliveryError as e:
                raise self.fail(e) from e

    def persist_and_commit(self, offsets: Mapping[TP, int] | None = None, *,
                           persist: Callable[[dict[TP, int]], Any] | None = None,
                           raise_refusal: bool = False) -> CommitOutcome:
        """Steps 2 and 3, after :meth:`flush`: persist the state, then commit the offsets."""
        self.check()
        if self.control.aborted:
            raise RunAborted(self.control.reason or "forced stop")
        with self._lock:
            snapshot = dict(self.positions if offsets is None else offsets)
        outcome = CommitOutcome(offsets=snapshot)
        persist = persist or self.persist_fn
        to_commit = snapshot
        if persist is not None:
            try:
                result = persist(snapshot)
            except RunAborted:
                raise
            except Exception as e:  # nothing durable: nothing of this unit may be committed
                raise self.fail(e) from e
            if isinstance(result, Persisted):
                outcome.persisted = result.result
                to_commit = result.offsets
            else:
                outcome.persisted = result
            self.durable.update(snapshot)
        else:
            self.durable.update(snapshot)
        done = self._commit_offsets(to_commit, raise_refusal)
        outcome.committed, outcome.offsets = bool(done), done or outcome.offsets
        return outcome

    def commit(self, *, force_persist: bool = False, raise_refusal: bool = False) -> CommitOutcome:
        """Flush -> persist -> commit the unit of work; nothing when nothing new was processed.

        ``force_persist``: persist even without new records (the state changed by
        itself, e.g. a promoted challenger). When only a commit is owed (an
        earlier one was refused), the durable offsets are committed again
        without a new persist.
        """
        with self._commit_lock:  # one commit at a time: a late one must never move offsets back
            return self._commit(force_persist, raise_refusal)

    def _commit(self, force_persist: bool, raise_refusal: bool) -> CommitOutcome:
        self.check()
        if self.control.aborted:
            return CommitOutcome()
        if self._transaction is not None:
            return self._commit_transaction() if self.dirty else CommitOutcome()
        with self._lock:
            need_persist = self.persist_fn is not None and (force_persist or self.durable != self.positions)
            base = self.durable if self.persist_fn is not None else self.positions
            owed = {tp: off for tp, off in self._committable(base).items() if self.committed.get(tp) != off}
        if not need_persist and not owed and not (self.persist_fn is None and self._sink_busy()):
            return CommitOutcome()
        self.flush()
        if need_persist or self.persist_fn is None:
            return self.persist_and_commit(raise_refusal=raise_refusal)
        done = self._commit_offsets(owed, raise_refusal)
        return CommitOutcome(committed=bool(done), offsets=done or owed)

    def _sink_busy(self) -> bool:
        return self.sink is not None and self.sink.pending > 0

    def _committable(self, offsets: Mapping[TP, int]) -> dict[TP, int]:
        if self._owned is None:
            return dict(offsets)
        owned = self._owned()
        return {tp: off for tp, off in offsets.items() if tp in owned}

    def _commit_offsets(self, offsets: Mapping[TP, int], raise_refusal: bool) -> dict[TP, int]:
        """Commit what differs from the last commit; returns what was committed ({} if nothing)."""
        todo = {tp: off for tp, off in self._committable(offsets).items() if self.committed.get(tp) != off}
        if not todo or self.committer is None:
            return {}
        t = time.perf_counter()
        try:
            self.committer(todo)
        except self._refusals as e:
            self.refused += 1
            log.warning("offset commit refused (%s); the offsets stay uncommitted and go with the next commit",
                        _describe(e))
            if raise_refusal:
                raise
            return {}
        with self._lock:
            self.committed.update(todo)
            self.commits += 1
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - t)
        return todo

    def _commit_transaction(self) -> CommitOutcome:
        """Exactly-once inference: outputs and offsets commit atomically, or neither."""
        assert self._transaction is not None
        with self._lock:
            snapshot = self._committable(self.positions)
        todo = {tp: off for tp, off in snapshot.items() if self.committed.get(tp) != off}
        try:
            self._transaction(todo)
        except Exception as e:
            raise self.fail(e) from e
        with self._lock:
            self.committed.update(todo)
            self.durable.update(todo)
            self.commits += 1
        return CommitOutcome(committed=True, offsets=todo)

    # -- rebalances ----------------------------------------------------------
    def on_revoke(self, tps: Sequence[TP], *, keep_positions: bool | None = None) -> None:
        """Partitions are being taken away: make what we did for them durable first.

        Runs inside the consumer's poll, bounded by ``max.poll.interval.ms``.
        After a failure or a forced stop nothing is committed (sticky); the
        failure is raised again by the loop's next :meth:`check`.
        """
        if self.failure is None and not self.control.aborted:
            try:
                self.commit()
            except (DeliveryFailed, RunAborted):
                pass  # recorded (sticky) / forced stop: the loop ends at its next check
        if not (self.resume_from_positions if keep_positions is None else keep_positions):
            self.forget(tps)

    def summary(self) -> str:
        """One sentence on what is committed and what is not (for stop messages)."""
        open_ = self.uncommitted
        if not open_:
            return "everything processed is committed"
        parts = [f"{t}[{p}] committed {c if c is not None else 'nothing'}, processed up to {off}"
                 for (t, p), (c, off) in sorted(open_.items())[:6]]
        more = f" (+{len(open_) - 6} more partitions)" if len(open_) > 6 else ""
        return "not committed: " + "; ".join(parts) + more + " (a restart re-processes them)"


@dataclass
class Persisted:
    """What a ``persist`` callback returns to commit other offsets than the unit's."""

    result: Any
    offsets: dict[TP, int]


def _describe(e: BaseException) -> str:
    arg = e.args[0] if e.args else e
    return arg.str() if hasattr(arg, "str") else str(arg)
