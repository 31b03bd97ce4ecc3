"""The run-loop skeleton shared by the tabular and the video pipelines.

A :class:`LoopWorker` gathers and processes micro-batches; :func:`run_loop`
drives it: stop conditions, progress, the delivery engine's commits, and the
close, in the same order for every pipeline:

1. until a stop condition: (hot-swap) -> gather a batch -> process it -> commit
   when due (training: a checkpoint; inference: every ``commit_interval_s``);
2. graceful end: one last commit (flush -> persist -> commit), bounded by the
   control's grace period;
3. close, on every path: the consumer (its revoke callback commits through the
   engine, which refuses after a failure or a forced stop), then the producer
   (purged instead of flushed after a failure or a forced stop).

A processing error (an exception out of ``process``) is a failure of the unit
of work: nothing of it, or after it, is committed; the error propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tensorstream.delivery import DeadLetterError, DeliveryEngine, DeliveryFailed, RunAborted, RunControl
from tensorstream.kafka import KafkaSink, KafkaSource, Record

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """The pipeline stopped on purpose (a failed delivery, too many bad records, a forced stop):
    nothing past the last commit was committed. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class PipelineAborted(PipelineError):
    """A forced stop (a second signal, a stop's grace period spent) ended the run."""

    exit_code = 130


class LoopWorker(Protocol):
    """What :func:`run_loop` drives (``Pipeline``, ``DetectionPipeline``)."""

    source: KafkaSource
    sink: KafkaSink
    engine: DeliveryEngine
    control: RunControl

    def before_batch(self) -> None: ...
    def next_batch(self) -> list[Record]: ...
    def process(self, batch: list[Record]) -> None: ...
    def commit_due(self) -> bool: ...
    def commit(self) -> None: ...
    def processed(self) -> int: ...
    def progress(self, t0: float) -> Any: ...
    def close_extras(self) -> None: ...


@dataclass
class StopConditions:
    max_records: int | None = None
    until_end: bool = False
    timeout: float | None = None
    idle_timeout: float | None = None


def run_loop(worker: LoopWorker, stop: StopConditions, on_progress: Callable[[Any], None] | None = None) -> None:
    """Run ``worker`` until a stop condition; see the module docstring for the order of things."""
    control, engine = worker.control, worker.engine
    if stop.timeout is not None:
        control.set_deadline(stop.timeout)  # every wait honours it too, not only the loop between batches
    t0 = last_progress = time.perf_counter()
    last_data = time.monotonic()
    try:
        try:
            while not control.stopping:
                engine.check()
                worker.before_batch()
                batch = worker.next_batch()
                now = time.perf_counter()
                if batch:
                    last_data = time.monotonic()
                    try:
                        worker.process(batch)
                    except BaseException as e:
                        engine.fail(e)  # a processing error never advances offsets
                        raise
                if worker.commit_due():
                    worker.commit()
                else:
                    worker.sink.poll(0)  # push outputs out (latency); commits only when due
                if now - last_progress >= 1.0:
                    progress = worker.progress(t0)  # also refreshes the metrics' gauges (lag, prequential)
                    if on_progress is not None:
                        on_progress(progress)
                    last_progress = now
                if stop.max_records is not None and worker.processed() >= stop.max_records:
                    break
                if stop.timeout is not None and now - t0 > stop.timeout:
                    control.request_stop(f"--timeout {stop.timeout:g}s")
                    break
                if stop.until_end and not batch and worker.source.at_end:
                    break
                if (stop.idle_timeout is not None and worker.source.assigned
                        and time.monotonic() - last_data > stop.idle_timeout):
                    break
            # Graceful end (a stop condition, stop(), SIGTERM): persist, then commit, within the grace period.
            control.request_stop(control.reason or "finished")
            engine.check()
            worker.commit()
        finally:
            close_worker(worker)
    except DeadLetterError as e:
        raise PipelineError(f"{e}. Nothing past the last commit was committed ({engine.summary()}); inspect the "
                            "DLQ (error.type / error.message headers).") from e
    except DeliveryFailed as e:
        raise PipelineError(f"{e}. {engine.summary()}") from e
    except RunAborted as e:
        raise PipelineAborted(f"forced stop ({e}); {engine.summary()}") from e
    progress = worker.progress(t0)  # the final gauges too
    if on_progress is not None:
        on_progress(progress)


def close_worker(worker: LoopWorker) -> None:
    """Close the consumer, then the producer, then the worker's own resources, whatever happened."""
    failed = worker.engine.failure is not None or worker.control.aborted
    try:
        worker.source.close()  # leaves the group; the revoke callback goes through the engine
    except Exception:  # pragma: no cover - closing must go on
        log.exception("closing the consumer failed")
    finally:
        try:
            left = worker.control.wait_left()
            worker.sink.close(timeout=30.0 if left is None else max(left, 0.1),
                              purge=failed or worker.control.aborted)
        except Exception as e:
            if worker.engine.failure is None and not worker.control.aborted:
                raise
            log.debug("closing the producer after a failure: %s", e)
        finally:
            worker.close_extras()
