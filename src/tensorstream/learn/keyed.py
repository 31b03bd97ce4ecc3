"""The learner's side of stateful features (:mod:`tensorstream.features.keyed`).

The per-key state is the stream's state, not something learned: it takes every
record the learner is given (in ``process``, ``predict`` and
``process_features`` alike), and labels as they become known: a record's own
label right after its features (labels in the record), or when it arrives
(delayed labels, :mod:`tensorstream.learn.delayed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tensorstream.features.transform import FeaturePipeline


def keyed_options(spec: Any) -> dict[str, Any]:
    """FeaturePipeline's keyword arguments for the stateful features of ``spec`` (a PipelineSpec)."""
    f = spec.features
    if not f.stateful:
        return {}
    if f.label_history and spec.label is None:
        raise ValueError("features.label_history needs the 'label' section (its classes give the columns)")
    lab = spec.label
    opts: dict[str, Any] = {"label_width": lab.n_outputs if lab is not None else 1,
                            "regression": lab is not None and lab.task == "regression"}
    if f.state.store == "disk":
        from tensorstream.features.keyed.disk import DiskStore
        from tensorstream.features.keyed.layout import row_dtype

        path = f.state.path or str(Path(spec.state_dir) / spec.name / "keyed-state")
        opts["keyed_store"] = DiskStore(row_dtype(f), path, cache_keys=f.state.cache_keys,
                                        index_ttl=f.state.ttl is not None, index_lru=f.state.max_keys is not None)
    return opts


def labels_of(y: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Per row: the label as a float (class index or target), NaN where the row has none."""
    return np.where(labelled, y.astype(np.float64), np.nan)


def keyed_snapshot(features: FeaturePipeline) -> dict[str, int]:
    """The stateful features' counters (keys held, evicted, expired; late records ...)."""
    if features.keyed is None:
        return {}
    snap = features.keyed.snapshot()
    return {"state_keys": snap["keys"], "state_keys_expired": snap["keys_expired"],
            "state_keys_evicted": snap["keys_evicted"], "late_records": snap["late_records"],
            "window_truncated": snap["window_truncated"], "key_mismatch": snap["key_mismatch"]}
