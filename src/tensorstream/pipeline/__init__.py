"""Wiring: a pipeline spec running against a broker (see ``runner``)."""

from tensorstream.pipeline.runner import Pipeline, PipelineError, Progress, RunResult

__all__ = ["Pipeline", "PipelineError", "Progress", "RunResult"]
