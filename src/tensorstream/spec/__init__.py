"""The pipeline spec: YAML in, typed and validated config out.

One spec runs on either framework: ``backend: torch`` or ``backend: tensorflow``.
Validation happens here, before any Kafka connection, and every error names the
field that is wrong (pydantic's error locations, rendered as ``a.b.c``).

>>> spec = PipelineSpec.model_validate({
...     "name": "phishing",
...     "source": {"topic": "phishing"},
...     "sink": {"topic": "phishing.predictions"},
...     "features": {"numeric": ["*"]},
...     "label": {"field": "y", "task": "classification", "classes": [False, True]},
...     "model": {"kind": "mlp", "hidden": [16]},
... })
>>> spec.backend, spec.mode, spec.model.optimizer.name
('torch', 'train+infer', 'adam')
"""


from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tensorstream.spec.base import BackendName, Mode, SpecError, _Strict
from tensorstream.spec.drift import (
    AdwinSpec,
    BoostSpec,
    ChallengerSpec,
    DelayedLabelsSpec,
    DriftSpec,
    KswinSpec,
    PageHinkleySpec,
)
from tensorstream.spec.io import SchemaRegistrySpec, SinkSpec, SourceSpec
from tensorstream.spec.model import FeatureSpec, LabelSpec, LearnSpec, ModelSpec, OptimizerSpec
from tensorstream.spec.runtime import BatchSpec, CheckpointSpec, DeadLetterSpec, DistributedSpec, VersionsSpec

__all__ = [
    "AdwinSpec", "BackendName", "BatchSpec", "BoostSpec", "ChallengerSpec", "CheckpointSpec", "DeadLetterSpec",
    "DelayedLabelsSpec", "DistributedSpec", "DriftSpec", "FeatureSpec", "KswinSpec", "LabelSpec", "LearnSpec",
    "Mode", "ModelSpec", "OptimizerSpec", "PageHinkleySpec", "PipelineSpec", "SchemaRegistrySpec", "SinkSpec",
    "SourceSpec", "SpecError", "VersionsSpec", "load_spec", "parse_spec",
]


