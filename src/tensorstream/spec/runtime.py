"""How a pipeline runs: batching, checkpoints, model versions, dead letters, data-parallel ranks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tensorstream.spec.base import _Strict


class BatchSpec(_Strict):
    """Micro-batching: a batch closes at ``max_size`` records, or when nothing more is buffered
    (``adaptive``), or ``max_wait_ms`` after its first record.

    Adaptive (default): the loop only gathers a batch when the model is idle, so a batch is
    what arrived meanwhile: one record at a time at low load (latency close to the broker's),
    full batches under load (throughput). With per-record learning (``learn.learning``) the
    batch size never changes what is learned. ``adaptive: false`` waits up to ``max_wait_ms``
    for a batch to fill: reproducible mini-batches for ``learn.learning: mini_batch``.
    """

    #: records per batch at most (a larger batch is faster; with ``learn.learning: per_record``
    #: it learns the same)
    max_size: int = Field(default=32, ge=1, le=65_536)
    #: a batch closes this long after its first record at the latest
    max_wait_ms: float = Field(default=20.0, ge=0, le=60_000)
    #: a batch is what arrived while the model worked (see above); ``false``: wait up to
    #: ``max_wait_ms`` for ``max_size`` records
    adaptive: bool = True


class CheckpointSpec(_Strict):
    """Durable training state: what makes a crash lose nothing and train nothing twice.

    A checkpoint is written every ``every_records`` learned records or
    ``every_seconds``, on graceful stop and on partition revocation; source
    offsets are committed only after it is durable.
    """

    #: any fsspec URL; default ``<state_dir>/<pipeline name>/checkpoints``
    url: str | None = None
    #: records learned between checkpoints (or ``every_seconds``, whichever comes first).
    #: A crash replays at most this much; each checkpoint writes, fsyncs and commits,
    #: which at 5,000 cost ~5 % of a 20,000 rec/s pipeline (benchmarks/bench_streaming_tax.py)
    every_records: int = Field(default=50_000, ge=1)
    #: seconds between checkpoints (or ``every_records``, whichever comes first)
    every_seconds: float = Field(default=30.0, gt=0)
    #: the newest good checkpoints kept after each save (promoted ones are kept too)
    keep_last: int = Field(default=5, ge=1)


class VersionsSpec(_Strict):
    """Model versions announced on ``<pipeline>.models`` (signed with HMAC-SHA256)."""

    #: trainer: announce every checkpoint as a new version (``every_checkpoint``),
    #: or only on ``tensorstream models promote`` (``manual``)
    promote: Literal["every_checkpoint", "manual"] = "manual"
    #: inference: watch the models topic and hot-swap new versions between batches
    watch: bool = False
    #: env var holding the HMAC key (or ``<VAR>_FILE`` naming a file)
    key_env: str = "TENSORSTREAM_MODELS_HMAC_KEY"
    #: local experiments only: publish/accept unsigned announcements when no key is set
    allow_unsigned: bool = False


class DeadLetterSpec(_Strict):
    """Bad records go to ``<pipeline>.dlq``; too many of them stop the pipeline loudly."""

    #: stop when more than this fraction of records is bad (a broken upstream must
    #: not be silently drained into the DLQ); 1.0 = never stop
    max_rate: float = Field(default=0.5, gt=0, le=1)
    #: ... measured over at least this many records
    min_records: int = Field(default=200, ge=1)


class DistributedSpec(_Strict):
    """Data-parallel online training on N ranks, with the framework's own engine.

    Every rank runs the same spec; rank r reads the source partitions p with
    ``p % world_size == r`` and all ranks step in lock-step, all-reducing the
    gradients (weighted by sample counts); rank 0 writes the checkpoints. With a
    world size of 1 (the default) nothing of this applies. ``TENSORSTREAM_RANK``,
    ``TENSORSTREAM_WORLD_SIZE``, ``TENSORSTREAM_MASTER_ADDR``,
    ``TENSORSTREAM_MASTER_PORT`` and ``TENSORSTREAM_WORKERS`` (comma-separated)
    override the fields of the same name. See docs/distributed.md.
    """

    #: ``torch`` (torch.distributed + DistributedDataParallel), ``tensorflow``
    #: (tf.distribute.MultiWorkerMirroredStrategy), ``none`` (always one process);
    #: unset: the backend's own engine
    engine: Literal["none", "torch", "tensorflow"] | None = None
    #: ranks in the job; unset: $TENSORSTREAM_WORLD_SIZE, $WORLD_SIZE (torchrun), else 1
    world_size: int | None = Field(default=None, ge=1, le=65_536)
    #: this process' rank; unset: $TENSORSTREAM_RANK, $RANK (torchrun), else 0
    rank: int | None = Field(default=None, ge=0)
    #: torch: rank 0's rendezvous address and port; unset: $MASTER_ADDR / $MASTER_PORT, else 127.0.0.1:29500
    master_addr: str | None = None
    #: torch: rank 0's rendezvous port (see ``master_addr``)
    master_port: int | None = Field(default=None, ge=1, le=65_535)
    #: tensorflow: ``host:port`` of every rank's collective server, in rank order (TF_CONFIG's
    #: cluster); unset: $TF_CONFIG when set, else master_addr with ports master_port + rank
    workers: list[str] | None = None
    #: torch process group: ``gloo`` (CPU tensors; the torch backend runs on CPU), ``nccl`` (CUDA)
    process_group: Literal["auto", "gloo", "nccl"] = "auto"
    #: a collective waits this long for a missing rank, then the run fails (restart every
    #: rank: they resume from rank 0's last checkpoint)
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        if self.workers is not None:
            if self.world_size is not None and len(self.workers) != self.world_size:
                raise ValueError(f"workers lists {len(self.workers)} addresses for world_size {self.world_size}")
            bad = [w for w in self.workers if not w.rpartition(":")[2].isdigit()]
            if bad:
                raise ValueError(f"workers must be host:port, got {bad}")
        return self
