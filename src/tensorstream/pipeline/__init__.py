"""Wiring: a pipeline spec running against a broker (see ``runner``)."""

from tensorstream.pipeline.runner import Pipeline, Progress, RunResult

__all__ = ["Pipeline", "Progress", "RunResult"]
