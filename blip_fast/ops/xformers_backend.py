"""The ``xformers`` backend: attention through ``xformers.ops.memory_efficient_attention``.

Only ``attention``; every other op falls through to the next backend under ``auto``.

* Layout: q, k, v ``(B, H, L, D)`` are passed as ``(B, L, H, D)`` views (xformers' BMHK), copied
  only when their strides are not 16-byte aligned; the output is a ``(B, H, Lq, D)`` view of
  ``(B, Lq, H, D)`` memory, as the triton kernel's.
* Masks as xformers' attention-bias classes, never a dense tensor where one can be avoided:
  causal -> ``LowerTriangularFromBottomRightMask``; key padding -> the kept keys packed as
  varlen sequences (``BlockDiagonalMask``), causal + right padding -> at most two varlen calls
  (``BlockDiagonalCausalFromBottomRightMask`` and ``BlockDiagonalMask``, see
  :mod:`blip_fast.ops._varlen`). Causal with a padding mask that is not a prefix of each row
  takes an additive bias tensor (``-10000`` on masked scores, as the reference). Queries that see
  no key are zeros.
* xformers picks the kernel: FlashAttention-2 (torch's build) in half precision, its CUTLASS
  kernel in float32 (up to sm90), FlashAttention-3 when the ``flash_attn_3`` package is there.
  Calls no installed xformers kernel can run are declined with xformers' own reasons.
* Dropout: xformers' kernels draw from torch's CUDA generator (``torch.manual_seed`` reproduces
  a run); the masks differ from the reference's and the triton kernel's.
* ``torch.compile``: the op runs eagerly (a graph break), since the varlen plan needs the key
  counts on the host; ``auto`` leaves compiled and CUDA-graph-captured calls to other backends.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import _varlen
from ._dispatch import Backend
from .measured import auto_attention_check

Tensor = torch.Tensor

INSTALL_HINT = "pip install xformers (a wheel built for the installed torch)"
#: Additive bias on masked scores in the dense-bias path (the reference's value).
MASKED_SCORE = -10000.0


def load() -> Backend:
    try:
        from xformers.ops import fmha  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return Backend("xformers", unavailable_reason=f"xformers is not importable ({exc!r}); fix: {INSTALL_HINT}")
    if not torch.cuda.is_available():
        return Backend("xformers", unavailable_reason="no CUDA device (xformers' attention kernels run on CUDA)")
    broken = _cpp_library_problem()
    if broken:
        return Backend("xformers", unavailable_reason=f"{broken}; fix: {INSTALL_HINT}")
    return Backend("xformers", ops={"attention": attention}, checks={"attention": why_not_attention},
                   auto_checks={"attention": _auto_attention})


def _cpp_library_problem() -> Optional[str]:
    """Why xformers' compiled extension did not load (then none of its CUDA kernels, not even the
    ones it wraps from torch, is offered), or None. Seen with the 0.0.35 wheel (built for torch
    2.10) under torch 2.11."""
    import xformers
    if getattr(xformers, "_has_cpp_library", True):
        return None
    from xformers import _cpp_lib
    exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    built = getattr(exc, "build_info", None)
    detail = (f"built for torch {built.torch_version} / CUDA {built.cuda_version}, this is torch "
              f"{torch.__version__}" if built is not None else repr(exc))
    return f"xformers {getattr(xformers, '__version__', '?')} is installed but its C++/CUDA extension does not load ({detail})"


def _fmha():
    from xformers.ops import fmha
    return fmha


# ----------------------------------------------------------------------------------- the op

def _dense_kernel(p: float, scale: float):
    def kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        fmha = _fmha()
        bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
        return fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scale)
    return kernel


def _varlen_kernel(p: float, scale: float):
    def kernel(q: Tensor, k: Tensor, v: Tensor, seg: _varlen.Segment) -> Tensor:
        fmha = _fmha()
        key = ("xformers_bias", q.device)
        if key not in seg.cache:  # built once per plan: the layers of a forward pass share it
            kind = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if seg.causal else fmha.attn_bias.BlockDiagonalMask
            seg.cache[key] = kind.from_seqlens(list(seg.q_lens), list(seg.k_lens), device=q.device)
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=seg.cache[key], p=p, scale=scale)[0]
    return kernel


def _attend_with_bias_tensor(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, causal: bool,
                             p: float, scale: float) -> Tensor:
    """Any mask as an additive ``(B, H, Lq, Lk)`` bias (one row of it per batch, expanded over heads)."""
    from .reference import build_attention_bias
    batch, lq, heads, _ = q.shape
    lk = k.shape[1]
    keep = build_attention_bias(key_padding_mask, causal, lq, lk, q.device).expand(batch, 1, lq, lk)
    # xformers wants the bias rows 16-byte aligned: slice a wider allocation.
    bias = q.new_zeros(batch, 1, lq, -(-lk // 8) * 8)[..., :lk]
    bias.masked_fill_(~keep, MASKED_SCORE)
    out = _fmha().memory_efficient_attention(q, k, v, attn_bias=bias.expand(batch, heads, lq, lk), p=p, scale=scale)
    any_kept = keep.any(-1).transpose(1, 2)[..., None]  # (B, Lq, 1, 1)
    return torch.where(any_kept, out, 0)


@torch.compiler.disable
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
    """:func:`blip_fast.ops.attention` on xformers' kernels (``need_weights`` must be False).

    Returns ``(B, H, Lq, D)`` in the input dtype, stored as ``(B, Lq, H, D)``; queries with no
    kept key are zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    p = float(dropout_p)
    try:
        return _varlen.attend(q, k, v, key_padding_mask, bool(causal), _dense_kernel(p, scale),
                              _varlen_kernel(p, scale))
    except _varlen.CausalMaskNotPrefix:  # a bias tensor expresses any mask
        qb, kb, vb = (_varlen.to_bmhk(t) for t in (q, k, v))
        return _attend_with_bias_tensor(qb, kb, vb, key_padding_mask, bool(causal), p, scale).transpose(1, 2)


