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


class SchemaRegistrySpec(_Strict):
    """A Confluent Schema Registry (Avro records carry a schema id; docs/avro.md)."""

    #: ``http(s)://host:8081``, or ``mock://NAME`` (confluent-kafka's in-process mock, for tests)
    url: str = Field(min_length=1)
    #: client settings by confluent-kafka's names (e.g. ``ssl.ca.location``). Credentials go in
    #: $TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (or ..._FILE), never in a spec file.
    config: dict[str, str | bool | int | float] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "mock://")):
            raise ValueError("must start with http://, https:// or mock://")
        return v

    @field_validator("config")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "basic.auth.user.info" in v or "bearer.auth.client.secret" in v:
            raise ValueError("credentials do not belong in a spec file: set "
                             "TENSORSTREAM_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (or ..._FILE)")
        return v

    def codec_options(self) -> dict[str, Any]:
        return {"registry": self.url, "config": dict(self.config)}


def _check_avro_schema(schema: Any) -> None:
    from tensorstream.codecs.avro import _parse  # fastavro: imported only for Avro specs

    _parse(schema)


class SourceSpec(_Strict):
    """Where records come from."""

    # ``schema`` is a BaseModel attribute: the field is ``schema_``, spelled ``schema`` in specs.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, serialize_by_alias=True)

    topic: str = Field(min_length=1)
    codec: Literal["json", "frame", "avro", "avro-registry"] = "json"
    group_id: str | None = None  # default: "tensorstream.<pipeline name>"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: create the source topic (and the labels topic) when missing; by default a missing source
    #: topic stops the run before it starts (a typo would otherwise wait forever on an empty topic)
    create: bool = False
    #: field of a tensor-frame record holding the features (frame codec only)
    frame_field: str | None = None
    #: Avro schema, inline or a ``.avsc`` path (relative to the working directory): the
    #: writer schema for ``avro`` (required); for ``avro-registry`` an optional reader
    #: schema that records of every registered version are resolved to
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    #: the registry of ``codec: avro-registry``
    schema_registry: SchemaRegistrySpec | None = None
    #: librdkafka ``fetch.wait.max.ms``: how long the broker may hold a fetch that found
    #: no new record. Kafka answers as soon as data arrives; the embedded Tansu broker
    #: holds it the whole time, so on an idle-then-busy stream this bounds the added
    #: latency. None: 100 ms, unless ``KafkaConfig.extra`` sets it (librdkafka's own is 500)
    fetch_wait_ms: int | None = Field(default=None, ge=0, le=10_000)

    @model_validator(mode="after")
    def _avro_needs(self) -> SourceSpec:
        if self.codec == "avro" and self.schema_ is None:
            raise ValueError("codec 'avro' needs 'schema' (inline Avro schema or a .avsc path)")
        if self.codec == "avro-registry" and self.schema_registry is None:
            raise ValueError("codec 'avro-registry' needs 'schema_registry' (at least its url)")
        if self.codec not in ("avro", "avro-registry") and (self.schema_ is not None or self.schema_registry):
            raise ValueError(f"'schema' and 'schema_registry' apply to the Avro codecs, not {self.codec!r}")
        if self.schema_ is not None:
            _check_avro_schema(self.schema_)
        return self

    def codec_options(self) -> dict[str, Any]:
        """Keyword arguments of ``codecs.get_codec(self.codec, ...)``."""
        if self.codec == "avro":
            return {"schema": self.schema_}
        if self.codec == "avro-registry":
            assert self.schema_registry is not None
            return {**self.schema_registry.codec_options(), "reader_schema": self.schema_}
        return {}


class SinkSpec(_Strict):
    """Where predictions go (one record per input record, same key)."""

    topic: str = Field(min_length=1)
    #: ``json``, or ``avro-registry``: Avro in the Confluent wire format, with the
    #: predictions schema (``codecs.avro.PREDICTION_SCHEMA``) registered under ``subject``
    format: Literal["json", "avro-registry"] = "json"
    #: default ``<topic>-value`` (the TopicNameStrategy)
    subject: str | None = None
    schema_registry: SchemaRegistrySpec | None = None

    @model_validator(mode="after")
    def _avro_needs(self) -> SinkSpec:
        if self.format == "avro-registry" and self.schema_registry is None:
            raise ValueError("format 'avro-registry' needs 'schema_registry' (at least its url)")
        if self.format == "json" and (self.subject is not None or self.schema_registry is not None):
            raise ValueError("'subject' and 'schema_registry' apply to format 'avro-registry'")
        return self

    def codec_options(self) -> dict[str, Any]:
        """Keyword arguments of ``codecs.get_codec("avro-registry", ...)`` (writer schema aside)."""
        assert self.schema_registry is not None
        return {**self.schema_registry.codec_options(), "subject": self.subject or f"{self.topic}-value"}


