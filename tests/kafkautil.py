"""Small helpers for tests that read from the real broker."""

from __future__ import annotations

import time

from tensorstream.kafka import KafkaSource, Record


def drain(src: KafkaSource, n: int | None = None, timeout: float = 30.0, idle: float | None = None) -> list[Record]:
    """Read until ``n`` records arrived, or (``n`` None) until ``idle`` seconds pass with none."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() < deadline:
        batch = src.poll_batch(500, 0.2)
        if batch:
            out.extend(batch)
            last = time.monotonic()
        if n is not None and len(out) >= n:
            break
        if n is None and idle is not None and out and time.monotonic() - last > idle:
            break
    return out
