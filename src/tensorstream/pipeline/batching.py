"""Micro-batching over a KafkaSource, shared by the tabular and the video pipelines."""

from __future__ import annotations

import time
from collections.abc import Callable

from tensorstream.kafka import KafkaSource, Record


def next_batch(source: KafkaSource, max_size: int, max_wait: float,
               stopped: Callable[[], bool] = lambda: False) -> list[Record]:
    """A micro-batch: closes at ``max_size`` records, ``max_wait`` seconds after its
    first record, or at the end of the data (so fixed-size batching is reproducible)."""
    batch = source.poll_batch(max_size, 0.1)
    if not batch or len(batch) >= max_size or max_wait <= 0:
        return batch
    deadline = time.monotonic() + max_wait
    while len(batch) < max_size and not stopped():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        more = source.poll_batch(max_size - len(batch), min(left, 0.05))
        batch.extend(more)
        if not more and source.assigned and source.at_eof >= source.assigned:
            break
    return batch
