"""Gradient accumulation and clipping that work the same for plain, DDP and FSDP2 models."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ._common import is_fsdp

Tensor = torch.Tensor


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run a micro-step's backward inside this; ``enabled=False`` for all but the last micro-step
    of an accumulated step, so that gradients are averaged across ranks once per optimizer step.

    DDP: ``model.no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` (gradients accumulate
    unreduced, unsharded, until the syncing micro-step). A plain model: nothing to do.
    """
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


@torch.no_grad()
def clip_grad_norm_(parameters: Union[nn.Module, Iterable[Tensor]], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Union[bool, None] = None) -> Tensor:
    """Clip the total gradient norm to ``max_norm``; returns the norm before clipping (a plain
    float32 tensor, equal on every rank).

    Like ``torch.nn.utils.clip_grad_norm_``, for any mix of plain gradients (single process, DDP,
    FSDP's replicated scalar parameters) and sharded DTensor gradients (FSDP2): the sharded ones'
    norm is reduced over the ranks, the plain ones count once. ``parameters``: a module or an
    iterable of parameters.
    """
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    norms: List[Tensor] = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, norm_type, error_if_nonfinite, foreach)
        norms.append(norm.full_tensor() if _is_dtensor(norm) else norm)
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain, norm_type, error_if_nonfinite, foreach))
    device = norms[0].device
    total = torch.nn.utils.get_total_norm([n.to(device) for n in norms], norm_type, error_if_nonfinite)
    clip_coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    groups: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for g in grads:
        local = g.to_local() if _is_dtensor(g) else g
        groups.setdefault((local.device, local.dtype), []).append(local)
    for (dev, dtype), locals_ in groups.items():
        torch._foreach_mul_(locals_, clip_coef.to(dev, dtype))
    return total.float()
