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
    the original's method names."""

    model_pairs: List[List[nn.Module]]
    momentum: float

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
        ops.momentum_update(momentum, online, self.momentum)


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
