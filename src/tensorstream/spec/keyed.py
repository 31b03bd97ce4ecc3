"""Stateful stream features: keyed windows, lags, label history, time features.

These are the ``features`` fields beyond the per-record ones (see
:class:`~tensorstream.spec.model.FeatureSpec`); docs/features.md has the
semantics. Durations are milliseconds (an integer) or a string with a unit:
``500ms``, ``30s``, ``5m``, ``1h``, ``7d``.

>>> WindowSpec.model_validate({"field": "amount", "type": "hopping", "size": "1h", "hop": "10m",
...                            "aggs": ["mean", "max"]}).span
6
>>> duration_ms("1h30m")
5400000
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tensorstream.spec.base import _Strict

#: the reserved names of ``features.key`` and ``features.time`` (not fields of the record)
RECORD_KEY = "@key"
RECORD_TIME = "@timestamp"

AGGS = ("count", "sum", "mean", "min", "max", "std", "last", "distinct")
#: aggregates that need numbers (the others take any scalar)
NUMERIC_AGGS = frozenset({"sum", "mean", "min", "max", "std", "last"})
TIME_FEATURES = ("hour_of_day", "day_of_week")

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def duration_ms(v: Any) -> int:
    """``"1h"``, ``"90s"``, ``"1h30m"``, ``250`` (ms) -> milliseconds; ValueError otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"a duration is milliseconds or a string like '30s', '5m', '1h', got {v!r}")
    if isinstance(v, (int, float)):
        if v < 0 or v != int(v):
            raise ValueError(f"a duration in milliseconds must be a whole number >= 0, got {v!r}")
        return int(v)
    if isinstance(v, str):
        text = v.replace(" ", "").lower()
        pos, total = 0, 0.0
        for m in _PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos == len(text) and text:
            return int(round(total))
    raise ValueError(f"a duration is milliseconds or a string like '500ms', '30s', '5m', '1h', '7d', got {v!r}")


