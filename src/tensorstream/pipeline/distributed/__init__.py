"""Data-parallel online training: N ranks, one model, the frameworks' own engines.

Framework-free coordination; the collectives themselves come from the backend
(``backends/torch_ddp.py``: torch.distributed + DDP, ``backends/tensorflow_multiworker.py``:
tf.distribute MultiWorkerMirroredStrategy), which exposes them as numpy in,
numpy out (``all_reduce``: an element-wise sum over the ranks).

- **Who reads what.** Rank r of W consumes the source partitions p with
  ``p % W == r``, explicitly assigned (:class:`AssignedSource`): no consumer-group
  rebalancing between ranks. A rank starts each partition from the offset in the
  checkpoint, else the group's committed offset, else ``auto_offset_reset``.
- **Lock-step.** Every step each rank gathers a micro-batch (waiting at most the
  batch's ``max_wait_ms``, and not at all while the stream is flowing elsewhere),
  then the ranks all-reduce a small int64 vector: record counts, end-of-data,
  stop and deadline flags. A total of 0 means everybody polls again. Otherwise
  each rank test-then-trains its batch: features learn from the union batch
  (:class:`SyncedFeatures`), and the backend's train step weights the gradient
  all-reduce by sample counts. A rank with nothing joins the step with zero rows
  and zero gradients, so a slow or idle partition never stalls the others.
- **Stopping.** The ranks stop together: when every rank reports end-of-data
  (``until_end``), when any rank was asked to stop (SIGTERM), at rank 0's
  deadline, or when the global record count reaches ``max_records``.
- **Checkpoints.** Every rank flushes its outputs, then the ranks all-reduce the
  offsets (int64, one slot per partition: each rank fills the partitions it owns)
  and the counters and metrics; rank 0 writes the checkpoint (the model state is
  identical everywhere) and commits the offsets of *all* partitions. A
  checkpoint from W ranks restores on any number of ranks, one included: the
  offsets cover every partition.

If a rank dies, the others fail at their next collective (at the latest after
``distributed.timeout_s``); restart all ranks and they resume from rank 0's last
checkpoint, the same exactly-once contract as a single trainer.
"""

from tensorstream.pipeline.distributed.collective import (
    Collective,
    SyncedFeatures,
    allgather_bytes,
    gather_rows,
)
from tensorstream.pipeline.distributed.context import (
    ENGINE_BACKENDS,
    DistContext,
    DistributedError,
    owned_partitions,
    resolve,
)
from tensorstream.pipeline.distributed.launch import free_ports, launch_ranks
from tensorstream.pipeline.distributed.trainer import AssignedSource, DistributedTrainer

__all__ = [
    "ENGINE_BACKENDS", "AssignedSource", "Collective", "DistContext", "DistributedError", "DistributedTrainer",
    "SyncedFeatures", "allgather_bytes", "free_ports", "gather_rows", "launch_ranks", "owned_partitions", "resolve",
]
