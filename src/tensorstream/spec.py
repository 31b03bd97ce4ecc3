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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BackendName = Literal["torch", "tensorflow"]
Mode = Literal["train", "infer", "train+infer"]


class SpecError(ValueError):
    """A pipeline spec that does not validate; the message names each bad field."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a YAML spec must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """Where records come from."""

    topic: str = Field(min_length=1)
    codec: Literal["json", "frame"] = "json"
    group_id: str | None = None  # default: "tensorstream.<pipeline name>"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: field of a tensor-frame record holding the features (frame codec only)
    frame_field: str | None = None


class SinkSpec(_Strict):
    """Where predictions go (one record per input record, same key)."""

    topic: str = Field(min_length=1)


class FeatureSpec(_Strict):
    """Record fields -> one float32 feature vector.

    ``numeric: ["*"]`` takes every numeric (int/float/bool) field of the record
    except the label, in sorted name order, fixed at the first record seen.
    """

    numeric: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)
    categorical_encoding: Literal["onehot", "hash"] = "onehot"
    #: one-hot width per categorical field (a growing vocabulary up to this size;
    #: later unseen values share one overflow slot)
    max_categories: int = Field(default=32, ge=1, le=100_000)
    #: hashing width per categorical field
    hash_buckets: int = Field(default=32, ge=1, le=1_000_000)
    #: running standardisation of numeric fields (state checkpointed with the model)
    standardize: bool = True

    @model_validator(mode="after")
    def _some_features(self) -> FeatureSpec:
        if "*" in self.numeric and len(self.numeric) > 1:
            raise ValueError("numeric: '*' takes every numeric field; list fields or use '*', not both")
        if not self.numeric and not self.categorical:
            raise ValueError("at least one of 'numeric' or 'categorical' must list a field")
        return self


class LabelSpec(_Strict):
    field: str = Field(min_length=1)
    task: Literal["classification", "regression"] = "classification"
    #: fixed class set (labels outside it are bad records); None = growing set
    classes: list[Any] | None = None
    #: output width when the class set grows (ignored when classes is given)
    max_classes: int = Field(default=2, ge=2, le=100_000)

    @property
    def n_outputs(self) -> int:
        if self.task == "regression":
            return 1
        return len(self.classes) if self.classes else self.max_classes

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("a classification needs at least 2 classes")
            # By value, as labels are compared: true, 1 and 1.0 are one class.
            seen: list[Any] = []
            for c in v:
                if any(c == d for d in seen):
                    raise ValueError(f"classes must be distinct (by value): {c!r} repeats")
                seen.append(c)
        return v


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam"] = "adam"
    lr: float = Field(default=1e-2, gt=0, le=10)
    momentum: float = Field(default=0.0, ge=0, lt=1)  # sgd only
    weight_decay: float = Field(default=0.0, ge=0)


class ModelSpec(_Strict):
    """The model: a built-in tabular model or a user factory.

    ``kind: linear`` (logistic/linear regression) or ``kind: mlp`` are built
    identically in both frameworks. ``kind: "my_pkg.models:make"`` imports the
    factory (an import path, never code from a string) and calls
    ``make(n_features=..., n_outputs=...)``; it must return an ``nn.Module`` for
    torch or a ``keras.Model`` for tensorflow.
    """

    kind: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [32])
    activation: Literal["relu", "tanh"] = "relu"
    loss: Literal["auto", "cross_entropy", "mse"] = "auto"
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    #: torch.compile (torch) / XLA jit_compile (tensorflow)
    compile: bool = False
    seed: int = 0
    #: intra-op threads of the framework (None = its default). Small models on a
    #: busy machine run much faster with 1: torch's default thread pool can be
    #: 50-100x slower at batch 32 when the cores are shared.
    threads: int | None = Field(default=None, ge=1, le=1024)
    #: start from this learner state (a safetensors file or fsspec URL written by
    #: ``tensorstream run --save-state``); required for ``mode: infer``
    weights: str | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v in ("linear", "mlp"):
            return v
        mod, sep, attr = v.partition(":")
        if not sep or not mod or not attr.isidentifier():
            raise ValueError("must be 'linear', 'mlp' or an import path 'package.module:factory'")
        return v

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("hidden layer widths must be >= 1")
        return v


class LearnSpec(_Strict):
    """Online-learning options beyond the model itself."""

    #: experience replay: each train step also learns this many records drawn
    #: (seeded) from a buffer of recently learned ones; 0 = off. Helps small
    #: non-linear streams and recurring concepts; the buffer is checkpointed.
    replay: int = Field(default=0, ge=0, le=65_536)
    replay_buffer: int = Field(default=1000, ge=1, le=10_000_000)


class BatchSpec(_Strict):
    """Micro-batching: a batch closes at max_size records or after max_wait_ms."""

    max_size: int = Field(default=32, ge=1, le=65_536)
    max_wait_ms: float = Field(default=20.0, ge=0, le=60_000)


class CheckpointSpec(_Strict):
    """Durable training state: what makes a crash lose nothing and train nothing twice.

    A checkpoint is written every ``every_records`` learned records or
    ``every_seconds``, on graceful stop and on partition revocation; source
    offsets are committed only after it is durable.
    """

    #: any fsspec URL; default ``<state_dir>/<pipeline name>/checkpoints``
    url: str | None = None
    every_records: int = Field(default=5000, ge=1)
    every_seconds: float = Field(default=30.0, gt=0)
    keep_last: int = Field(default=5, ge=1)


class VersionsSpec(_Strict):
    """Model versions announced on ``<pipeline>.models`` (signed with HMAC-SHA256)."""

    #: trainer: announce every checkpoint as a new version (``every_checkpoint``),
    #: or only on ``tensorstream models promote`` (``manual``)
    promote: Literal["every_checkpoint", "manual"] = "manual"
    #: inference: watch the models topic and hot-swap new versions between batches
    watch: bool = False
    #: env var holding the HMAC key (or ``<VAR>_FILE`` naming a file)
    key_env: str = "TENSORSTREAM_MODELS_HMAC_KEY"
    #: local experiments only: publish/accept unsigned announcements when no key is set
    allow_unsigned: bool = False


class DeadLetterSpec(_Strict):
    """Bad records go to ``<pipeline>.dlq``; too many of them stop the pipeline loudly."""

    #: stop when more than this fraction of records is bad (a broken upstream must
    #: not be silently drained into the DLQ); 1.0 = never stop
    max_rate: float = Field(default=0.5, gt=0, le=1)
    #: ... measured over at least this many records
    min_records: int = Field(default=200, ge=1)


class PipelineSpec(_Strict):
    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9._-]+$")
    backend: BackendName = "torch"
    mode: Mode = "train+infer"
    source: SourceSpec
    sink: SinkSpec | None = None
    features: FeatureSpec
    label: LabelSpec | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    learn: LearnSpec = Field(default_factory=LearnSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    versions: VersionsSpec = Field(default_factory=VersionsSpec)
    dead_letter: DeadLetterSpec = Field(default_factory=DeadLetterSpec)
    #: local state (checkpoints by default)
    state_dir: str = ".tensorstream"
    #: inference: predictions and source offsets commit in one Kafka transaction.
    #: Isolation needs a broker that hides aborted transactions (Kafka, Redpanda);
    #: the embedded Tansu broker shows them to read_committed consumers.
    exactly_once: bool = False
    #: sliding window of the windowed prequential metrics, in records
    metrics_window: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _mode_needs(self) -> PipelineSpec:
        if self.mode in ("train", "train+infer") and self.label is None:
            raise ValueError(f"mode '{self.mode}' needs a 'label' section")
        if self.mode == "infer" and self.model.weights is None and not self.versions.watch:
            raise ValueError("mode 'infer' needs a model: set model.weights to a state file, "
                             "or versions.watch: true to take the versions announced on <name>.models")
        if self.exactly_once and self.mode != "infer":
            raise ValueError("exactly_once applies to mode 'infer'; training is exactly-once through checkpoints")
        if self.mode in ("infer", "train+infer") and self.sink is None:
            raise ValueError(f"mode '{self.mode}' needs a 'sink' section (the predictions topic)")
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
