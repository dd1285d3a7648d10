"""The ``sdpa`` backend: PyTorch's own fused kernels.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks flash,
cuDNN, memory-efficient or math underneath); the momentum update is two multi-tensor
(``torch._foreach_*``) launches per device and dtype instead of three kernels per parameter.
The other ops fall through to the next backend under ``auto``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._dispatch import Backend, register_backend
from .reference import build_attention_bias

Tensor = torch.Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    need_weights: bool = False,
) -> Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and (not causal or lq == lk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    keep = build_attention_bias(key_padding_mask, causal, lq, lk, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    # Rows with no kept key come back as NaN from some SDPA kernels; the contract is zeros.
    any_kept = keep.any(dim=-1, keepdim=True)
    return torch.where(any_kept, out, out.new_zeros(()))


def _check_attention(q: Tensor, k: Tensor, v: Tensor, *args, need_weights: bool = False, **kwargs) -> Optional[str]:
    if need_weights:
        return "sdpa does not return attention probabilities (need_weights=True)"
    return None


def momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> None:
    """``p_m = momentum * p_m + (1 - momentum) * p`` with multi-tensor kernels (in place)."""
    params_m = list(params_m)
    with torch.no_grad():
        torch._foreach_mul_(params_m, momentum)
        torch._foreach_add_(params_m, [p.detach() for p in params], alpha=1.0 - momentum)


def _check_momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> Optional[str]:
    if len(params_m) != len(params):
        return f"{len(params_m)} momentum parameters but {len(params)} online ones"
    for p_m, p in zip(params_m, params):
        if p_m.shape != p.shape or p_m.dtype != p.dtype or p_m.device != p.device:
            return (f"momentum/online parameter mismatch: {tuple(p_m.shape)} {p_m.dtype} {p_m.device} vs "
                    f"{tuple(p.shape)} {p.dtype} {p.device}")
        if type(p_m.data) is not torch.Tensor or type(p.data) is not torch.Tensor:
            return "tensor subclasses (e.g. sharded DTensor parameters) take the per-tensor path"
    return None


BACKEND = register_backend(
    Backend("sdpa", ops={"attention": attention, "momentum_update": momentum_update},
            checks={"attention": _check_attention, "momentum_update": _check_momentum_update})
)
