"""The checkpoint manifest: what a checkpoint reflects, and a hash of every file.

A checkpoint directory holds ``state.safetensors`` (the learner state) and
``manifest.json``, written last. The manifest is plain, strict JSON (no NaN
tokens: non-finite metrics are the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"``) so any tool can read it. It carries a ``manifest_sha256`` of
its own canonical form, so a bit flip that still parses (say, in an offset) is
caught instead of silently replaying from the wrong place.

>>> data = build_manifest(
...     "00000001-3fa1c2", "2026-01-02T03:04:05.000000+00:00",
...     offsets={("clicks", 0): 42, ("clicks", 1): 7}, n_learned=49,
...     backend="torch", spec_hash="ab12", metrics={"accuracy": 0.75, "logloss": float("inf")},
...     parent=None, extra={}, files={"state.safetensors": file_digest(b"x")})
>>> m = parse_manifest(data, "00000001-3fa1c2")
>>> decode_offsets(m["offsets"]), decode_metrics(m["metrics"])
({('clicks', 0): 42, ('clicks', 1): 7}, {'accuracy': 0.75, 'logloss': inf})
>>> parse_manifest(data.replace(b"42", b"43"), "00000001-3fa1c2")
Traceback (most recent call last):
...
tensorstream.checkpoint.manifest.CheckpointError: manifest.json does not match its manifest_sha256 (corrupted or edited)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

FORMAT = "tensorstream.checkpoint/1"
MANIFEST = "manifest.json"
STATE = "state.safetensors"
PROMOTED = "promoted.json"

#: ``<8-digit sequence>-<6 hex>``: sorts by creation, the suffix keeps two
#: writers that raced for one sequence number apart.
ID_RE = re.compile(r"^(\d{8})-([0-9a-f]{6})$")
# Names a manifest may list: plain file names inside the checkpoint, never a
# path (a forged "../x" must not make the loader read outside the checkpoint).
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class CheckpointError(ValueError):
    """A checkpoint that is missing, torn, tampered with or not a checkpoint."""


def file_digest(data: bytes) -> dict[str, Any]:
    """The manifest's record of one file: ``{"sha256": hex, "size": bytes}``."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _canonical(m: Mapping[str, Any]) -> bytes:
    return json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode_offsets(offsets: Mapping[tuple[str, int], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, off in offsets.items():
        try:
            topic, partition = key
        except (TypeError, ValueError):
            raise ValueError(f"offsets keys must be (topic, partition) pairs, got {key!r}") from None
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"offsets: topic must be a non-empty string, got {topic!r}")
        p, o = _nonneg_int(partition, "partition"), _nonneg_int(off, f"offset of {topic}[{partition}]")
        out.setdefault(topic, {})[str(p)] = o
    return {t: dict(sorted(ps.items(), key=lambda kv: int(kv[0]))) for t, ps in sorted(out.items())}


def decode_offsets(raw: Any) -> dict[tuple[str, int], int]:
    if not isinstance(raw, dict):
        raise CheckpointError("manifest field 'offsets' must be an object {topic: {partition: offset}}")
    out: dict[tuple[str, int], int] = {}
    for topic, parts in raw.items():
        if not isinstance(parts, dict):
            raise CheckpointError(f"manifest offsets of topic {topic!r} must be an object")
        for p, o in parts.items():
            if not (isinstance(p, str) and p.isdigit()) or not _is_nonneg_int(o):
                raise CheckpointError(f"manifest offset {topic!r}[{p!r}] = {o!r} is not partition -> offset >= 0")
            out[(topic, int(p))] = o
    return out


def encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise ValueError(f"metric names must be strings, got {k!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"metric {k!r} must be a number, got {v!r}") from None
        out[k] = f if math.isfinite(f) else ("NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity"))
    return out


def decode_metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise CheckpointError("manifest field 'metrics' must be an object")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if isinstance(v, str) and v in _NONFINITE:
            out[k] = _NONFINITE[v]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        else:
            raise CheckpointError(f"manifest metric {k!r} = {v!r} is not a number")
    return out


def build_manifest(
    checkpoint_id: str,
    created_at: str,
    *,
    offsets: Mapping[tuple[str, int], int],
    n_learned: int,
    backend: str,
    spec_hash: str,
    metrics: Mapping[str, float] | None,
    parent: str | None,
    extra: Mapping[str, Any] | None,
    files: Mapping[str, Mapping[str, Any]],
) -> bytes:
    """The bytes of ``manifest.json``; raises ValueError for values it cannot hold."""
    if not ID_RE.match(checkpoint_id):
        raise ValueError(f"not a checkpoint id: {checkpoint_id!r}")
    if parent is not None and not (isinstance(parent, str) and ID_RE.match(parent)):
        raise ValueError(f"parent must be a checkpoint id or None, got {parent!r}")
    if not isinstance(backend, str) or not isinstance(spec_hash, str):
        raise ValueError(f"backend and spec_hash must be strings, got {backend!r}, {spec_hash!r}")
    m = {
        "format": FORMAT,
        "id": checkpoint_id,
        "created_at": created_at,
        "offsets": encode_offsets(offsets),
        "n_learned": _nonneg_int(n_learned, "n_learned"),
        "backend": backend,
        "spec_hash": spec_hash,
        "metrics": encode_metrics(metrics or {}),
        "parent": parent,
        "extra": dict(extra or {}),
        "files": {k: dict(v) for k, v in files.items()},
    }
    try:
        # Normalise through JSON (tuples -> lists ...) so that what is hashed is
        # exactly what a reader will parse back.
        m = json.loads(_canonical(m))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint 'extra' must be JSON-serialisable (finite numbers, string keys): {e}") from None
    m["manifest_sha256"] = hashlib.sha256(_canonical(m)).hexdigest()
    return json.dumps(m, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False).encode() + b"\n"


def parse_manifest(data: bytes, checkpoint_id: str) -> dict[str, Any]:
    """Parse and check a manifest; CheckpointError says what is wrong with it."""
    try:
        m = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"manifest.json is not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise CheckpointError("manifest.json is not a JSON object")
    if m.get("format") != FORMAT:
        raise CheckpointError(f"manifest format {m.get('format')!r} is not {FORMAT!r}")
    claimed = m.pop("manifest_sha256", None)
    if claimed != hashlib.sha256(_canonical(m)).hexdigest():
        raise CheckpointError("manifest.json does not match its manifest_sha256 (corrupted or edited)")
    if m.get("id") != checkpoint_id:
        raise CheckpointError(f"manifest names checkpoint {m.get('id')!r}, the directory is {checkpoint_id!r}")
    for key, kind in [("created_at", str), ("backend", str), ("spec_hash", str), ("extra", dict), ("files", dict)]:
        if not isinstance(m.get(key), kind):
            raise CheckpointError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    if not _is_nonneg_int(m.get("n_learned")):
        raise CheckpointError("manifest field 'n_learned' must be an integer >= 0")
    parent = m.get("parent")
    if parent is not None and not (isinstance(parent, str) and ID_RE.match(parent)):
        raise CheckpointError(f"manifest field 'parent' is not a checkpoint id: {parent!r}")
    decode_offsets(m.get("offsets"))
    decode_metrics(m.get("metrics"))
    files = m["files"]
    if STATE not in files:
        raise CheckpointError(f"manifest does not list {STATE}")
    for name, d in files.items():
        if not _FILE_RE.match(name) or name in (MANIFEST, PROMOTED):
            raise CheckpointError(f"manifest lists an invalid file name {name!r}")
        if not (isinstance(d, dict) and isinstance(d.get("sha256"), str) and _HEX64.match(d["sha256"])
                and _is_nonneg_int(d.get("size"))):
            raise CheckpointError(f"manifest entry for {name!r} needs a sha256 hex digest and a size")
    return m


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _nonneg_int(v: Any, what: str) -> int:
    # numpy integers are fine (offsets often come out of arrays); floats are not.
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    i = v.__index__()
    if i < 0:
        raise ValueError(f"{what} must be >= 0, got {i}")
    return i
