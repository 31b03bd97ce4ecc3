"""The feature layout sidecar: what a serving program in any language applies first.

The exported graph takes one float32 matrix ``[batch, n_features]``: the raw
numeric fields (standardised *inside* the graph) followed by the categorical
columns, already encoded. Encoding categories needs the vocabularies, which
are strings and grow while training, so they are not graph constants: this
JSON says how to build each row from a record, and :func:`encode_records` is
the reference implementation (it reads only the JSON).

>>> layout = {"numeric": {"record": "mapping", "width": 2,
...                       "fields": [{"name": "a", "offset": 0, "width": 1}, {"name": "v", "offset": 1, "width": 1}]},
...           "categorical": {"encoding": "onehot", "fields": [
...               {"name": "c", "offset": 2, "width": 3, "vocab": ["x", "y"], "max_categories": 2}]},
...           "input": {"shape": [None, 5]}}
>>> encode_records(layout, [{"a": 1.5, "v": [2], "c": "y"}, {"a": 0, "v": [0], "c": "new"}]).tolist()
[[1.5, 2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tensorstream.features.records import category_key
from tensorstream.features.state import from_json_array
from tensorstream.features.transform import stable_bucket

SCHEMA = "tensorstream.export.layout/1"

#: the categorical key rule, in words, for implementers in other languages
KEY_RULE = (
    "strings as they are; booleans 'true'/'false'; integers and floats with an integral value as a "
    "decimal integer ('3' for 3 and 3.0); other floats as the shortest repr that round-trips ('2.5')"
)


def describe_features(
    features_state: Mapping[str, np.ndarray], *, standardize: bool, mean: np.ndarray | None, std: np.ndarray | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(numeric, categorical)`` sections of the sidecar from ``FeaturePipeline.state_dict()``."""
    config = from_json_array(features_state["config"])
    lay = from_json_array(features_state["layout"])
    fields, offset = [], 0
    for name, width in lay["fields"]:
        fields.append({"name": name, "offset": offset, "width": int(width)})
        offset += int(width)
    numeric: dict[str, Any] = {
        "record": "array" if lay["array_records"] else "mapping",
        "offset": 0,
        "width": offset,
        "fields": [] if lay["array_records"] else fields,
        # informational: the graph applies it (x - mean) / std in float64; feed raw values
        "standardize": {"in_graph": True, "mean": mean.tolist(), "std": std.tolist()}
        if standardize and mean is not None and std is not None
        else None,
    }
    encoding = config["categorical_encoding"]
    vocab = from_json_array(features_state["vocab"]) if "vocab" in features_state else {}
    cats = []
    for name in config["categorical"]:
        if encoding == "onehot":
            m = int(config["max_categories"])
            cats.append({"name": name, "offset": offset, "width": m + 1, "vocab": list(vocab.get(name, [])),
                         "max_categories": m})
            offset += m + 1
        else:
            b = int(config["hash_buckets"])
            cats.append({"name": name, "offset": offset, "width": b})
            offset += b
    categorical = {
        "encoding": encoding,
        "key": KEY_RULE,
        "rule": (
            "column offset + index of the key in vocab; a key not in vocab goes to column offset + "
            "max_categories (the overflow slot) when vocab is full (len == max_categories), else the "
            "block stays all zeros"
            if encoding == "onehot"
            else "column offset + (CRC-32 (zlib/IEEE) of the key's UTF-8 bytes) mod width"
        ),
        "fields": cats,
    }
    return numeric, categorical


def encode_records(layout: Mapping[str, Any], records: Sequence[Any]) -> np.ndarray:
    """Records -> the exported graph's input, using nothing but the sidecar ``layout``.

    What a serving program in another language implements; records must be
    valid (missing or non-numeric fields raise ``ValueError``, unlike the
    pipeline, which routes them to the dead-letter topic).
    """
    numeric, categorical = layout["numeric"], layout["categorical"]
    n_features = int(layout["input"]["shape"][1])
    out = np.zeros((len(records), n_features), dtype=np.float32)
    for r, record in enumerate(records):
        if numeric["record"] == "array":
            row = np.asarray(record, dtype=np.float64).reshape(-1)
            if row.size != numeric["width"]:
                raise ValueError(f"record {r}: {row.size} values, the layout has {numeric['width']}")
            out[r, : row.size] = row
        else:
            for f in numeric["fields"]:
                v = np.asarray(record[f["name"]], dtype=np.float64).reshape(-1)
                if v.size != f["width"]:
                    raise ValueError(f"record {r}: field {f['name']!r} has {v.size} values, "
                                     f"the layout has {f['width']}")
                out[r, f["offset"] : f["offset"] + f["width"]] = v
        for f in categorical["fields"]:
            key = category_key(f["name"], record[f["name"]])
            if categorical["encoding"] == "hash":
                out[r, f["offset"] + stable_bucket(key, f["width"])] = 1.0
                continue
            vocab = f["vocab"]
            if key in vocab:
                out[r, f["offset"] + vocab.index(key)] = 1.0
            elif len(vocab) >= f["max_categories"]:
                out[r, f["offset"] + f["max_categories"]] = 1.0
    return out


__all__ = ["KEY_RULE", "SCHEMA", "describe_features", "encode_records"]
