"""Process setup for the job, on :mod:`blip_fast.distributed` and :mod:`blip_fast.parallel`.

One process per device: under ``torchrun`` the process group starts from its environment (NCCL on
GPUs, Gloo on CPUs) and each rank takes ``cuda:LOCAL_RANK``. :func:`wrap_for_distributed` is the one
place that decides how the model is replicated.
"""
from __future__ import annotations

import datetime
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import distributed as bdist
from ..distributed import DistEnv, rng_state, seed_everything, set_rng_state
from ..parallel import unwrap_model, wrap_model

#: Where this process stands (rank, world size, local rank, device, backend).
Runtime = DistEnv

__all__ = ["Runtime", "init_runtime", "shutdown", "barrier", "wrap_for_distributed", "unwrap", "gather_objects",
           "rng_state", "set_rng_state", "seed_everything"]


def init_runtime(device: Optional[str] = None, timeout_minutes: float = 30.0) -> Runtime:
    """Start torch.distributed when launched by torchrun (else a single process) and pick the device:
    ``'cpu'``, ``'cuda'``, ``'cuda:N'`` or None / ``'auto'`` (CUDA when present)."""
    if device in (None, "", "auto"):
        device = None
    elif torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available in this process (torch {torch.__version__}); "
                           f"use --device cpu")
    return bdist.init_distributed(device, timeout=datetime.timedelta(minutes=timeout_minutes))


def shutdown(rt: Runtime) -> None:
    if rt.distributed:
        bdist.destroy_distributed()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        bdist.barrier()


def wrap_for_distributed(model: nn.Module, rt: Runtime, cuda_graph: bool = False) -> nn.Module:
    """The model as the training step calls it: DDP across ranks (rank 0's weights, momentum
    weights and queues given to every rank first; no per-step buffer broadcast, as the queues are
    filled identically on every rank), the model itself on one. ``cuda_graph``: DDP is built so
    that its gradient all-reduce can be captured with the step."""
    return wrap_model(model, "ddp" if rt.distributed else "none", rt.device, cuda_graph=cuda_graph)


def unwrap(model: nn.Module) -> nn.Module:
    return unwrap_model(model)


def gather_objects(obj: Any, rt: Runtime) -> List[Any]:
    """``[obj from rank 0, obj from rank 1, ...]`` on every rank."""
    if not rt.distributed:
        return [obj]
    out: List[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out
