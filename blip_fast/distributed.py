"""torch.distributed helpers: feature all-gather for the ITC queues (identity on one process)."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` ``(B, ...)`` from every rank along dim 0 -> ``(world * B, ...)``.

    No gradient flows back. Without an initialised process group this is the identity (the
    original requires one even for a single process).
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    out = tensor.new_empty((world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.world_size = get_world_size()
        ctx.rank = get_rank()
        ctx.batch = tensor.shape[0]
        out = tensor.new_empty((ctx.world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """All-gather along dim 0 that keeps gradients (each rank's loss reaches every rank's input)."""
    if get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)
