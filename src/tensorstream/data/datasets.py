"""Record sources for ``tensorstream produce``: files and River datasets by name.

Every source yields plain dicts. River datasets are named ``river:NAME`` with
optional keyword arguments in query form (values parsed as JSON literals, else
kept as strings; nothing is evaluated):

>>> recs = list(open_source("river:Phishing", limit=2))
>>> sorted(recs[0])[:3], recs[0]["y"]
(['age_of_domain', 'anchor_from_other_domain', 'empty_server_form_handler'], True)
>>> next(iter(open_source("river:synth.SEA?seed=42&variant=1", limit=1)))["y"] in (False, True)
True

Drifting streams used by the demo and the drift tests have short names:
``river:drift.sea`` (SEA variant 0 -> 1 at 500, width 50) and
``river:drift.agrawal`` (Agrawal function 0 -> 2 at 5000, abrupt).
"""

from __future__ import annotations

import csv
import importlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson

LABEL_FIELD = "y"


def _literal(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def _drift_sea(seed: int = 42, position: int = 500, width: int = 50, drift_seed: int = 1) -> Any:
    from river.datasets import synth

    return synth.ConceptDriftStream(stream=synth.SEA(seed=seed, variant=0), drift_stream=synth.SEA(seed=seed, variant=1),
                                    position=position, width=width, seed=drift_seed)


def _drift_agrawal(seed: int = 42, position: int = 5000, before: int = 0, after: int = 2) -> Any:
    """An abrupt switch of Agrawal's classification function at ``position``.

    Chained by hand: River's ConceptDriftStream models a sigmoid transition and
    overflows ``math.exp`` for widths small enough to be abrupt.
    """
    from river.datasets import synth

    return itertools.chain(itertools.islice(synth.Agrawal(classification_function=before, seed=seed), position),
                           synth.Agrawal(classification_function=after, seed=seed + 1))


PRESETS: dict[str, Callable[..., Any]] = {"drift.sea": _drift_sea, "drift.agrawal": _drift_agrawal}


def river_dataset(name: str) -> Any:
    """``Phishing``, ``synth.Agrawal?seed=1``, ``drift.sea`` ... -> a River dataset object."""
    base, _, query = name.partition("?")
    kwargs = {k: _literal(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    if base in PRESETS:
        return PRESETS[base](**kwargs)
    module_name, _, attr = base.rpartition(".")
    module = importlib.import_module("river.datasets" + ("." + module_name if module_name else ""))
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"unknown River dataset {base!r}") from None
    if not isinstance(cls, type):
        raise ValueError(f"river dataset {base!r} is not a dataset class")
    return cls(**kwargs)


def _river_records(name: str) -> Iterator[dict[str, Any]]:
    for x, y in river_dataset(name):
        yield {**x, LABEL_FIELD: y}


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            yield {k: _literal(v) for k, v in row.items()}


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def open_source(source: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Records from ``river:NAME``, a ``.csv``, ``.jsonl``/``.ndjson`` or ``.parquet`` file."""
    if source.startswith("river:"):
        it = _river_records(source[len("river:"):])
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such file: {source}")
        suffix = path.suffix.lower()
        readers = {".csv": _csv_records, ".jsonl": _jsonl_records, ".ndjson": _jsonl_records,
                   ".json": _jsonl_records, ".parquet": _parquet_records}
        if suffix not in readers:
            raise ValueError(f"unsupported file type {suffix!r}: use .csv, .jsonl, .ndjson or .parquet")
        it = readers[suffix](path)
    return itertools.islice(it, limit) if limit is not None else it


def source_length(source: str) -> int | None:
    """Number of records if known cheaply (River's n_samples), else None."""
    if source.startswith("river:"):
        try:
            return getattr(river_dataset(source[len("river:"):]), "n_samples", None)
        except Exception:
            return None
    return None
