"""tensorstream: streaming machine learning on Kafka-protocol brokers.

Online training and real-time inference with PyTorch and TensorFlow models,
one pipeline spec for either framework. See the README for the concepts.

The names a program needs are here; each loads its module on first use, so
``import tensorstream`` imports neither torch, tensorflow nor the Kafka client:

>>> import tensorstream
>>> spec = tensorstream.PipelineSpec.model_validate({
...     "source": {"topic": "phishing"}, "sink": {"topic": "phishing.predictions"},
...     "features": {"numeric": ["*"]}, "label": {"field": "y", "classes": [False, True]}})
>>> spec.backend, spec.mode
('torch', 'train+infer')

- specs: :class:`PipelineSpec`, :func:`parse_spec` (a dict), :func:`load_spec` (YAML), :class:`SpecError`;
- running: :class:`Pipeline` (``Pipeline(spec, kafka).run(until_end=True)`` -> :class:`RunResult`),
  :func:`check_model` (a user model, before anything connects), :class:`ModelCheckError`;
- Kafka: :class:`KafkaConfig`, :class:`EmbeddedBroker` / :func:`embedded_broker` (a local broker),
  :func:`produce_records` (a River dataset or a file into a topic);
- in memory, without Kafka: :class:`OnlineLearner` and :func:`make_backend`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PipelineSpec": "tensorstream.spec",
    "SpecError": "tensorstream.spec",
    "load_spec": "tensorstream.spec",
    "parse_spec": "tensorstream.spec",
    "Pipeline": "tensorstream.pipeline",
    "PipelineError": "tensorstream.pipeline",
    "RunResult": "tensorstream.pipeline",
    "check_model": "tensorstream.backends",
    "ModelCheckError": "tensorstream.backends",
    "make_backend": "tensorstream.backends",
    "KafkaConfig": "tensorstream.kafka",
    "EmbeddedBroker": "tensorstream.kafka",
    "embedded_broker": "tensorstream.kafka",
    "produce_records": "tensorstream.data.produce",
    "OnlineLearner": "tensorstream.learn",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensorstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
