"""Small helpers for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node N`` starts N copies of a program and tells each who it is through
environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`init_from_env` reads them and joins the process group once: the
``nccl`` backend when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), else
``gloo`` on the CPU; ``LEANCONV_DIST_BACKEND`` overrides the choice. Without those variables,
or with ``WORLD_SIZE=1``, nothing is initialised and every helper here is a no-op, so the
same code runs unchanged in one plain process.

:mod:`leanconv.train` builds on these: it wraps the model in ``DistributedDataParallel``,
sums metric counts across processes with :func:`all_reduce_sum` and lets only the main
process (rank 0, :func:`is_main`) write files.
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from leanconv.errors import LeanconvError

__all__ = [
    # process group
    "init_from_env", "cleanup", "is_initialized", "is_distributed",
    # who am I
    "rank", "world_size", "is_main", "device",
    # collectives
    "barrier", "all_reduce_sum", "all_equal", "broadcast_buffers",
    # models
    "sync_batchnorm_view", "state_checksum",
]

_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """True when this process has joined a process group (of any size)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when this process is one of two or more in a process group."""
    return is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True in the process that writes files and prints: rank 0, or the only process."""
    return rank() == 0


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise LeanconvError(f"environment variable {name}={text!r} is not a whole number; launch with torchrun") from None


def _backend() -> str:
    backend = os.environ.get("LEANCONV_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise LeanconvError(f"LEANCONV_DIST_BACKEND={backend!r} is not supported; use gloo or nccl")
    if backend == "nccl" and not torch.cuda.is_available():
        raise LeanconvError("the nccl backend needs CUDA GPUs; use LEANCONV_DIST_BACKEND=gloo on the CPU")
    return backend


def init_from_env() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; ``(rank, world_size)``.

    Idempotent: a second call returns the group already joined. Returns ``(0, 1)`` and
    initialises nothing when ``WORLD_SIZE`` is unset or 1 (a plain, single-process run).
    """
    if is_initialized():
        return rank(), world_size()
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return 0, 1
    missing = [name for name in _LAUNCH_VARS if name not in os.environ]
    if missing:
        raise LeanconvError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun")
    backend = _backend()
    if backend == "nccl":
        local = _env_int("LOCAL_RANK")
        if local >= torch.cuda.device_count():
            raise LeanconvError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); "
                                "start at most one process per GPU")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this process computes: its GPU under ``nccl``, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (no-op when not initialised)."""
    if is_initialized():
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes, in float64; unchanged when alone."""
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_equal(value: int) -> bool:
    """True when every process passes the same integer ``value``."""
    if not is_initialized():
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [max, -min]
    return int(t[0]) == -int(t[1])


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) into every process's ``module``."""
    if is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def sync_batchnorm_view(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree with ``SyncBatchNorm`` in place of BatchNorm layers that
    shares every parameter and buffer with ``model``.

    Training the view trains ``model`` (the optimiser may hold ``model.parameters()``), while
    ``model`` keeps its own layer types, so checkpoints record no structural change.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    return nn.SyncBatchNorm.convert_sync_batchnorm(view)


def state_checksum(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s state dict (params and
    buffers), independent of device and memory format: equal iff the weights are bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
