"""Concept drift (detectors, adaptation policies) and labels from a second topic."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tensorstream.spec.base import _Strict


class AdwinSpec(_Strict):
    """``river.drift.ADWIN`` parameters (River's defaults)."""

    #: significance: smaller detects fewer (and later) changes
    delta: float = Field(default=0.002, gt=0, lt=1)
    #: values between two checks for a change
    clock: int = Field(default=32, ge=1)
    #: buckets of each size kept (memory and precision of the window)
    max_buckets: int = Field(default=5, ge=1)
    #: the smallest sub-window compared
    min_window_length: int = Field(default=5, ge=1)
    #: values seen before the first check
    grace_period: int = Field(default=10, ge=1)


class PageHinkleySpec(_Strict):
    """``river.drift.PageHinkley`` parameters (River's defaults, but ``mode: up``: an error that rises)."""

    #: values seen before a change can be detected
    min_instances: int = Field(default=30, ge=1)
    #: the size of change tolerated
    delta: float = Field(default=0.005, ge=0)
    #: the cumulative deviation that is a change (lambda): larger detects fewer
    threshold: float = Field(default=50.0, gt=0)
    #: forgetting factor of the running mean
    alpha: float = Field(default=1 - 0.0001, gt=0, le=1)
    #: the direction of the changes detected
    mode: Literal["up", "down", "both"] = "up"


class KswinSpec(_Strict):
    """``river.drift.KSWIN`` parameters (River's defaults; ``seed`` fixed for reproducible runs)."""

    #: p-value of the Kolmogorov-Smirnov test: smaller detects fewer changes
    alpha: float = Field(default=0.005, gt=0, lt=1)
    #: values in the sliding window
    window_size: int = Field(default=100, ge=2)
    #: the most recent values compared with a sample of the rest of the window
    stat_size: int = Field(default=30, ge=1)
    #: seeds the sampling of the window
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> KswinSpec:
        if self.stat_size >= self.window_size:
            raise ValueError("stat_size must be smaller than window_size")
        return self


class BoostSpec(_Strict):
    """``policy: boost``: on drift, multiply the learning rate by ``factor``, decaying
    linearly back to ``model.optimizer.lr`` over ``records`` learned records."""

    #: the learning rate right after a drift is ``factor`` x ``model.optimizer.lr``
    factor: float = Field(default=3.0, gt=0, le=1000)
    #: learned records over which it decays back
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

    #: the drift detector (River's), or ``none``
    detector: Literal["none", "adwin", "page_hinkley", "kswin"] = "none"
    #: parameters of ``detector: adwin``
    adwin: AdwinSpec = Field(default_factory=AdwinSpec)
    #: parameters of ``detector: page_hinkley``
    page_hinkley: PageHinkleySpec = Field(default_factory=PageHinkleySpec)
    #: parameters of ``detector: kswin``
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
    #: what a detected drift does: ``boost`` the learning rate, ``reset-optimizer`` (fresh Adam
    #: moments), train a ``challenger`` model and promote it if it wins, or ``none`` (events only)
    policy: Literal["none", "boost", "reset-optimizer", "challenger"] = "none"
    #: parameters of ``policy: boost``
    boost: BoostSpec = Field(default_factory=BoostSpec)
    #: parameters of ``policy: challenger``
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

    #: the topic the labels arrive on
    topic: str = Field(min_length=1)
    #: the join key: the Kafka record key (``null``) or a field present in both records
    key_field: str | None = None
    #: the label's field in a label record (default: ``label.field``)
    field: str | None = None
    #: how long a prediction waits for its label (and a label for its features), in features records
    window: int = Field(default=10_000, ge=1, le=10_000_000)
