"""The ``sdpa`` backend: attention through ``torch.nn.functional.scaled_dot_product_attention``.

PyTorch picks its own kernel underneath (flash, cuDNN, memory-efficient or math) from the
inputs. Only attention lives here; the other ops fall through to the next backend under ``auto``.
"""
from __future__ import annotations

from typing import Optional

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


BACKEND = register_backend(
    Backend("sdpa", ops={"attention": attention}, checks={"attention": _check_attention})
)
