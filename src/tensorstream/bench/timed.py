"""A :class:`~tensorstream.pipeline.Pipeline` that also notes when its batches were done.

Only for measurements (``tensorstream bench`` and ``benchmarks/``): it adds two
clock reads per batch and changes nothing else, so rates and warm-up times can
be taken from the pipeline's own loop:

- ``first_prediction_s``: first record handed to the pipeline -> first batch
  done (predictions queued): model build, tracing, compilation;
- ``steady_records_per_s``: records after the first batch / time from the end
  of the first batch to the end of the last one (warm-up, group join and the
  final flush excluded; commits and checkpoints in between included);
- ``steady_records_per_cpu_s``: the same records / the CPU time this process
  (all its threads, librdkafka's included) spent over that window. On a shared
  machine wall-clock rates move with the neighbours' load; CPU time much less.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tensorstream.pipeline import Pipeline


class TimedPipeline(Pipeline):
    t_first_done: float | None = None
    t_last_done: float | None = None
    cpu_first_done: float | None = None
    cpu_last_done: float | None = None
    n_first_done = 0

    def process(self, batch: list[Any]) -> None:
        super().process(batch)
        now, cpu = time.perf_counter(), time.process_time()
        if self.t_first_done is None:
            self.t_first_done, self.cpu_first_done, self.n_first_done = now, cpu, self.records
        self.t_last_done, self.cpu_last_done = now, cpu

    @property
    def first_prediction_s(self) -> float | None:
        t_first = self.counters.t_first
        if self.t_first_done is None or t_first is None:
            return None
        return self.t_first_done - t_first

    @property
    def steady_records_per_s(self) -> float | None:
        if self.t_first_done is None or self.t_last_done is None or self.t_last_done <= self.t_first_done:
            return None
        return (self.records - self.n_first_done) / (self.t_last_done - self.t_first_done)

    @property
    def steady_records_per_cpu_s(self) -> float | None:
        if self.cpu_first_done is None or self.cpu_last_done is None or self.cpu_last_done <= self.cpu_first_done:
            return None
        return (self.records - self.n_first_done) / (self.cpu_last_done - self.cpu_first_done)

    def latencies_ms(self) -> np.ndarray:
        """The per-record latency samples the pipeline kept (its ring buffer), in ms."""
        return self.counters.latencies_ms()
