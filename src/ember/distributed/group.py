"""The process group a model is split over, and how a rank's share of each dimension is computed."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import DistributedError

# seconds a collective may wait for the other ranks before failing (EMBER_TP_TIMEOUT overrides)
DEFAULT_TIMEOUT = 600.0
Ranges = list  # [(start, stop), ...] along one dimension


def timeout_seconds() -> float:
    raw = os.environ.get("EMBER_TP_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"EMBER_TP_TIMEOUT must be a positive number of seconds, got {raw!r:.40}")
    return value


@dataclass(frozen=True)
class AttentionSplit:
    """One rank's heads: its head counts and the rows of q (and o's columns) and of k/v it holds."""

    heads: int
    kv_heads: int
    q: Ranges
    kv: Ranges


class TensorParallel:
    """A rank's view of the tensor-parallel group: its rank, the world size, and the collectives the
    parallel layers use, each turning a failure (a rank that stopped, a timeout) into one
    `DistributedError`."""

    def __init__(self, rank: int, world: int, group=None, timeout: float = DEFAULT_TIMEOUT):
        if not 0 <= rank < world:
            raise DistributedError(f"rank {rank} outside a group of {world}")
        self.rank, self.world, self.group, self.timeout = rank, world, group, timeout

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, world={self.world})"

    # ---- how dimensions split ---------------------------------------------------------------------
    def even(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of a dimension of `n` that must split evenly (heads, widths)."""
        if n % self.world:
            raise DistributedError(f"{what} ({n}) does not divide over {self.world} tensor-parallel ranks; "
                                   f"use a tp that divides it")
        step = n // self.world
        return self.rank * step, (self.rank + 1) * step

    def padded(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of `n` split in parts of ceil(n / world) (the last may be short):
        for vocabularies, which rarely divide evenly."""
        step = -(-n // self.world)
        if step * (self.world - 1) >= n:
            raise DistributedError(f"{what} ({n}) is too small to split over {self.world} ranks")
        return min(self.rank * step, n), min((self.rank + 1) * step, n)

    def attention(self, heads: int, kv_heads: int, head_dim: int) -> AttentionSplit:
        """Whole query heads per rank; key/value heads divided, or, when there are fewer than the
        ranks, the one each rank's query heads attend to, replicated."""
        h0, h1 = self.even(heads, "num_attention_heads")
        if kv_heads >= self.world:
            k0, k1 = self.even(kv_heads, "num_key_value_heads")
        else:
            if self.world % kv_heads:
                raise DistributedError(f"{kv_heads} key/value heads cannot be shared out over {self.world} ranks "
                                       f"(the ranks must be a multiple of them)")
            k0 = self.rank // (self.world // kv_heads)
            k1 = k0 + 1
        return AttentionSplit(h1 - h0, k1 - k0, [(h0 * head_dim, h1 * head_dim)], [(k0 * head_dim, k1 * head_dim)])

    # ---- collectives ----------------------------------------------------------------------------
    def _failed(self, what: str, e: BaseException) -> DistributedError:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return DistributedError(f"tensor-parallel rank {self.rank}/{self.world}: {what} failed — another rank "
                                f"stopped or did not answer within {self.timeout:g}s ({msg})")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        import torch.distributed as dist

        try:
            dist.all_reduce(t, group=self.group)
        except (RuntimeError, ValueError) as e:  # DistBackendError is a RuntimeError
            raise self._failed("an all-reduce", e) from None
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `t` (same shape on each) concatenated along `dim`, in rank order."""
        import torch.distributed as dist

        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        try:
            dist.all_gather(parts, t, group=self.group)
        except (RuntimeError, ValueError) as e:
            raise self._failed("an all-gather", e) from None
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable), on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except (RuntimeError, ValueError) as e:
            raise self._failed("a broadcast from rank 0", e) from None
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        try:
            dist.barrier(group=self.group)
        except (RuntimeError, ValueError) as e:
            raise self._failed("a barrier", e) from None


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def init_tensor_parallel(tp: int, device: torch.device) -> TensorParallel:
    """The group for `tp` ranks: the caller's default process group, or one initialised from torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): NCCL for CUDA, gloo for CPU, with a
    timeout on every collective so that a rank that stops fails the others instead of hanging them."""
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this PyTorch is built without torch.distributed; tensor parallelism needs it")
    timeout = timeout_seconds()
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistributedError(f"tp={tp} needs {tp} processes in a process group, and none is set up "
                                   f"({', '.join(missing)} unset): start them with `torchrun --nproc-per-node {tp} "
                                   f"script.py` (or `ember run|chat|bench MODEL --tp {tp}`), or call "
                                   f"torch.distributed.init_process_group first")
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"could not set up the {backend} process group for tp={tp}: "
                                   f"{str(e).strip()[:300]}") from None
        atexit.register(_destroy)  # ours to close: an open group aborts the process at exit
    world = dist.get_world_size()
    if world != tp:
        raise DistributedError(f"tp={tp}, but the process group has {world} ranks: tensor parallelism spans "
                               f"the whole group (start {tp} processes)")
    return TensorParallel(dist.get_rank(), world, None, timeout)
