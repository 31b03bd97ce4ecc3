"""Read records from a topic for people (the logic behind ``tensorstream consume``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from tensorstream.codecs import DecodeError, decode_frame, decode_json
from tensorstream.kafka import KafkaConfig, KafkaSource


_JOIN_GRACE_S = 15.0  # how long a group join may take before idle time counts anyway


def _show(value: bytes | None, decode: str) -> Any:
    if value is None:
        return None
    try:
        if decode == "json":
            return decode_json(value)
        if decode == "frame":
            f = decode_frame(value)
            return {k: v.tolist() for k, v in f.items()} if isinstance(f, dict) else f.tolist()
    except DecodeError as e:
        return {"undecodable": str(e), "raw": value.decode("utf-8", "backslashreplace")}
    return value.decode("utf-8", "backslashreplace")


def consume_records(cfg: KafkaConfig, topic: str, *, group: str | None = None, decode: str = "json",
                    max_records: int | None = None, idle_timeout: float = 5.0,
                    commit: bool = False) -> Iterator[str]:
    """Yield one JSON line per record until ``max_records`` or ``idle_timeout`` s without records."""
    if decode not in ("json", "frame", "raw"):
        raise ValueError(f"unknown --decode {decode!r}: use json, frame or raw")
    src = KafkaSource(cfg, group or f"tensorstream.data.consume.{uuid.uuid4().hex[:12]}", [topic])
    n = 0
    started = last = time.monotonic()
    try:
        while max_records is None or n < max_records:
            batch = src.poll_batch(min(500, max_records - n) if max_records else 500, 0.2)
            if not batch:
                # The idle clock starts once the group gave us partitions: a join takes seconds.
                if not src.assigned and time.monotonic() - started < idle_timeout + _JOIN_GRACE_S:
                    last = time.monotonic()
                elif time.monotonic() - last > idle_timeout:
                    break
                continue
            last = time.monotonic()
            for r in batch:
                n += 1
                yield orjson.dumps({
                    "partition": r.partition, "offset": r.offset,
                    "key": r.key.decode("utf-8", "backslashreplace") if r.key is not None else None,
                    "value": _show(r.value, decode),
                    "headers": {k: (v or b"").decode("utf-8", "backslashreplace") for k, v in (r.headers or [])},
                }).decode()
            if commit and group:
                nxt: dict = {}
                for r in batch:
                    nxt[(r.topic, r.partition)] = r.offset + 1
                src.commit(nxt)
    finally:
        src.close()
