"""An :class:`~tensorstream.learn.learner.OnlineLearner` as named arrays, and back.

Everything a checkpoint needs so that a restored learner continues exactly as
the original would have: ``backend/<backend key>`` (weights + optimizer, only
once built), ``features/...`` (with ``features/keyed/...``: the per-key state of stateful
features, or the disk store's epoch), ``labels/classes``, ``target/...`` (the
regression target's scaler, when the target is standardised), ``metrics/...``,
``replay/...`` (buffer and sampler; empty when replay is off), ``drift/...``,
``policy/...``, ``join/...`` (delayed labels), ``learner/n_learned``,
``learner/counters`` (int64: seen, bad, unlabelled) and ``learner/meta`` (JSON:
built, n_features, n_outputs, task, generation, target_scaled).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tensorstream.features.scaler import RunningStandardizer
from tensorstream.features.state import from_json_array, json_array, prefixed, unprefixed

log = logging.getLogger(__name__)


def learner_state(learner: Any) -> dict[str, np.ndarray]:
    """``learner``'s whole state (see the module docstring)."""
    state: dict[str, np.ndarray] = {}
    if learner.built:
        state.update(prefixed("backend", learner.backend.get_state()))
    state.update(prefixed("features", learner.features.state_dict()))
    if learner.labels is not None:
        state.update(prefixed("labels", learner.labels.state_dict()))
    if learner.target is not None:
        state.update(prefixed("target", learner.target.state_dict()))
    if learner.metrics is not None:
        state.update(prefixed("metrics", learner.metrics.state_dict()))
    state.update(prefixed("replay", learner.replay.state_dict()))
    state.update(prefixed("drift", learner.drift.state_dict()))
    state.update(prefixed("policy", learner.policy.state_dict()))
    if learner.join is not None:
        state.update(prefixed("join", learner.join.state_dict()))
    state["learner/n_learned"] = np.array([learner.n_learned], dtype=np.int64)
    state["learner/counters"] = np.array([learner.n_seen, learner.n_bad, learner.n_unlabelled], dtype=np.int64)
    spec = learner.spec
    state["learner/meta"] = json_array(
        {
            "built": learner.built,
            "n_features": learner.features.n_features if learner.built else None,
            "n_outputs": spec.label.n_outputs if spec.label else None,
            "task": learner.task,
            "generation": learner.generation,
            "target_scaled": learner.target is not None,
        }
    )
    return state


def load_learner_state(learner: Any, state: dict[str, np.ndarray]) -> None:
    """Restore :func:`learner_state` into ``learner``."""
    meta = from_json_array(state["learner/meta"])
    learner.features.load_state_dict(unprefixed("features", state))
    if learner.labels is not None:
        learner.labels.load_state_dict(unprefixed("labels", state))
    elif "labels/classes" in state:
        learner._loaded_classes = list(from_json_array(state["labels/classes"]))
    learner._task = meta["task"]
    # The model learned the target as it was scaled then: the checkpoint decides, not the spec.
    if meta.get("target_scaled", False):
        if learner.spec.label is not None and learner.target is None:
            log.warning("the checkpoint's model learned a standardised target; label.standardize is off: "
                        "the checkpoint's scaling is kept")
        learner.target = RunningStandardizer(1)
        learner.target.load_state_dict(unprefixed("target", state))
    elif learner.target is not None:
        log.warning("the checkpoint's model learned the raw target; label.standardize is on: the raw target is kept")
        learner.target = None
    if learner.metrics is not None and any(k.startswith("metrics/") for k in state):
        learner.metrics.load_state_dict(unprefixed("metrics", state))
    learner.replay.load_state_dict(unprefixed("replay", state))
    learner.n_learned = int(np.asarray(state["learner/n_learned"]).reshape(-1)[0])
    learner.n_seen, learner.n_bad, learner.n_unlabelled = (int(v) for v in np.asarray(state["learner/counters"]))
    learner.built = False
    spec = learner.spec
    if meta["built"]:
        if meta["n_features"] != learner.features.n_features:
            raise ValueError(
                f"checkpoint model has {meta['n_features']} inputs, the features give {learner.features.n_features}"
            )
        n_outputs = meta["n_outputs"]
        if spec.label is not None and n_outputs != spec.label.n_outputs:
            raise ValueError(f"checkpoint model has {n_outputs} outputs, the spec gives {spec.label.n_outputs}")
        learner.backend.build(spec.model, meta["n_features"], n_outputs, meta["task"])
        learner.backend.set_state(unprefixed("backend", state))
        learner.built = True
    learner.generation = int(meta.get("generation", 0))
    learner.drift.load_state_dict(unprefixed("drift", state))
    if learner.join is not None:
        learner.join.load_state_dict(unprefixed("join", state))
    learner.policy.load_state_dict(learner, unprefixed("policy", state))
    learner.policy.on_restore(learner)
