"""Micro-batching over a KafkaSource, shared by the tabular and the video pipelines."""

from __future__ import annotations

import time
from collections.abc import Callable

from tensorstream.kafka import KafkaSource, Record

#: how long one call waits for the first record of a batch before it returns empty
#: (the run loop then does its housekeeping: progress, commits, stop checks)
IDLE_POLL_S = 0.1


def next_batch(source: KafkaSource, max_size: int, max_wait: float,
               stopped: Callable[[], bool] = lambda: False, adaptive: bool = False) -> list[Record]:
    """A micro-batch: closes at ``max_size`` records; ``adaptive``: as soon as nothing more is
    buffered; else ``max_wait`` seconds after its first record, or at the end of the data (so
    fixed-size batching is reproducible).

    librdkafka's ``consume(n, timeout)`` returns only once it holds ``n`` messages
    or the timeout expired, so the batch is gathered in three steps: what is
    already fetched (no wait), else the first record alone (returns as soon as it
    arrives), then (not adaptive) top-ups bounded by ``max_wait`` from that first record.
    """
    batch = source.poll_batch(max_size, 0)
    if not batch:
        batch = source.poll_batch(1, IDLE_POLL_S)
        if not batch:
            return batch
        if max_size > 1:
            batch.extend(source.poll_batch(max_size - 1, 0))
    if adaptive or len(batch) >= max_size or max_wait <= 0:
        return batch
    deadline = time.monotonic() + max_wait
    while len(batch) < max_size and not stopped():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        more = source.poll_batch(max_size - len(batch), min(left, 0.05))
        batch.extend(more)
        if not more and source.at_end:
            break
    return batch
