"""The ``reference`` backend: plain PyTorch, float32-accurate, runs anywhere.

It reproduces the original BLIP numerics (explicit softmax attention, ``nn.LayerNorm`` math,
erf GELU, ``F.cross_entropy`` with label smoothing) and is the oracle every fast backend is
tested against.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._dispatch import Backend, dispatch, register_backend

Tensor = torch.Tensor


def build_attention_bias(
    key_padding_mask: Optional[Tensor],
    causal: bool,
    lq: int,
    lk: int,
    device: torch.device,
) -> Optional[Tensor]:
    """Boolean "keep" mask broadcastable to (B, H, Lq, Lk), or None when nothing is masked.

    The causal mask is aligned to the bottom right: query ``i`` sits at absolute position
    ``lk - lq + i`` (the convention of a decoder with cached keys), and sees keys at or before it.
    """
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].to(torch.bool)
    if causal:
        qpos = torch.arange(lq, device=device)[:, None] + (lk - lq)
        kpos = torch.arange(lk, device=device)[None, :]
        causal_keep = (kpos <= qpos)[None, None]
        keep = causal_keep if keep is None else keep & causal_keep
    return keep


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    need_weights: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Softmax attention as the original BLIP computes it (explicit probabilities).

    Masked scores get the original's additive ``-10000`` bias, which in float32 gives exactly the
    same probabilities as removing the keys whenever a row keeps at least one key; rows that keep
    no key return zeros (the original never produces such rows).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = build_attention_bias(key_padding_mask, causal, q.shape[-2], k.shape[-2], q.device)
    if keep is not None:
        scores = scores + (~keep).to(scores.dtype) * -10000.0
    probs = scores.softmax(dim=-1)
    if keep is not None:
        any_kept = keep.any(dim=-1, keepdim=True)
        probs = probs * any_kept.to(probs.dtype)
    dropped = F.dropout(probs, p=dropout_p, training=True) if dropout_p > 0 else probs
    out = torch.matmul(dropped.to(v.dtype), v)
    return (out, probs) if need_weights else out


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``LayerNorm(dropout(x) + residual)`` over the last dimension (post-LN BERT's output)."""
    if dropout_p > 0:
        x = F.dropout(x, p=dropout_p, training=True)
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    y_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """``s = residual + x`` then ``LayerNorm(s)`` (cast to ``y_dtype``), as a pre-LN block writes it.

    The LayerNorm goes through the op dispatch, so ``auto`` still gives it the backend it would get
    on its own when no backend fuses the add (the sum is what the original computes either way)."""
    total = residual + x
    y = dispatch("layer_norm", total, weight, bias, eps)
    return total, (y if y_dtype is None or y.dtype == y_dtype else y.to(y_dtype))


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x + bias)`` with the exact (erf) GELU."""
    return F.gelu(x + bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``gelu(x @ weight.T + bias)``: the BERT intermediate / ViT fc1 layer."""
    return F.gelu(F.linear(x, weight, bias))


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` (materialises logits)."""
    logits = F.linear(hidden, weight, bias)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return loss.view(labels.shape) if reduction == "none" else loss


@torch.no_grad()
def momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> None:
    """``p_m = momentum * p_m + (1 - momentum) * p`` for every pair, as the original writes it."""
    for p_m, p in zip(params_m, params):
        p_m.copy_(p_m * momentum + p.detach() * (1.0 - momentum))


BACKEND = register_backend(
    Backend(
        "reference",
        ops={
            "attention": attention,
            "layer_norm": layer_norm,
            "add_layer_norm": add_layer_norm,
            "bias_gelu": bias_gelu,
            "linear_gelu": linear_gelu,
            "linear_cross_entropy": linear_cross_entropy,
            "momentum_update": momentum_update,
        },
    )
)