class FeatureSpec(_Strict):
    """Record fields -> one float32 feature vector.

    ``numeric: ["*"]`` takes every numeric (int/float/bool) top-level field of
    the record except the label, in sorted name order, fixed at the first record
    seen. A listed field (numeric or categorical) may be a dotted path into nested
    mappings: ``user.age`` reads ``{"user": {"age": 41}}``; when the record has a
    key that is literally ``user.age``, that key wins (flat records whose names
    contain dots keep working). A path that does not resolve is a missing field.
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
    """The label: where it is in a record, and what the model learns from it."""

    #: the label's field; a dotted path reads nested mappings (``target.value``), but a
    #: key that exists literally with the dots wins
    field: str = Field(min_length=1)
    task: Literal["classification", "regression"] = "classification"
    #: fixed class set (labels outside it are bad records); None = growing set
    classes: list[Any] | None = None
    #: output width when the class set grows (ignored when classes is given)
    max_classes: int = Field(default=2, ge=2, le=100_000)
    #: training stops (non-zero exit) when this many records in a row came without the label
    #: field and none with it: a misspelt ``field`` must not look like a run (0: never stop;
    #: a warning comes after 100). Labels from a second topic (``labels:``) are not counted.
    missing_limit: int = Field(default=1000, ge=0)
    #: regression: the model learns the target standardised with running statistics
    #: (checkpointed); predictions and metrics are turned back into the target's units.
    #: None (default): on for ``model.kind: mlp``, off otherwise. An MLP's output starts
    #: near 0 with unit-scale weights and Adam moves it by about ``lr`` per step, so a
    #: target of mean 20 takes thousands of records just to reach its mean (measured
    #: before this switch: MAE 3.66 where predicting the mean gives 1.57)
    standardize: bool | None = None

    def scales_target(self, model: ModelSpec) -> bool:
        """Whether the regression target is standardised for ``model`` (see ``standardize``)."""
        if self.task != "regression":
            return False
        return self.standardize if self.standardize is not None else model.kind == "mlp"

    @model_validator(mode="after")
    def _standardize_is_for_regression(self) -> LabelSpec:
        if self.standardize and self.task != "regression":
            raise ValueError("standardize applies to a regression target (task: regression)")
        return self

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

    #: ``per_record``: every record is predicted by the model that learned all records
    #: before it (in its batch too), then learned with its own optimizer step, the whole
    #: batch in one compiled call (TorchScript / an XLA while loop); the batch size only
    #: changes the speed: predictions equal those at batch 1. ``mini_batch``: a batch is
    #: predicted by the model as it was before the batch, then learned in one step.
    #: Default ``per_record``: on River's Phishing and Agrawal it keeps batch-1 accuracy
    #: at any batch size, at several times the speed of batch-1 mini-batches; mini-batches
    #: of 64 are faster still but lose accuracy on short streams (Phishing: 0.83 vs 0.89;
    #: figures in docs/benchmarks.md). Data-parallel training always learns mini-batches.
    learning: Literal["per_record", "mini_batch"] = "per_record"

    #: experience replay: each train step also learns this many records drawn
    #: (seeded) from a buffer of recently learned ones; 0 = off. Helps small
    #: non-linear streams and recurring concepts; the buffer is checkpointed.
    replay: int = Field(default=0, ge=0, le=65_536)
    replay_buffer: int = Field(default=1000, ge=1, le=10_000_000)
    #: which records the buffer keeps: the last ``replay_buffer`` learned
    #: (``recent``), or a uniform sample of all of them (``reservoir``, Vitter's
    #: algorithm R: old concepts stay represented, for recurring drift)
    replay_mode: Literal["recent", "reservoir"] = "recent"


class AdwinSpec(_Strict):
    """``river.drift.ADWIN`` parameters (River's defaults)."""

    delta: float = Field(default=0.002, gt=0, lt=1)
    clock: int = Field(default=32, ge=1)
    max_buckets: int = Field(default=5, ge=1)
    min_window_length: int = Field(default=5, ge=1)
    grace_period: int = Field(default=10, ge=1)


class PageHinkleySpec(_Strict):
    """``river.drift.PageHinkley`` parameters (River's defaults, but ``mode: up``: an error that rises)."""

    min_instances: int = Field(default=30, ge=1)
    delta: float = Field(default=0.005, ge=0)
    threshold: float = Field(default=50.0, gt=0)
    alpha: float = Field(default=1 - 0.0001, gt=0, le=1)
    mode: Literal["up", "down", "both"] = "up"


class KswinSpec(_Strict):
    """``river.drift.KSWIN`` parameters (River's defaults; ``seed`` fixed for reproducible runs)."""

    alpha: float = Field(default=0.005, gt=0, lt=1)
    window_size: int = Field(default=100, ge=2)
    stat_size: int = Field(default=30, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> KswinSpec:
        if self.stat_size >= self.window_size:
            raise ValueError("stat_size must be smaller than window_size")
        return self


class BoostSpec(_Strict):
    """``policy: boost``: on drift, multiply the learning rate by ``factor``, decaying
    linearly back to ``model.optimizer.lr`` over ``records`` learned records."""

    factor: float = Field(default=3.0, gt=0, le=1000)
    records: int = Field(default=500, ge=1)


class ChallengerSpec(_Strict):
    """``policy: challenger``: on drift, train a second model on the same records and
    promote it when its windowed metric beats the champion's."""

    #: ``fresh``: the spec's initial weights; ``clone``: the champion's weights, a fresh optimizer
    init: Literal["fresh", "clone"] = "fresh"
    #: both models are compared over their last ``window`` scored records ...
    window: int = Field(default=500, ge=1)
    #: ... once the challenger has scored at least this many
    min_records: int = Field(default=300, ge=1)
    #: the challenger's mean signal (error rate or loss) must be lower by at least this
    margin: float = Field(default=0.02, ge=0)
    #: a challenger that has not won after this many records is dropped (0: never)
    max_records: int = Field(default=5000, ge=0)


class DriftSpec(_Strict):
    """Concept-drift detection on the prequential error stream, and what to do about it.

    ``detector: none`` (the default) turns it off. Events go to ``<pipeline>.events``.
    """

    detector: Literal["none", "adwin", "page_hinkley", "kswin"] = "none"
    adwin: AdwinSpec = Field(default_factory=AdwinSpec)
    page_hinkley: PageHinkleySpec = Field(default_factory=PageHinkleySpec)
    kswin: KswinSpec = Field(default_factory=KswinSpec)
    #: what the detector watches per scored record: 0/1 error (absolute error for
    #: regression) or loss (-log p(true class); squared error)
    signal: Literal["error", "loss"] = "error"
    #: ``up``: only a worsening is a drift (a model still learning gets better, and
    #: detectors fire on that too); ``both``: any change
    direction: Literal["up", "both"] = "up"
    #: the first ``warmup`` scored records are not watched: a fresh model's loss
    #: falls fast, and that start would weigh on the detector's reference level
    warmup: int = Field(default=0, ge=0)
    #: values kept to rebuild ADWIN from a checkpoint (it cannot be saved as numbers)
    history: int = Field(default=10_000, ge=1, le=10_000_000)
    policy: Literal["none", "boost", "reset-optimizer", "challenger"] = "none"
    boost: BoostSpec = Field(default_factory=BoostSpec)
    challenger: ChallengerSpec = Field(default_factory=ChallengerSpec)
    #: empty the replay buffer on drift (its records teach the old concept)
    clear_replay: bool = False

    @model_validator(mode="after")
    def _policy_needs_detector(self) -> DriftSpec:
        if self.policy != "none" and self.detector == "none":
            raise ValueError(f"policy '{self.policy}' acts on detected drifts: choose a detector")
        return self


class DelayedLabelsSpec(_Strict):
    """Labels that arrive later, on a second topic, joined to the features by key.

    Each features record is predicted when it arrives and waits (its features as
    transformed then, and its prediction) for a label with the same key, for at
    most ``window`` later features records; when the label comes, that
    prediction is scored (delayed progressive validation) and the record is
    learned. Unmatched features and labels are counted, never learned.
    """

    topic: str = Field(min_length=1)
    #: the join key: the Kafka record key (``null``) or a field present in both records
    key_field: str | None = None
    #: the label's field in a label record (default: ``label.field``)
    field: str | None = None
    #: how long a prediction waits for its label (and a label for its features), in features records
    window: int = Field(default=10_000, ge=1, le=10_000_000)


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
    #: records learned between checkpoints (or ``every_seconds``, whichever comes first).
    #: A crash replays at most this much; each checkpoint writes, fsyncs and commits,
    #: which at 5,000 cost ~5 % of a 20,000 rec/s pipeline (benchmarks/bench_streaming_tax.py)
    every_records: int = Field(default=50_000, ge=1)
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


class DistributedSpec(_Strict):
    """Data-parallel online training on N ranks, with the framework's own engine.

    Every rank runs the same spec; rank r reads the source partitions p with
    ``p % world_size == r`` and all ranks step in lock-step, all-reducing the
    gradients (weighted by sample counts); rank 0 writes the checkpoints. With a
    world size of 1 (the default) nothing of this applies. ``TENSORSTREAM_RANK``,
    ``TENSORSTREAM_WORLD_SIZE``, ``TENSORSTREAM_MASTER_ADDR``,
    ``TENSORSTREAM_MASTER_PORT`` and ``TENSORSTREAM_WORKERS`` (comma-separated)
    override the fields of the same name. See docs/distributed.md.
    """

    #: ``torch`` (torch.distributed + DistributedDataParallel), ``tensorflow``
    #: (tf.distribute.MultiWorkerMirroredStrategy), ``none`` (always one process);
    #: unset: the backend's own engine
    engine: Literal["none", "torch", "tensorflow"] | None = None
    #: ranks in the job; unset: $TENSORSTREAM_WORLD_SIZE, $WORLD_SIZE (torchrun), else 1
    world_size: int | None = Field(default=None, ge=1, le=65_536)
    #: this process' rank; unset: $TENSORSTREAM_RANK, $RANK (torchrun), else 0
    rank: int | None = Field(default=None, ge=0)
    #: torch: rank 0's rendezvous address and port; unset: $MASTER_ADDR / $MASTER_PORT, else 127.0.0.1:29500
    master_addr: str | None = None
    master_port: int | None = Field(default=None, ge=1, le=65_535)
    #: tensorflow: ``host:port`` of every rank's collective server, in rank order (TF_CONFIG's
    #: cluster); unset: $TF_CONFIG when set, else master_addr with ports master_port + rank
    workers: list[str] | None = None
    #: torch process group: ``gloo`` (CPU tensors; the torch backend runs on CPU), ``nccl`` (CUDA)
    process_group: Literal["auto", "gloo", "nccl"] = "auto"
    #: a collective waits this long for a missing rank, then the run fails (restart every
    #: rank: they resume from rank 0's last checkpoint)
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        if self.workers is not None:
            if self.world_size is not None and len(self.workers) != self.world_size:
                raise ValueError(f"workers lists {len(self.workers)} addresses for world_size {self.world_size}")
            bad = [w for w in self.workers if not w.rpartition(":")[2].isdigit()]
            if bad:
                raise ValueError(f"workers must be host:port, got {bad}")
        return self


class PipelineSpec(_Strict):
    #: names the consumer group, the <name>.dlq/.models/.events topics and the state folder
    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9._-]+$", max_length=200)
    backend: BackendName = "torch"
    mode: Mode = "train+infer"
    source: SourceSpec
    sink: SinkSpec | None = None
    features: FeatureSpec
    label: LabelSpec | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    learn: LearnSpec = Field(default_factory=LearnSpec)
    #: concept drift: detector, adaptation policy (off by default)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    #: labels on a second topic, joined by key (default: the label is in the record)
    labels: DelayedLabelsSpec | None = None
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    versions: VersionsSpec = Field(default_factory=VersionsSpec)
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
