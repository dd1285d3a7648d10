"""Fused ``gelu(x + bias)`` (exact erf GELU), forward and backward, and ``linear_gelu``.

The forward reads ``x`` once and writes the activation; the backward recomputes ``x + bias``,
writes ``dx`` and accumulates the bias gradient per program over a strided set of row tiles; the
per-program partial sums are reduced afterwards in a fixed order (deterministic, no atomics).
``linear_gelu`` runs the matmul through torch (cuBLAS) and this kernel as its epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2, sm_count

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_M = 8  # 8 x 256 tiles over 4 warps: 16 elements a thread, no spills in the backward
_MAX_BLOCK_N = 256
# Programs per SM, over all column blocks, of the backward's persistent grid.
BWD_PROGRAMS_PER_SM = 4

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_fwd_kernel(X, BIAS, Y, M, N, stride_x, stride_y,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # 64-bit row base, 32-bit offsets inside the tile: fewer registers than 64-bit per element.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    local = tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (local[:, None] < (M - row0).to(tl.int32)) & (cols[None, :] < N)
    z = tl.load(X + row0 * stride_x + local[:, None] * stride_x + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    tl.store(Y + row0 * stride_y + local[:, None] * stride_y + cols[None, :],
             y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(X, BIAS, DY, DX, DB_PART, M, N, tiles_per_program,
                     stride_x, stride_dy, stride_dx,
                     HAS_BIAS: tl.constexpr, COMPUTE_DB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``(j, i)``: column block ``j``, row tiles ``i, i + programs, ...``."""
    pid_m = tl.program_id(1)
    step = tl.num_programs(1) * BLOCK_M
    local = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    for _ in range(0, tiles_per_program):
        mask = (local[:, None] < (M - row0).to(tl.int32)) & col_mask[None, :]
        z = tl.load(X + row0 * stride_x + local[:, None] * stride_x + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += bias[None, :]
        dy = tl.load(DY + row0 * stride_dy + local[:, None] * stride_dy + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        dx = dy * (cdf + z * pdf)
        tl.store(DX + row0 * stride_dx + local[:, None] * stride_dx + cols[None, :],
                 dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DB:
            db_acc += dx  # masked lanes hold dy == 0; reduced over rows once, at the end
        row0 += step
    if COMPUTE_DB:
        tl.store(DB_PART + pid_m * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


def _as_rows(t: Tensor) -> Tensor:
    """``(..., N)`` -> ``(M, N)`` with unit stride along N, copying only when it must."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _block_n(n: int) -> int:
    return min(next_power_of_2(n), _MAX_BLOCK_N)


class BiasGeluFn(torch.autograd.Function):
    """``gelu(x + bias)``; ``bias`` may be None (plain GELU)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        out_dtype = x.dtype if bias is None else torch.result_type(x, bias)
        x2 = _as_rows(x)
        m, n = x2.shape
        b = bias.contiguous() if bias is not None else None
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        if m > 0 and n > 0:
            block_n = _block_n(n)
            grid = (cdiv(m, _BLOCK_M), cdiv(n, block_n))
            _gelu_fwd_kernel[grid](x2, b if b is not None else x2, y, m, n, x2.stride(0), y.stride(0),
                                   HAS_BIAS=b is not None, BLOCK_M=_BLOCK_M, BLOCK_N=block_n,
                                   num_warps=4)
        ctx.save_for_backward(x2, b)
        ctx.meta = (x.shape, x.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, b = ctx.saved_tensors
        x_shape, x_dtype = ctx.meta
        need_db = ctx.needs_input_grad[1] and b is not None
        dy2 = _as_rows(dy)
        m, n = x2.shape
        dx = torch.empty((m, n), dtype=x_dtype, device=x2.device)
        block_n = _block_n(n)
        col_blocks = cdiv(n, block_n) if n > 0 else 1
        row_programs = max(1, min(cdiv(m, _BLOCK_M),
                                  BWD_PROGRAMS_PER_SM * sm_count(x2.device) // col_blocks))
        db_part = (torch.empty((row_programs, n), dtype=torch.float32, device=x2.device)
                   if need_db else None)
        if m > 0 and n > 0:
            _gelu_bwd_kernel[(col_blocks, row_programs)](
                x2, b if b is not None else x2, dy2, dx, db_part if need_db else dx,
                m, n, cdiv(cdiv(m, _BLOCK_M), row_programs),
                x2.stride(0), dy2.stride(0), dx.stride(0),
                HAS_BIAS=b is not None, COMPUTE_DB=need_db, BLOCK_M=_BLOCK_M, BLOCK_N=block_n,
                num_warps=4,
            )
        db = db_part.sum(0).to(b.dtype) if need_db else None
        return dx.view(x_shape), db


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x + bias)`` with the exact (erf) GELU.

    Args:
        x: ``(..., N)`` float32, bfloat16 or float16; any strides.
        bias: ``(N,)``.

    Returns:
        ``(..., N)`` in ``torch.result_type(x, bias)``, as ``F.gelu(x + bias)`` gives.
    """
    return BiasGeluFn.apply(x, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``gelu(x @ weight.T + bias)``: cuBLAS matmul, bias add and GELU fused in one kernel.

    Args:
        x: ``(..., K)``; weight: ``(N, K)``; bias: ``(N,)`` or None. Same floating dtype.

    Returns:
        ``(..., N)``.
    """
    return BiasGeluFn.apply(F.linear(x, weight), bias)


def why_not_bias_gelu(x: Tensor, bias: Tensor) -> Optional[str]:
    """None when the kernel can run this call, else the reason."""
    if x.dtype not in _DTYPES or bias.dtype not in _DTYPES:
        return f"dtypes {x.dtype}, {bias.dtype} (supported: float32, bfloat16, float16)"
    if x.dim() == 0 or tuple(bias.shape) != (x.shape[-1],):
        return f"bias shape {tuple(bias.shape)} does not match x's last dimension"
    return None


def why_not_linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """None when the kernel can run this call, else the reason."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} (supported: float32, bfloat16, float16)"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "x, weight and bias must share one dtype"
    if weight.dim() != 2 or x.dim() == 0 or weight.shape[1] != x.shape[-1]:
        return f"weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"bias shape {tuple(bias.shape)} is not ({weight.shape[0]},)"
    return None
