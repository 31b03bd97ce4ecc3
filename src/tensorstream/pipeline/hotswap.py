"""Model versions in a running pipeline: a trainer announces, an inference worker hot-swaps.

- A trainer with ``versions.promote: every_checkpoint`` announces each durable
  checkpoint on ``<pipeline>.models`` (signed, see ``checkpoint/versions.py``).
- An inference worker with ``versions.watch: true`` reads that topic: at start it
  serves the newest version whose weights verify (a version whose file is gone
  or altered is skipped, with a warning, in favour of the one before it), then
  swaps in each newly announced version between batches. A version that does
  not verify never replaces a good one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from safetensors.numpy import load as st_load

from tensorstream.checkpoint import CheckpointError
from tensorstream.checkpoint.versions import (
    ModelAnnouncement,
    ModelRegistry,
    ModelVersionError,
    ModelWatcher,
    resolve_key,
)
from tensorstream.kafka import KafkaConfig
from tensorstream.spec import PipelineSpec

log = logging.getLogger(__name__)


class NoModelError(RuntimeError):
    """An inference worker has no usable model (no weights, no version that verifies)."""


def env_key(var: str) -> bytes | None:
    """The HMAC key from ``$var`` or the file named by ``$var_FILE`` (None: resolve_key's default)."""
    if var in os.environ:
        return os.environ[var].encode()
    if var + "_FILE" in os.environ:
        with open(os.environ[var + "_FILE"], "rb") as f:
            return f.read().strip()
    return None


class ModelVersions:
    """The models-topic side of one pipeline (announce, or watch and swap).

    ``load`` is called with a verified state (named arrays) to put in service;
    it raises when the state does not fit the model (then the version is refused).
    """

    def __init__(self, spec: PipelineSpec, kafka: KafkaConfig, load: Callable[[dict[str, Any]], None],
                 initial_version: str, obs: Any = None) -> None:
        self.spec = spec
        self.kafka = kafka
        self._load = load
        self.obs = obs
        self.model_version = initial_version
        self.versions_seen: list[str] = []
        self.rejected = 0
        self.registry: ModelRegistry | None = None
        self.watcher: ModelWatcher | None = None

    def open(self, *, have_model: bool) -> None:
        """Connect to the models topic as the spec says; a watcher takes the current version."""
        v = self.spec.versions
        needs_watch = not self.spec.trains and v.watch
        needs_publish = self.spec.trains and v.promote == "every_checkpoint"
        if not (needs_watch or needs_publish):
            return
        key = resolve_key(env_key(v.key_env), allow_unsigned=v.allow_unsigned)
        if needs_publish:
            self.registry = ModelRegistry(self.kafka, self.spec.name, key, allow_unsigned=v.allow_unsigned)
        if needs_watch:
            self.watcher = ModelWatcher(self.kafka, self.spec.name, key, allow_unsigned=v.allow_unsigned)
            self.watcher.catch_up(timeout=30)
            self._take_newest_usable(have_model)

    def _take_newest_usable(self, have_model: bool) -> None:
        """Serve the newest version in the lineage whose weights verify and load."""
        assert self.watcher is not None
        problems: list[str] = []
        for ann in reversed(self.watcher.lineage):
            if ann.version == self.model_version:
                return
            reason = self._swap(ann)
            if reason is None:
                if problems:
                    log.warning("serving version %s: newer version(s) unusable: %s", ann.version, "; ".join(problems))
                return
            problems.append(f"{ann.version}: {reason}")
        if not have_model:
            detail = ("; ".join(problems) if problems
                      else f"{self.spec.name}.models announces no version")
            raise NoModelError(f"no usable model: {detail}, and model.weights is not set")
        if problems:
            log.warning("keeping model.weights: no announced version is usable (%s)", "; ".join(problems))

    def announce(self, info: Any) -> None:
        """A trainer's durable checkpoint becomes a model version (failures are logged, not fatal)."""
        if self.registry is None:
            return
        try:
            ann = self.registry.publish(info.id, info.state_url, metrics=info.metrics, backend=self.spec.backend,
                                        spec_hash=self.spec.spec_hash())
            if self.obs is not None:
                self.obs.model_version_changed(ann.version, reason="promote")
        except (ModelVersionError, CheckpointError) as e:  # the checkpoint stands; the announcement can be redone
            log.error("could not announce checkpoint %s as a model version: %s", info.id, e)
            return
        return ann  # type: ignore[return-value]

    def maybe_swap(self) -> None:
        """Between batches: take a newly announced version (verified) without stopping."""
        if self.watcher is None:
            return
        ann = self.watcher.poll()
        if ann is not None and ann.version != self.model_version:
            self._swap(ann)

    def _swap(self, ann: ModelAnnouncement) -> str | None:
        """Load ``ann``'s verified weights; None on success, else why not (and keep the current model)."""
        assert self.watcher is not None
        try:
            data = self.watcher.fetch_verified(ann)  # sha256 checked against the signed announcement
            self._load(st_load(data))  # the verified bytes themselves: no second read of the URL
        except Exception as e:  # a bad version never replaces a good one
            self.rejected += 1
            log.error("rejected model version %s: %s", ann.version, e)
            return f"{type(e).__name__}: {e}"
        log.info("hot-swapped model version %s -> %s", self.model_version, ann.version)
        self.model_version = ann.version
        self.versions_seen.append(ann.version)
        if self.obs is not None:
            self.obs.model_version_changed(ann.version, reason="swap")
        return None

    def close(self) -> None:
        for c in (self.watcher, self.registry):
            if c is not None:
                c.close()
