"""What the data-parallel wrappers share: strategy names, mixed-precision names, unwrapping."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import is_dist_avail_and_initialized

STRATEGIES = ("none", "ddp", "fsdp")
MIXED_PRECISION = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_dtype(mixed_precision: Optional[str]) -> Optional[torch.dtype]:
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {sorted(k for k in MIXED_PRECISION if k)} or None, "
                         f"got {mixed_precision!r}")
    return MIXED_PRECISION[mixed_precision]


def autocast(device: Union[str, torch.device], mixed_precision: Optional[str]) -> ContextManager:
    """``torch.autocast`` for ``mixed_precision`` ('bf16' / 'fp16') on ``device``'s type, or a
    no-op for None / 'fp32'. Run the forward (and loss) under it with every strategy: DDP keeps
    float32 parameters and relies on it; FSDP computes in bf16 parameters and still needs it where
    bf16 activations meet float32 buffers (the ITC queues)."""
    dtype = mixed_precision_dtype(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The BLIP model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def strategy_of(model: nn.Module) -> str:
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    return "fsdp" if is_fsdp(model) else "none"


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (no-op when not distributed)."""
    if not is_dist_avail_and_initialized():
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)