class PipelineSpec(_Strict):
    #: names the consumer group, the <name>.dlq/.models/.events topics and the state folder
    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9._-]+$", max_length=200)
    #: the framework that runs the model; the same spec runs on either (``run --backend`` overrides it)
    backend: BackendName = "torch"
    #: ``train``: learn from labelled records, no predictions topic needed; ``infer``: predict with a
    #: trained model (``model.weights`` or ``versions.watch``); ``train+infer``: test-then-train, one
    #: prediction per record
    mode: Mode = "train+infer"
    #: the topic records come from, and how they are encoded
    source: SourceSpec
    #: the predictions topic (needed by ``infer`` and ``train+infer``)
    sink: SinkSpec | None = None
    #: record fields -> the model's input vector
    features: FeatureSpec
    #: the label field and the task (needed to train)
    label: LabelSpec | None = None
    #: the model: built-in ``mlp`` / ``linear``, or your own factory
    model: ModelSpec = Field(default_factory=ModelSpec)
    #: micro-batching of the records
    batch: BatchSpec = Field(default_factory=BatchSpec)
    #: how the model learns (per record or per mini-batch, replay)
    learn: LearnSpec = Field(default_factory=LearnSpec)
    #: concept drift: detector, adaptation policy (off by default)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    #: labels on a second topic, joined by key (default: the label is in the record)
    labels: DelayedLabelsSpec | None = None
    #: when training state is written (and offsets committed after it)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    #: model versions announced on ``<name>.models`` and hot-swapped by inference workers
    versions: VersionsSpec = Field(default_factory=VersionsSpec)
    #: when bad records (sent to ``<name>.dlq``) stop the pipeline
    dead_letter: DeadLetterSpec = Field(default_factory=DeadLetterSpec)
    #: data-parallel training on N ranks (docs/distributed.md); one process by default
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    #: local state (checkpoints by default)
    state_dir: str = ".tensorstream"
    #: inference: predictions and source offsets commit in one Kafka transaction.
    #: Isolation needs a broker that hides aborted transactions (Kafka, Redpanda);
    #: the embedded Tansu broker shows them to read_committed consumers.
    exactly_once: bool = False
    #: sliding window of the windowed prequential metrics, in records
    metrics_window: int = Field(default=1000, ge=1)

    @field_validator("name")
    @classmethod
    def _name_is_a_plain_name(cls, v: str) -> str:
        # "." and ".." pass the character check but would put checkpoints outside state_dir
        # (and are not valid Kafka topic names either).
        if v.strip(".") == "":
            raise ValueError(f"{v!r} is not a usable name: use letters, digits, '.', '_' or '-', not only dots")
        return v

    @model_validator(mode="after")
    def _mode_needs(self) -> PipelineSpec:
        if self.mode in ("train", "train+infer") and self.label is None:
            raise ValueError(f"mode '{self.mode}' needs a 'label' section")
        if self.labels is not None and not self.trains:
            raise ValueError("a 'labels' topic is for training: use mode 'train' or 'train+infer'")
        if self.labels is not None and self.labels.topic == self.source.topic:
            raise ValueError("labels.topic must differ from source.topic")
        if self.mode == "infer" and self.model.weights is None and not self.versions.watch:
            raise ValueError("mode 'infer' needs a model: set model.weights to a state file, "
                             "or versions.watch: true to take the versions announced on <name>.models")
        if self.exactly_once and self.mode != "infer":
            raise ValueError("exactly_once applies to mode 'infer'; training is exactly-once through checkpoints")
        if self.mode in ("infer", "train+infer") and self.sink is None:
            raise ValueError(f"mode '{self.mode}' needs a 'sink' section (the predictions topic)")
        return self

    @model_validator(mode="after")
    def _distributed_fits(self) -> PipelineSpec:
        engine = self.distributed.engine
        if engine not in (None, "none", self.backend):
            raise ValueError(f"distributed.engine '{engine}' cannot train a {self.backend} model "
                             f"(leave it unset to use the backend's own engine)")
        if (self.distributed.world_size or 1) > 1 and engine != "none" and not self.trains:
            raise ValueError("distributed training needs mode 'train' or 'train+infer'; inference scales out "
                             "with `tensorstream run --workers N` (one consumer group)")
        return self

    @property
    def group_id(self) -> str:
        return self.source.group_id or f"tensorstream.{self.name}"

    @property
    def trains(self) -> bool:
        return self.mode in ("train", "train+infer")

    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.url or str(Path(self.state_dir) / self.name / "checkpoints")

    def spec_hash(self) -> str:
        """A stable hash of what defines the model (checkpoints record it).

        Only the parts a checkpoint depends on: changing batching, topics or
        checkpoint cadence does not invalidate a checkpoint.
        """
        part = self.model_dump(include={"features", "label", "model", "backend"})
        part["model"].pop("weights", None)
        part["model"].pop("threads", None)
        if part.get("label"):
            part["label"].pop("missing_limit", None)  # a run-time guard, not part of the model
        return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid pipeline spec {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_spec(data: dict[str, Any], origin: str = "") -> PipelineSpec:
    """Validate a dict into a PipelineSpec, raising SpecError naming bad fields."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid pipeline spec {origin}: the top level must be a mapping")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err, origin)) from None


def load_spec(path: str | Path, **overrides: Any) -> PipelineSpec:
    """Read a YAML pipeline spec; ``overrides`` replace top-level keys (e.g. backend)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())  # safe_load: YAML never builds objects
    except FileNotFoundError:
        raise SpecError(f"pipeline spec not found: {path}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"invalid YAML in {path}: {err}") from None
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_spec(data, origin=f"({path})")