# --------------------------------------------------------------------------------- the checks

def why_not_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    need_weights: bool = False,
) -> Optional[str]:
    """None when :func:`attention` can run this call, else the reason it cannot."""
    reason = _varlen.check_call(q, k, v, key_padding_mask, dropout_p, need_weights, "xformers")
    if reason is None:
        reason = _varlen.host_sync_forbidden(key_padding_mask)
    if reason is None and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        kinds = ("varlen_causal", "varlen") if key_padding_mask is not None and causal else \
            ("varlen",) if key_padding_mask is not None else ("causal",) if causal else ("none",)
        for kind in kinds:
            reason = _kernel_support(q.device, q.dtype, q.shape[-1], kind, float(dropout_p) > 0, training)
            if reason is not None:
                break
    return reason


@functools.lru_cache(maxsize=None)
def _kernel_support(device: torch.device, dtype: torch.dtype, head_dim: int, kind: str, dropout: bool,
                    training: bool) -> Optional[str]:
    """Ask xformers' own dispatcher whether an installed kernel (forward, and backward when
    training) takes this dtype, head dim, mask kind and dropout on this device: None, or its
    reasons. Costs nothing on the GPU (tiny tensors, no launch)."""
    fmha = _fmha()
    try:
        from xformers.ops.fmha.common import Inputs
        from xformers.ops.fmha.dispatch import _dispatch_bw, _dispatch_fw
    except ImportError:  # another xformers layout: let the call itself report
        return None
    q = torch.zeros(1, 16, 1, head_dim, device=device, dtype=dtype)
    bias = {
        "none": None,
        "causal": fmha.attn_bias.LowerTriangularFromBottomRightMask(),
        "varlen": fmha.attn_bias.BlockDiagonalMask.from_seqlens([8, 8], [8, 8], device=device),
        "varlen_causal": fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens([8, 8], [8, 8], device=device),
    }[kind]
    inp = Inputs(query=q, key=q, value=q, attn_bias=bias, p=0.1 if dropout else 0.0)
    try:
        op = _dispatch_fw(inp, training)
        if training:
            packed = op.VARLEN_LSE_PACKED if kind.startswith("varlen") else None
            _dispatch_bw(inp, varlen_lse_packed=packed)
    except NotImplementedError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        return (f"no installed xformers kernel runs {dtype} head dim {head_dim} ({kind} mask"
                f"{', dropout' if dropout else ''}{', backward' if training else ''}) on "
                f"{torch.cuda.get_device_name(device)}: {detail[:600]}")
    return None


def _auto_attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None,
                    need_weights=False) -> Optional[str]:
    return auto_attention_check("xformers", q, k, v, key_padding_mask, causal, dropout_p, scale)


def kernels_used(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                 causal: bool = False, training: bool = True) -> Tuple[str, ...]:
    """Names of the xformers operators the call would use (for reports), e.g. ``('fa2F@...',)``."""
    fmha = _fmha()
    from xformers.ops.fmha.common import Inputs
    from xformers.ops.fmha.dispatch import _dispatch_fw
    qb, kb, vb = (_varlen.to_bmhk(t) for t in (q, k, v))
    bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal and key_padding_mask is None else None
    if key_padding_mask is not None:
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([q.shape[2]], [k.shape[2]], device=q.device)
        qb, kb, vb = qb[:1], kb[:1], vb[:1]
    return (_dispatch_fw(Inputs(query=qb, key=kb, value=vb, attn_bias=bias), training).NAME,)
