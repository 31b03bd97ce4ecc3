"""Where this process sits in a data-parallel job: resolved from the spec and the environment."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from tensorstream.spec import PipelineSpec


log = logging.getLogger(__name__)


ENV = "TENSORSTREAM_"
#: the backend registered for each engine (tensorstream.backends)
ENGINE_BACKENDS = {"torch": "torch-ddp", "tensorflow": "tensorflow-multiworker"}


class DistributedError(RuntimeError):
    """The ranks disagree (checkpoints, layouts) or the job cannot be set up."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job (resolved from the spec and the environment)."""

    engine: str
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    #: tensorflow: every rank's ``host:port``, in rank order
    workers: tuple[str, ...]
    process_group: str
    timeout_s: float

    @property
    def backend_name(self) -> str:
        return ENGINE_BACKENDS[self.engine]

    def connect_options(self, threads: int | None) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "master_addr": self.master_addr,
                "master_port": self.master_port, "workers": list(self.workers),
                "process_group": self.process_group, "timeout_s": self.timeout_s, "threads": threads}


def _env_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise DistributedError(f"${name} must be an integer, got {env[name]!r}") from None
    return None


def resolve(spec: PipelineSpec, env: Mapping[str, str] | None = None) -> DistContext | None:
    """This process' place in a distributed job, or None to train in one process.

    ``TENSORSTREAM_<FIELD>`` variables override the spec's ``distributed`` fields;
    then come the launchers' conventions (torchrun's ``RANK``/``WORLD_SIZE``/
    ``MASTER_ADDR``/``MASTER_PORT``, tf.distribute's ``TF_CONFIG``).

    >>> from tensorstream.spec import PipelineSpec
    >>> spec = PipelineSpec.model_validate({"source": {"topic": "t"}, "mode": "train",
    ...     "features": {"numeric": ["*"]}, "label": {"field": "y", "classes": [0, 1]}})
    >>> resolve(spec, {}) is None          # one process unless a world size > 1 is given
    True
    >>> ctx = resolve(spec, {"TENSORSTREAM_WORLD_SIZE": "2", "TENSORSTREAM_RANK": "1"})
    >>> ctx.engine, ctx.rank, ctx.world_size, ctx.backend_name, ctx.workers
    ('torch', 1, 2, 'torch-ddp', ('127.0.0.1:29500', '127.0.0.1:29501'))
    """
    env = os.environ if env is None else env
    d = spec.distributed
    engine = d.engine or spec.backend
    if engine == "none":
        return None
    tf_config: dict[str, Any] = {}
    if engine == "tensorflow" and env.get("TF_CONFIG", "").strip():
        try:
            tf_config = orjson.loads(env["TF_CONFIG"])
        except orjson.JSONDecodeError as e:
            raise DistributedError(f"$TF_CONFIG is not JSON: {e}") from None
    env_workers = [w.strip() for w in env.get(ENV + "WORKERS", "").split(",") if w.strip()]
    tf_workers = list(tf_config.get("cluster", {}).get("worker", []))
    workers = env_workers or d.workers or tf_workers or None
    world = _env_int(env, ENV + "WORLD_SIZE")
    if world is None:
        world = d.world_size or _env_int(env, "WORLD_SIZE") or (len(workers) if workers else None) or 1
    if world <= 1:
        return None
    rank = _env_int(env, ENV + "RANK")
    if rank is None:
        rank = d.rank if d.rank is not None else _env_int(env, "RANK")
    if rank is None and tf_config.get("task", {}).get("type") == "worker":
        rank = int(tf_config["task"]["index"])
    rank = rank or 0
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank} is outside world size {world}")
    addr = env.get(ENV + "MASTER_ADDR") or d.master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    port = _env_int(env, ENV + "MASTER_PORT") or d.master_port or _env_int(env, "MASTER_PORT") or 29500
    if workers is None:
        workers = [f"{addr}:{port + i}" for i in range(world)]
    if len(workers) != world:
        raise DistributedError(f"{len(workers)} worker addresses for world size {world}")
    if spec.backend != engine:
        raise DistributedError(f"distributed engine {engine!r} cannot train a {spec.backend} model")
    _check_supported(spec)
    return DistContext(engine, rank, world, addr, port, tuple(workers), d.process_group, d.timeout_s)


def _check_supported(spec: PipelineSpec) -> None:
    """What data-parallel training cannot do (yet): refuse it before anything starts."""
    if not spec.trains:
        raise DistributedError("distributed training needs mode 'train' or 'train+infer'")
    if spec.label is not None and spec.label.task == "classification" and not spec.label.classes:
        # Each rank would number newly seen classes in its own order: output slots would disagree.
        raise DistributedError("distributed training needs a fixed class set: list label.classes")
    if getattr(spec, "labels", None) is not None:
        raise DistributedError("distributed training reads labels from the record; a 'labels' topic is not "
                               "supported with world_size > 1")
    if getattr(spec.features, "stateful", False):
        # Per-key state lives in one process; ranks would each hold part of every key's history.
        raise DistributedError("stateful features (windows, lags, label_history, time_features) are not "
                               "supported with world_size > 1: train them in one process")
    drift = getattr(spec, "drift", None)
    if drift is not None and getattr(drift, "policy", "none") != "none":
        # A policy acts on one rank's error stream: the ranks would change their models differently.
        raise DistributedError("drift.policy must be 'none' with world_size > 1 (detection alone is fine)")


def owned_partitions(n_partitions: int, rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` consumes: ``p % world_size == rank``.

    >>> owned_partitions(5, 0, 2), owned_partitions(5, 1, 2), owned_partitions(1, 1, 2)
    ([0, 2, 4], [1, 3], [])
    """
    return [p for p in range(n_partitions) if p % world_size == rank]
