"""Replay a dataset or file into a topic (the logic behind ``tensorstream produce``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tensorstream.codecs import encode_frame, encode_json
from tensorstream.data.datasets import LABEL_FIELD, open_source, source_length
from tensorstream.features.columns import MISSING, FieldPath
from tensorstream.kafka import KafkaAdmin, KafkaConfig, KafkaSink


class ProduceError(RuntimeError):
    pass


@dataclass
class ProduceStats:
    records: int
    seconds: float


def record_to_frame(record: dict[str, Any], label_field: str = LABEL_FIELD) -> bytes:
    """Pack a record as a tensor frame: numeric fields (sorted by name, label excluded)
    as float32 ``x``, the label (if present) as ``y``.

    >>> from tensorstream.codecs import decode_frame
    >>> f = decode_frame(record_to_frame({"b": 2, "a": 1.5, "y": True}))
    >>> f["x"].tolist(), bool(f["y"])
    ([1.5, 2.0], True)
    """
    names = sorted(k for k in record if k != label_field)
    try:
        x = np.array([float(record[k]) for k in names], dtype=np.float32)
    except (TypeError, ValueError):
        bad = [k for k in names if not isinstance(record[k], (int, float, bool))]
        raise ProduceError(f"frame encoding needs numeric fields; not numeric: {bad}") from None
    fields: dict[str, np.ndarray] = {"x": x}
    if label_field in record:
        fields["y"] = np.asarray(record[label_field])
    return encode_frame(fields)


def produce_records(cfg: KafkaConfig, source: str, topic: str, *, encoding: str = "json", rate: float = 0.0,
                    limit: int | None = None, key_field: str | None = None, partitions: int = 1,
                    progress: bool = False) -> ProduceStats:
    """Send ``source``'s records to ``topic``; returns how many and how long it took."""
    if encoding not in ("json", "frame"):
        raise ProduceError(f"unknown encoding {encoding!r}: use json or frame")
    total = source_length(source)
    if total is None and limit is None and source.startswith("river:"):
        raise ProduceError(f"{source} has no known end: pass --limit N")
    total = min(total, limit) if (total is not None and limit is not None) else (total or limit)
    KafkaAdmin(cfg).ensure_topic(topic, partitions)
    encode = encode_json if encoding == "json" else record_to_frame
    t0 = time.perf_counter()
    sink = KafkaSink(cfg)
    try:
        n = _send(sink, source, topic, encode, rate, limit, key_field, total, progress)
    finally:
        sink.close()
    return ProduceStats(n, time.perf_counter() - t0)


def _send(sink: KafkaSink, source: str, topic: str, encode: Any, rate: float, limit: int | None,
          key_field: str | None, total: int | None, progress: bool) -> int:
    n = 0
    key_path = FieldPath(key_field) if key_field is not None else None  # dotted paths too, as features.key
    t0 = time.perf_counter()
    bar = Progress(TextColumn("[bold]produce[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rps]:>10,.0f} rec/s"), TimeElapsedColumn(), disable=not progress,
                   transient=False, console=Console(stderr=True))  # chatter: stdout is for results (--json)
    with bar:
        task = bar.add_task(topic, total=total, rps=0.0)
        for rec in open_source(source, limit):
            if rate > 0:  # keep the schedule: record n goes out at t0 + n/rate
                ahead = t0 + n / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            key = None
            if key_path is not None:
                value = key_path.get(rec)
                if value is MISSING:
                    raise ProduceError(f"record {n} has no key field {key_field!r}")
                key = str(value).encode()
            sink.produce(topic, encode(rec), key=key)
            n += 1
            if n % 1000 == 0:
                sink.poll(0)
                bar.update(task, completed=n, rps=n / (time.perf_counter() - t0))
        sink.flush()
        bar.update(task, completed=n, rps=n / max(time.perf_counter() - t0, 1e-9))
    return n
