"""Momentum encoders and feature queues shared by BLIP_Pretrain and BLIP_Retrieval."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .. import ops

Tensor = torch.Tensor

__all__ = ["MomentumEncoders", "enqueue_"]


class MomentumEncoders:
    """Mixin over ``self.model_pairs`` (``[[online, momentum], ...]``) and ``self.momentum``, with
    the original's method names.

    ``param_updates_in_forward`` (default True): the forward clamps ``temp`` and runs the momentum
    update, as the original. blip_parallel's FSDP wrapper turns it off and calls
    :meth:`pre_forward_updates` before FSDP gathers any parameter (updates written to gathered
    copies would be lost); on sharded parameters each rank updates its own shards.
    """

    model_pairs: List[List[nn.Module]]
    momentum: float
    param_updates_in_forward: bool = True

    def _momentum_params(self) -> Tuple[List[Tensor], List[Tensor]]:
        online, momentum = [], []
        for model, model_m in self.model_pairs:
            online.extend(model.parameters())
            momentum.extend(model_m.parameters())
        return online, momentum

    @torch.no_grad()
    def copy_params(self) -> None:
        """Initialise the momentum encoders from the online ones and freeze them."""
        online, momentum = self._momentum_params()
        for p, p_m in zip(online, momentum):
            p_m.data.copy_(p.data)
            p_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """``m = momentum * m + (1 - momentum) * p`` for every pair, as one multi-tensor op."""
        online, momentum = self._momentum_params()
        if any(_is_dtensor(p) for p in online) or any(_is_dtensor(p) for p in momentum):
            online, momentum = _local_shards(online, momentum)
        ops.momentum_update(momentum, online, self.momentum)

    @torch.no_grad()
    def pre_forward_updates(self) -> None:
        """The in-place parameter updates every training forward makes: clamp ``temp`` to
        [0.001, 0.5] and the momentum update. They read and write parameters only, so running them
        before the forward (as FSDP needs) gives the same numbers as the original's order."""
        temp = getattr(self, "temp", None)
        if temp is not None:
            temp.clamp_(0.001, 0.5)
        self._momentum_update()


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _local_shards(online: List[Tensor], momentum: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """The local shards of sharded (FSDP, DTensor) online/momentum parameter pairs, which must be
    sharded alike so that each rank updates its own shard."""
    local_online, local_momentum = [], []
    for i, (p, p_m) in enumerate(zip(online, momentum)):
        if not (_is_dtensor(p) and _is_dtensor(p_m)) or p.placements != p_m.placements or p.shape != p_m.shape:
            raise RuntimeError(
                f"momentum update: online parameter #{i} ({type(p).__name__}, "
                f"{getattr(p, 'placements', 'not sharded')}) and its momentum copy ({type(p_m).__name__}, "
                f"{getattr(p_m, 'placements', 'not sharded')}) are not sharded alike; shard the online and "
                f"momentum encoders the same way (blip_fast.parallel.wrap_model(strategy='fsdp') does)")
        local_online.append(p.to_local())
        local_momentum.append(p_m.to_local())
    return local_online, local_momentum


@torch.no_grad()
def enqueue_(ptr: Tensor, queue_size: int, columns: Sequence[Tuple[Tensor, Tensor]]) -> None:
    """Write each ``(queue (D, Q), rows (N, D))`` pair's rows as queue columns from ``ptr`` on,
    wrapping around, then advance ``ptr`` ``(1,)`` by N; no host synchronisation."""
    batch_size = columns[0][1].shape[0]
    if batch_size > queue_size:
        raise ValueError(f"global batch {batch_size} exceeds queue_size {queue_size}: "
                         f"build the model with queue_size >= the global batch size")
    idx = (ptr + torch.arange(batch_size, device=ptr.device)) % queue_size
    for queue, rows in columns:
        queue.index_copy_(1, idx, rows.T.to(queue.dtype))
    ptr.copy_((ptr + batch_size) % queue_size)
