"""Data-parallel training on ``torch.distributed`` (launched by ``torchrun``).

``cryofield train`` started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) runs one process per rank:

* **Images.** Every epoch the ranks draw the same shuffled order (the seed is shared)
  and cut it into the same global batches of ``batch_size`` images; rank ``r`` takes the
  ``r``-th of ``world`` near-equal parts of every global batch (:func:`batch_share`), so
  every particle is seen exactly once per epoch, by exactly one rank, and the ranks take
  the same number of steps.
* **Field.** Replicated: the step's loss is scaled by ``world * n_rank / n_global`` so
  that the mean over the ranks of their gradients (the all-reduce of
  :class:`torch.nn.parallel.DistributedDataParallel`) is the gradient of the global
  batch's mean loss: the same update as one process with the same global batch.
* **Pose and latent tables.** Every rank holds all rows, but optimises only the rows of
  its own images (each row's sparse Adam moments included). At the end of an epoch the
  rows are merged (:func:`merge_rows`: a sum over ranks of each rank's own rows), so
  every rank starts the next epoch from the same tables, and the checkpoint is the one a
  single process writes.
* **Sufficient statistics** of the whole data set (the back-projection accumulators of
  the half-map refinement and the consensus map, per-image losses) are summed over the
  ranks (:func:`all_reduce_sum`).
* **Computed on every rank.** The latent start (variability analysis, 3-D
  classification), the half-map refinement epochs and the per-epoch checks read all
  images on every rank (rank 0's result is broadcast, so the ranks cannot drift apart);
  they take the time of a single process.
* **One voice.** Rank 0 takes the run's lock, logs, shows progress and writes every file
  (atomically, as a single process does) while the others wait at a barrier. An error
  on any rank ends that process with its one-line message, and ``torchrun`` then stops
  the other ranks (its default on a worker failure).

The backends are NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DistEnv",
    "all_reduce_sum",
    "barrier",
    "batch_share",
    "broadcast_",
    "current",
    "data_parallel",
    "global_batches",
    "init_from_env",
    "launched_by_torchrun",
    "merge_rows",
    "shutdown",
]


@dataclass(frozen=True)
class DistEnv:
    """The process's place in a data-parallel run (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes."""
        return self.rank == 0


_ENV = DistEnv()


def current() -> DistEnv:
    """The run's :class:`DistEnv` (set by :func:`init_from_env`)."""
    return _ENV


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment is that of a ``torchrun`` worker with more than one rank."""
    env = os.environ if environ is None else environ
    return "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> DistEnv:
    """Join the process group that ``torchrun`` set up (a no-op for a single process).

    ``device`` is the training device (``'cpu'``, ``'cuda'`` or ``'cuda:N'``): NCCL with
    CUDA (each rank on GPU ``LOCAL_RANK``), gloo otherwise.
    """
    global _ENV
    if not launched_by_torchrun():
        _ENV = DistEnv()
        return _ENV
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _ENV = DistEnv(dist.get_rank(), dist.get_world_size(), local, backend)
    return _ENV


def shutdown() -> None:
    """Leave the process group (if any)."""
    global _ENV
    if _ENV.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _ENV = DistEnv()


def batch_share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s part of a global batch of ``n`` images: ``world`` contiguous parts
    whose sizes differ by at most one (the first ``n % world`` parts one larger)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def global_batches(perm: np.ndarray, batch_size: int, world: int = 1) -> list[np.ndarray]:
    """The epoch's global batches: ``perm`` cut into runs of ``batch_size`` images, each
    sorted (reads in file order). With several ranks, a last batch smaller than ``world``
    joins the one before, so that every rank has an image in every batch (the ranks take
    the same number of steps)."""
    out = [np.sort(perm[b0 : b0 + batch_size]) for b0 in range(0, len(perm), batch_size)]
    if world > 1 and len(out) > 1 and len(out[-1]) < world:
        out[-2:] = [np.sort(np.concatenate(out[-2:]))]
    return out


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` whose
    all-reduce SUMS the ranks' gradients (DDP's default averages them): each rank scales
    its loss by its share of the global batch, so the sum is the gradient of the global
    batch's mean loss. Rank 0's parameters are broadcast to the others here."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    def sum_hook(_, bucket):  # type: ignore[no-untyped-def]  (DDP checks the annotations)
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ids = [device.index if device.index is not None else _ENV.local_rank]
    ddp = DistributedDataParallel(module, device_ids=ids if device.type == "cuda" else None)
    ddp.register_comm_hook(None, sum_hook)
    return ddp


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank ``src``'s (in place; no-op for one process)."""
    if _ENV.enabled:
        import torch.distributed as dist

        if _ENV.backend == "gloo" and x.device.type != "cpu":
            y = x.cpu()
            dist.broadcast(y, src)
            x.copy_(y)
        else:
            dist.broadcast(x, src)
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place (a no-op for one process); returns ``x``."""
    if _ENV.enabled:
        import torch.distributed as dist

        if _ENV.backend == "gloo" and x.device.type != "cpu":
            y = x.cpu()
            dist.all_reduce(y)
            x.copy_(y)
        else:
            dist.all_reduce(x)
    return x


def merge_rows(x: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """Rows of a per-image table merged from the ranks that own them.

    Parameters
    ----------
    x
        ``(N, ...)`` this rank's copy of the table.
    owned
        ``(N,)`` bool, the rows this rank updated (the ranks own disjoint rows; a row no
        rank owned keeps its value, which is the same on every rank).

    Returns
    -------
    torch.Tensor
        ``(N, ...)`` the owner's value of every row (a new tensor; ``x`` is unchanged).
    """
    if not _ENV.enabled:
        return x.clone()
    m = owned.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))
    nobody = owned.to(x.device, torch.float32).clone()
    all_reduce_sum(nobody)
    mine = torch.where(m, x, torch.zeros_like(x))
    all_reduce_sum(mine)
    keep = (nobody == 0).reshape(m.shape)
    return torch.where(keep, x, mine)


def barrier() -> None:
    """Wait for all ranks (a no-op for one process)."""
    if _ENV.enabled:
        import torch.distributed as dist

        dist.barrier()