class WindowSpec(_Strict):
    """One window over event time, per key, and the aggregates taken over it.

    ``sliding``: the records of the key with event time in ``(t - size, t]``
    (exact; at most ``state.max_events`` events kept per key). ``tumbling``:
    the records in the same ``size``-aligned window as ``t``. ``hopping``: the
    ``size`` window ending with the ``hop``-aligned bucket of ``t`` (a sliding
    window at ``hop`` resolution; ``size`` must be a multiple of ``hop``).
    A record's window never holds the record itself: only the records before it.
    """

    #: the field aggregated (a dotted path); omit it for a window that only counts records
    field: str | None = None
    #: ``sliding`` (exact, the last ``size``), ``tumbling`` (``size``-aligned) or ``hopping``
    #: (the ``size`` window ending with the current ``hop`` bucket)
    type: Literal["sliding", "tumbling", "hopping"] = "sliding"
    #: the window's length: milliseconds or a duration (``10m``, ``1h``)
    size: int
    #: hopping windows: the step (bucket width); ``size`` must be a multiple of it
    hop: int | None = None
    #: the aggregates over the window (``distinct``: exact on sliding windows, HyperLogLog on buckets)
    aggs: list[Literal["count", "sum", "mean", "min", "max", "std", "last", "distinct"]] = Field(min_length=1)

    @field_validator("size", "hop", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else duration_ms(v)

    @model_validator(mode="after")
    def _consistent(self) -> WindowSpec:
        if self.size <= 0:
            raise ValueError("size must be > 0")
        if len(set(self.aggs)) != len(self.aggs):
            raise ValueError(f"aggs repeat: {self.aggs}")
        if self.type == "hopping":
            if not self.hop or self.hop <= 0:
                raise ValueError("a hopping window needs hop > 0 (e.g. size: 1h, hop: 10m)")
            if self.size % self.hop:
                raise ValueError(f"size ({self.size} ms) must be a multiple of hop ({self.hop} ms)")
        elif self.hop is not None:
            raise ValueError(f"hop applies to hopping windows, not {self.type}")
        if self.field is None and set(self.aggs) != {"count"}:
            raise ValueError("a window without a field can only count records: aggs: [count]")
        return self

    @property
    def width(self) -> int:
        """The bucket width in ms (sliding windows: none, 0)."""
        return {"sliding": 0, "tumbling": self.size, "hopping": self.hop or 0}[self.type]

    @property
    def span(self) -> int:
        """Buckets in one window (1 for tumbling; 0 for sliding)."""
        return self.size // self.width if self.width else 0

    @property
    def name(self) -> str:
        extra = f"/{self.hop}ms" if self.type == "hopping" else ""
        return f"{self.type}({self.field or '*'},{self.size}ms{extra})"


class KeyedStateSpec(_Strict):
    """Bounds, lateness and storage of the per-key state."""

    #: a key not seen for this long (event time, against the stream's watermark) is dropped;
    #: milliseconds or a duration (``7d``)
    ttl: int | None = None
    #: at most this many keys; beyond, the least recently seen are evicted (``state_keys_evicted``)
    max_keys: int | None = Field(default=None, ge=1)
    #: TTL and max_keys are enforced every this many records (deterministic points of the
    #: stream, so the batch size never changes which keys are dropped)
    sweep_every: int = Field(default=1000, ge=1, le=10_000_000)
    #: how far behind the watermark (the largest event time seen) a record may be and still
    #: enter its windows; later ones are late (``late_records``); milliseconds or a duration
    allowed_lateness: int = 0
    #: late records: ``count`` (predicted and learned, kept out of the windows) or ``dead_letter``
    late: Literal["count", "dead_letter"] = "count"
    #: sliding windows: events kept per key (the oldest go first; ``window_truncated`` counts)
    max_events: int = Field(default=32, ge=1, le=100_000)
    #: distinct counts on tumbling/hopping windows: HyperLogLog with 2**p registers per bucket
    distinct_precision: int = Field(default=6, ge=4, le=14)
    #: ``memory`` (default) or ``disk`` (SQLite under ``path``: key spaces beyond memory)
    store: Literal["memory", "disk"] = "memory"
    #: disk store folder (default ``<state_dir>/<name>/keyed-state``)
    path: str | None = None
    #: disk store: keys kept decoded in memory
    cache_keys: int = Field(default=100_000, ge=1)
    #: when features.key is a field: ``warn`` (once) or ``refuse`` (stop) if the Kafka record
    #: keys are not that field's values (a key's records may then reach several workers)
    partitioning: Literal["warn", "refuse", "off"] = "warn"

    @field_validator("ttl", "allowed_lateness", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else duration_ms(v)


#: the stateful fields of FeatureSpec (docs/features.md), in order
KEYED_FIELDS = ("key", "time", "time_unit", "windows", "lags", "label_history", "time_features", "state")


def check_lags(v: dict[str, int]) -> dict[str, int]:
    for f, k in v.items():
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1000:
            raise ValueError(f"lags.{f}: the number of previous values must be 1..1000, got {k!r}")
    return v


def check_name(v: str | None) -> str | None:
    if v is not None and (not v or (v.startswith("@") and v not in (RECORD_KEY, RECORD_TIME))):
        raise ValueError(f"{v!r}: use a field name, '{RECORD_KEY}' (key) or '{RECORD_TIME}' (time)")
    return v


def is_stateful(spec: Any) -> bool:
    """Whether a ``features`` section configures any stateful feature."""
    return bool(spec.windows or spec.lags or spec.label_history or spec.time_features)


def check_keyed(spec: Any) -> None:
    """Raises ValueError for inconsistent stateful settings of a ``features`` section."""
    if spec.key == RECORD_TIME or spec.time == RECORD_KEY:
        raise ValueError("features.key names the state key ('@key' or a field), features.time the "
                         "event time ('@timestamp' or a field)")
    if spec.key is not None and not is_stateful(spec):
        raise ValueError("features.key is set but no stateful feature uses it: add windows, lags or "
                         "label_history")
    names = [w.name for w in spec.windows]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"windows repeat: {sorted(dup)} (merge their aggs into one window)")
    if spec.state.store == "disk" and not is_stateful(spec):
        raise ValueError("state.store: disk without stateful features")
