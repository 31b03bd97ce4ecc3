"""Features, labels, the model and how it learns."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, field_validator, model_serializer, \
    model_validator

from tensorstream.spec.base import _Strict
from tensorstream.spec.keyed import KEYED_FIELDS, RECORD_TIME, KeyedStateSpec, WindowSpec, check_keyed, \
    check_lags, check_name, is_stateful


class FeatureSpec(_Strict):
    """Record fields -> one float32 feature vector.

    ``numeric: ["*"]`` takes every numeric (int/float/bool) top-level field of
    the record except the label, in sorted name order, fixed at the first record
    seen. A listed field (numeric or categorical) may be a dotted path into nested
    mappings: ``user.age`` reads ``{"user": {"age": 41}}``; when the record has a
    key that is literally ``user.age``, that key wins (flat records whose names
    contain dots keep working). A path that does not resolve is a missing field.

    Stateful features (``key``, ``time``, ``windows``, ``lags``, ``label_history``,
    ``time_features``, ``state``): per-key history, checkpointed with the model;
    :mod:`tensorstream.spec.keyed` and docs/features.md.
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
    #: the state key of stateful features: a field (dotted path) or ``"@key"`` (the Kafka record
    #: key); unset: one state for the whole stream (lags and label history per stream)
    key: str | None = None
    #: event time: ``"@timestamp"`` (the record's Kafka timestamp) or a field of epoch time
    time: str = RECORD_TIME
    #: the unit of a ``time`` field: milliseconds or seconds
    time_unit: Literal["ms", "s"] = "ms"
    #: aggregates over event-time windows, per key (docs/features.md)
    windows: list[WindowSpec] = Field(default_factory=list)
    #: field -> how many previous values of it (per key) become features
    lags: dict[str, int] = Field(default_factory=dict)
    #: the previous k labels of the key: only labels known before the record (needs ``label``)
    label_history: int = Field(default=0, ge=0, le=1000)
    #: cyclic encodings (sin, cos) of the event time, in UTC
    time_features: list[Literal["hour_of_day", "day_of_week"]] = Field(default_factory=list)
    #: bounds (TTL, max keys), lateness and storage of the per-key state
    state: KeyedStateSpec = Field(default_factory=KeyedStateSpec)

    @field_validator("lags")
    @classmethod
    def _lags(cls, v: dict[str, int]) -> dict[str, int]:
        return check_lags(v)

    @field_validator("key", "time")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return check_name(v)

    @property
    def stateful(self) -> bool:
        """Whether any stateful feature (windows, lags, label history, time features) is configured."""
        return is_stateful(self)

    @model_validator(mode="after")
    def _some_features(self) -> FeatureSpec:
        if "*" in self.numeric and len(self.numeric) > 1:
            raise ValueError("numeric: '*' takes every numeric field; list fields or use '*', not both")
        if not self.numeric and not self.categorical and not self.stateful:
            raise ValueError("at least one of 'numeric', 'categorical', 'windows', 'lags', 'label_history' "
                             "or 'time_features' must be given")
        check_keyed(self)
        return self

    @model_serializer(mode="wrap")
    def _drop_default_keyed(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """The stateful fields are left out of a dump while they hold their defaults: the spec
        hash of a spec without them (and so its checkpoints) stays what it was."""
        data = handler(self)
        for name, default in _KEYED_DEFAULTS.items():
            value = getattr(self, name)
            if name in data and (value == default or (hasattr(value, "model_dump") and value == type(value)())):
                del data[name]
        return data


_KEYED_DEFAULTS = {name: FeatureSpec.model_fields[name].get_default(call_default_factory=True) for name in KEYED_FIELDS}


class LabelSpec(_Strict):
    """The label: where it is in a record, and what the model learns from it."""

    #: the label's field; a dotted path reads nested mappings (``target.value``), but a
    #: key that exists literally with the dots wins
    field: str = Field(min_length=1)
    #: ``classification``: one output per class, softmax cross-entropy, accuracy/F1/log-loss;
    #: ``regression``: one output, squared error, MAE/RMSE
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
    #: the optimizer, the same in both frameworks (its state is checkpointed)
    name: Literal["sgd", "adam"] = "adam"
    #: learning rate
    lr: float = Field(default=1e-2, gt=0, le=10)
    momentum: float = Field(default=0.0, ge=0, lt=1)  # sgd only
    #: decoupled weight decay (each step first shrinks the weights by lr * weight_decay)
    weight_decay: float = Field(default=0.0, ge=0)


class ModelSpec(_Strict):
    """The model: a built-in tabular model or a user factory.

    ``kind: linear`` (logistic/linear regression) or ``kind: mlp`` are built
    identically in both frameworks. ``kind: "my_pkg.models:make"`` imports the
    factory (an import path, never code from a string) and calls
    ``make(n_features=..., n_outputs=...)``; it must return an ``nn.Module`` for
    torch or a ``keras.Model`` for tensorflow.
    """

    #: ``mlp``, ``linear``, or your own factory ``"module:function"`` (docs/custom-models.md);
    #: the module is found among the installed packages, then in the current directory
    kind: str = "mlp"
    #: hidden layer widths of ``kind: mlp``
    hidden: list[int] = Field(default_factory=lambda: [32])
    #: the hidden layers' activation (built-in models)
    activation: Literal["relu", "tanh"] = "relu"
    #: ``auto``: cross-entropy for a classification, squared error for a regression
    loss: Literal["auto", "cross_entropy", "mse"] = "auto"
    #: the optimizer and its learning rate
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    #: torch.compile (torch) / XLA jit_compile (tensorflow)
    compile: bool = False
    #: seeds the initial weights (built-in models: the same numbers in both frameworks) and dropout
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
    #: records the replay buffer holds
    replay_buffer: int = Field(default=1000, ge=1, le=10_000_000)
    #: which records the buffer keeps: the last ``replay_buffer`` learned
    #: (``recent``), or a uniform sample of all of them (``reservoir``, Vitter's
    #: algorithm R: old concepts stay represented, for recurring drift)
    replay_mode: Literal["recent", "reservoir"] = "recent"
