"""Functional ops behind every hot path of the models, with pluggable backends.

The call is the same whatever the backend; select one with :func:`use_backend` (a context
manager), :func:`set_backend` (process default), the ``BLIP_FAST_BACKEND`` environment variable,
or a model's ``backend`` attribute. ``"auto"`` (the default) picks the fastest backend that
supports each call and falls back to ``reference``.

Shapes: ``q, k, v`` are ``(batch, heads, length, head_dim)`` as in torch SDPA;
``key_padding_mask`` is boolean ``(batch, Lk)``, True where the key is kept.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import reference as _reference  # registers the reference backend
from . import sdpa as _sdpa  # registers the sdpa backend
from ._dispatch import (
    AUTO,
    AUTO_ORDER,
    ENV_VAR,
    Backend,
    BackendUnavailableError,
    available_backends,
    dispatch,
    get_backend,
    known_backends,
    load_backends,
    register_backend,
    register_lazy_backend,
    resolve,
    set_backend,
    use_backend,
)
from . import flash_attn_backend as _flash_attn_backend
from . import triton_backend as _triton_backend
from . import xformers_backend as _xformers_backend
from . import cuda_backend as _cuda_backend

register_lazy_backend("triton", _triton_backend.load)
register_lazy_backend("flash_attn", _flash_attn_backend.load)
register_lazy_backend("xformers", _xformers_backend.load)
register_lazy_backend("cuda", _cuda_backend.load)

Tensor = torch.Tensor

__all__ = [
    "attention", "layer_norm", "add_layer_norm", "bias_gelu", "linear_gelu", "linear_cross_entropy",
    "momentum_update",
    "use_backend", "set_backend", "get_backend", "available_backends", "known_backends", "load_backends", "resolve",
    "register_backend", "register_lazy_backend", "Backend", "BackendUnavailableError",
    "AUTO", "AUTO_ORDER", "ENV_VAR",
]


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
    """Scaled dot-product attention ``softmax(q k^T * scale + mask) v``.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``; float32, bfloat16 or float16. Strided
            views (e.g. slices of a fused qkv projection) are accepted.
        key_padding_mask: optional bool ``(B, Lk)``, True where the key is kept.
        causal: mask keys after the query; aligned bottom-right when ``Lq != Lk`` (cached decoding).
        dropout_p: dropout on the probabilities (pass 0 in eval mode).
        scale: score scale, default ``D ** -0.5``.
        need_weights: also return the probabilities ``(B, H, Lq, Lk)`` (before dropout), as
            Grad-CAM and ``output_attentions`` need. Only backends that materialise them accept it.

    Returns:
        ``(B, H, Lq, D)`` in the dtype of ``v`` (and the probabilities when ``need_weights``).
        Rows whose keys are all masked are zeros.
    """
    return dispatch("attention", q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                    dropout_p=dropout_p, scale=scale, need_weights=need_weights)


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``LayerNorm(dropout(x) + residual)`` over the last dimension; ``x``: ``(..., N)``.

    ``eps`` as the model gives it (1e-6 in the ViT, 1e-12 in BERT). ``residual`` and
    ``dropout_p`` are optional (post-LN BERT uses both).
    """
    return dispatch("layer_norm", x, weight, bias, eps, residual=residual, dropout_p=dropout_p)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """A pre-LN block's residual add and the next LayerNorm: ``s = residual + x``,
    ``y = LayerNorm(s)``; ``x``, ``residual``: ``(..., N)``, same shape.

    Returns ``(s, y)``: ``s`` in the promoted dtype of the two (the residual stream), ``y`` in the
    autocast dtype when autocast is on for ``x``'s device (the value the matmul that reads it would
    cast it to, so the numbers are those of ``x + residual`` then ``LayerNorm`` then the matmul's
    cast), else in ``s``'s dtype.
    """
    device_type = x.device.type
    y_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return dispatch("add_layer_norm", x, residual, weight, bias, eps, y_dtype=y_dtype)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x + bias)`` with the erf GELU; ``x``: ``(..., N)``, ``bias``: ``(N,)``."""
    return dispatch("bias_gelu", x, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``gelu(x @ weight.T + bias)`` (erf GELU): ``x`` ``(..., K)``, ``weight`` ``(N, K)``."""
    return dispatch("linear_gelu", x, weight, bias)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``labels``.

    Args:
        hidden: ``(..., H)``; weight: ``(V, H)``; bias: ``(V,)`` or None; labels: ``(...)`` int64.
        reduction: ``'mean'`` (over non-ignored positions), ``'sum'`` or ``'none'`` (shape of
            ``labels``, zeros where ignored).

    Fast backends never materialise the full float32 logits.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return dispatch("linear_cross_entropy", hidden, weight, bias, labels,
                    label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)


def momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> None:
    """In place, for every pair: ``p_m = momentum * p_m + (1 - momentum) * p`` (no autograd)."""
    dispatch("momentum_update", params_m, params, momentum)
