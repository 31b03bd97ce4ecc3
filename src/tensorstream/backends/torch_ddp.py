"""PyTorch data-parallel backend: ``torch.distributed`` + ``DistributedDataParallel``.

The :class:`TorchBackend` with the gradient step made collective. One process
per rank; ``connect`` joins the process group (gloo: the torch backend keeps its
tensors on the CPU) before anything is built, and ``build`` wraps the module in
DDP, which broadcasts rank 0's parameters and all-reduces the gradients in
``backward``.

Uneven ranks. Every step each rank all-reduces its number of training rows N_r
(asynchronously: it travels while forward/backward run) and runs forward/backward
on its summed loss, an empty rank on a zero-row batch (all-zero gradients: it
still joins DDP's all-reduce). DDP averages the gradients over the W ranks; each
rank then scales them by ``W / N`` (N = the sum of the N_r) and steps:

    (W/N) * (1/W) * sum_r grad(sum of rank r's losses) = grad(mean loss over the N rows)

the gradient of the union batch, the same on every rank. When N is 0 nobody
steps (so the optimizers stay identical).

The coordination (who calls what, when) is framework-free and lives in
``tensorstream.pipeline.distributed``; this module only adds the collectives
(``all_reduce`` of numpy arrays, the synchronised ``train_step``/``empty_step``).
"""

from __future__ import annotations

import datetime
import inspect
import logging
import math

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from tensorstream.backends import init as common
from tensorstream.backends.torch import TorchBackend, flushing_denormals
from tensorstream.spec import ModelSpec

log = logging.getLogger(__name__)


class TorchDDPBackend(TorchBackend):
    """:class:`TorchBackend` whose train steps are all-reduced over a process group."""

    name = "torch"  # same model, same state names: its checkpoints load into TorchBackend
    engine = "torch"
    #: steps are collective (every rank in lock-step): no per-record loop, no per-row retry
    sequential = False

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        #: synchronised train steps taken (empty ones included); equal on every rank
        self.train_steps = 0
        self._ddp: DistributedDataParallel | None = None

    # -- the process group --------------------------------------------------
    def connect(self, *, rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float,
                process_group: str = "auto", threads: int | None = None, **_: object) -> None:
        """Join the job (blocks until every rank has joined, up to ``timeout_s``)."""
        if threads is not None:
            torch.set_num_threads(threads)
        pg = "gloo" if process_group == "auto" else process_group
        if pg == "nccl":
            # NCCL reduces CUDA tensors only; this backend keeps model and batches on the CPU.
            raise ValueError("distributed.process_group 'nccl' needs CUDA tensors, but the torch backend runs on "
                             "the CPU: use 'gloo' (or 'auto')")
        if not dist.is_available() or not dist.is_gloo_available():
            raise RuntimeError("this torch build has no torch.distributed gloo support")
        if not dist.is_initialized():
            dist.init_process_group(pg, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                    world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        log.info("torch.distributed: rank %d of %d (%s, rendezvous %s:%d)", self.rank, self.world_size, pg,
                 master_addr, master_port)

    def all_reduce(self, a: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks (int64 or float64 arrays; every rank gets the result)."""
        t = torch.from_numpy(np.array(a, copy=True))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.numpy()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- model ---------------------------------------------------------------
    def build(self, model: ModelSpec, n_features: int, n_outputs: int, task: str) -> None:
        super().build(model, n_features, n_outputs, task)
        # Collective: DDP checks the shapes and broadcasts rank 0's parameters (and buffers).
        # No buffer sync in forward: the ranks run forward unevenly (predict, empty steps).
        params = inspect.signature(DistributedDataParallel).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        self._ddp = DistributedDataParallel(self._module, **sync)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = common.check_batch(x, y, self._n_features, self._n_outputs, self._task)
        with flushing_denormals():
            return self._step(x, y)

    def train_guarded(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        # A refused step is refused on every rank (the gradients are all-reduced), with no per-row retry.
        return self.train_step(x, y), None

    def empty_step(self) -> None:
        """Join this step's all-reduces with no rows (a rank that has nothing to learn)."""
        with flushing_denormals():
            self._step(None, None)

    def _step(self, x: np.ndarray | None, y: np.ndarray | None) -> float:
        n = 0 if x is None else len(x)
        count = torch.tensor([n], dtype=torch.int64)
        counted = dist.all_reduce(count, op=dist.ReduceOp.SUM, async_op=True)  # overlaps forward/backward
        self.train_steps += 1
        assert self._ddp is not None
        self._set_training(True)
        if n:
            assert x is not None and y is not None
            out = self._ddp(torch.from_numpy(x))
            target = torch.from_numpy(y)
            summed = (F.cross_entropy(out, target, reduction="sum") if self._loss == "cross_entropy"
                      else F.mse_loss(out[:, 0], target, reduction="sum"))
        else:
            # A zero-row forward: every parameter gets an all-zero gradient, so this rank's
            # DDP reducer still takes part in the gradient all-reduce.
            out = self._ddp(torch.zeros(0, self._n_features))
            summed = out.sum() * 0.0
        self._opt.zero_grad(set_to_none=True)
        summed.backward()  # DDP: gradients averaged over the ranks
        counted.wait()
        total = int(count[0])
        if total == 0:
            return math.nan  # no rank has rows: no rank steps
        with torch.no_grad():
            for _, p, _ in self._params:
                if p.grad is not None:
                    p.grad.mul_(self.world_size / total)
        # Weight decay and the finiteness guard are the optimizer's; the gradients are the same
        # on every rank here, so every rank takes (or refuses) the step alike.
        self._opt.step()
        return float(summed.detach()) / n if n else math.nan
