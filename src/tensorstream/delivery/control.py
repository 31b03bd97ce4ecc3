"""Stopping a run: a graceful stop first, a bounded forced stop after it.

One :class:`RunControl` is shared by a run loop, its :class:`DeliveryEngine`
and the signal handlers of the command that started it:

- ``request_stop()`` (first SIGINT/SIGTERM, ``--timeout``, a stop condition):
  finish the batch in hand, then flush -> persist -> commit, then close. The
  waits of that last commit are bounded by ``grace_s`` (an unreachable broker
  cannot hold the process for minutes).
- ``request_abort()`` (a second signal, or the grace period spent): stop waiting
  for anything; nothing more is persisted or committed, and the caller reports
  what was left uncommitted. The next run re-processes it (the contract holds:
  offsets never move past what is durable).

>>> c = RunControl(grace_s=5)
>>> c.stopping, c.aborted
(False, False)
>>> c.request_stop("SIGTERM"); c.stopping, c.reason
(True, 'SIGTERM')
>>> c.request_abort("second SIGTERM"); c.aborted, c.reason
(True, 'second SIGTERM')
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RunAborted(RuntimeError):
    """A forced stop ended a wait: what was not yet durable stays uncommitted."""


class RunControl:
    """Stop/abort flags and the grace deadline of a graceful stop (thread-safe, signal-safe)."""

    def __init__(self, grace_s: float = 10.0) -> None:
        #: after a stop request, waits (flush, commit) give up this many seconds later
        self.grace_s = grace_s
        self.reason: str | None = None
        self._stop_at: float | None = None
        self._deadline: float | None = None
        self._aborted = threading.Event()
        self._on_abort: list[Callable[[RunControl], None]] = []

    def set_deadline(self, seconds: float | None, reason: str = "--timeout") -> None:
        """Request a stop by itself ``seconds`` from now (checked by every wait, not only between batches)."""
        self._deadline = None if seconds is None else time.monotonic() + seconds
        self._deadline_reason = f"{reason} {seconds:g}s" if seconds is not None else reason

    def on_abort(self, callback: Callable[[RunControl], None]) -> None:
        """Call ``callback(control)`` once, when a forced stop is requested (e.g. an exit watchdog)."""
        self._on_abort.append(callback)

    @property
    def stopping(self) -> bool:
        if self._stop_at is None and self._deadline is not None and time.monotonic() >= self._deadline:
            self.request_stop(self._deadline_reason)
        return self._stop_at is not None

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def request_stop(self, reason: str = "stop requested") -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic()
            self.reason = reason

    def request_abort(self, reason: str = "forced stop") -> None:
        self.request_stop(reason)
        self.reason = reason
        if self._aborted.is_set():
            return
        self._aborted.set()
        for callback in self._on_abort:
            callback(self)

    def wait_left(self) -> float | None:
        """Seconds a wait may still last (None: no stop requested, wait as long as needed)."""
        if self.aborted:
            return 0.0
        if not self.stopping:
            return None
        assert self._stop_at is not None
        return max(0.0, self._stop_at + self.grace_s - time.monotonic())

    def check(self) -> None:
        """Raise :class:`RunAborted` once aborted or when a stop's grace period is spent."""
        left = self.wait_left()
        if left is not None and left <= 0:
            if not self.aborted:
                self.request_abort(f"{self.reason}: gave up after {self.grace_s:.0f}s")
            raise RunAborted(self.reason or "forced stop")
