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

Keyed streams for stateful features (docs/features.md), endless (pass a limit):
``river:keyed.transactions`` (card payments; the label is "this amount is far above
the card's usual", unreadable without the card's history) and ``river:keyed.sticky``
(a label that persists per key: the previous label is a strong baseline).

>>> r = next(iter(open_source("river:keyed.transactions?seed=1", limit=1)))
>>> sorted(r)
['amount', 'card', 'merchant', 'ts', 'y']
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


def _keyed_transactions(seed: int = 42, cards: int = 200, anomaly: float = 0.25, noise: float = 0.03,
                        late: float = 0.02, start_ms: int = 1_700_000_000_000) -> Iterator[tuple[dict[str, Any], int]]:
    """Card payments: ``{card, ts, amount, merchant}``, label ``y`` = 1 for an anomalous amount.

    Each card has its own usual amount (log-uniform between 10 and 1000); an anomaly
    (probability ``anomaly``) is 4x the card's usual. Over all cards, amounts of
    anomalies and normal payments overlap: only the card's own history (a window mean,
    the previous amounts) tells them apart. Cards are Zipf-popular; payments arrive
    about a second apart (``ts``, epoch ms), a fraction ``late`` up to 3 s out of
    order; ``noise``: labels flipped.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    usual = rng.uniform(np.log(10), np.log(1000), cards)
    popularity = 1.0 / np.arange(1, cards + 1) ** 0.7
    popularity /= popularity.sum()
    t = start_ms
    while True:
        card = int(rng.choice(cards, p=popularity))
        t += int(rng.exponential(1000)) + 1
        odd = rng.random() < anomaly
        amount = float(np.exp(usual[card] + 0.25 * rng.normal() + (np.log(4) if odd else 0.0)))
        ts = t - int(rng.uniform(0, 3000)) if rng.random() < late else t
        y = int(odd) ^ int(rng.random() < noise)
        yield {"card": f"c{card}", "ts": ts, "amount": round(amount, 2), "merchant": f"m{rng.integers(20)}"}, y


def _keyed_sticky(seed: int = 42, keys: int = 20, stay: float = 0.85, signal: float = 1.0,
                  start_ms: int = 1_700_000_000_000) -> Iterator[tuple[dict[str, Any], int]]:
    """An autocorrelated label: each key's hidden state persists (probability ``stay`` per
    record of the key) and is the label; ``x0..x2`` are weak noisy readings of it
    (``signal`` standard deviations apart). "Predict the key's previous label" is right
    about ``stay`` of the time; the readings alone about ``Phi(signal * sqrt(3) / 2)`` (0.81)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    state = rng.integers(0, 2, keys)
    t = start_ms
    while True:
        k = int(rng.integers(keys))
        if rng.random() > stay:
            state[k] ^= 1
        t += int(rng.exponential(1000)) + 1
        mean = signal * (state[k] - 0.5)
        x = {f"x{j}": round(float(mean + rng.normal()), 4) for j in range(3)}
        yield {"key": f"k{k}", "ts": t, **x}, int(state[k])


PRESETS: dict[str, Callable[..., Any]] = {"drift.sea": _drift_sea, "drift.agrawal": _drift_agrawal,
                                          "keyed.transactions": _keyed_transactions, "keyed.sticky": _keyed_sticky}


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
