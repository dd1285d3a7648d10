"""Fused ``gelu(x + bias)`` (exact erf GELU), forward and backward, and ``linear_gelu``.

The forward reads ``x`` once and writes the activation; the backward recomputes ``x + bias``,
writes ``dx`` and accumulates the bias gradient per program over a strided set of row tiles; the
per-program partial sums are reduced afterwards in a fixed order (deterministic, no atomics).
``linear_gelu`` runs the matmul through torch (cuBLAS) and this kernel as its epilogue.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (
    KernelLauncher,
    LaunchPlan,
    align16,
    cdiv,
    compiling,
    interpreting,
    next_power_of_2,
    sm_count,
    sum_partials,
    sum_partials_plan,
)

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


@triton.jit(do_not_specialize=["tiles_per_program"])
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


# ============================================================================================
# Host side
# ============================================================================================

_INTERPRET = interpreting()  # fixed at import, as triton's @jit decided it for the kernels
_FWD = KernelLauncher(_gelu_fwd_kernel)
_BWD = KernelLauncher(_gelu_bwd_kernel)
_PLANS: dict = {}
_MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget every launch plan (after changing the module's launch parameters)."""
    _PLANS.clear()


def _remember(key: tuple, plan: LaunchPlan) -> None:
    if not _INTERPRET:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan


def _rows_view(t: Tensor, n: int) -> Tuple[Tensor, int]:
    """``t`` as rows of ``n`` with unit stride along them, and the row stride (no call at all
    for a contiguous tensor, a copy only when the last dimension is strided)."""
    if t.is_contiguous():
        return t, n
    if t.stride(-1) != 1:
        t = t.contiguous()
    t = t.reshape(-1, n)
    return t, t.stride(0)


def _block_n(n: int) -> int:
    return min(next_power_of_2(n), _MAX_BLOCK_N)


def _forward(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``gelu(x + bias)``, shape of x, contiguous, in ``result_type(x, bias)``."""
    n = x.shape[-1]
    out_dtype = x.dtype if bias is None or bias.dtype == x.dtype else torch.result_type(x, bias)
    x2, stride_x = _rows_view(x, n)
    m = x.numel() // n if n else 0
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    key = ("fwd", x.get_device(), x.dtype, out_dtype, m, n, stride_x, align16(x2),
           None if bias is None else (bias.dtype, align16(bias)))
    plan = _PLANS.get(key)
    if plan is None:
        block_n = _block_n(n)
        plan = LaunchPlan((cdiv(m, _BLOCK_M), cdiv(n, block_n)),
                          dict(HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=block_n), 4)
        _remember(key, plan)
    _FWD(plan, (x2, x2 if bias is None else bias, y, m, n, stride_x, n))
    return y


def _backward(dy: Tensor, x: Tensor, bias: Optional[Tensor], need_db: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """dx (shape and dtype of x) and, if asked and ``bias`` is given, dbias (bias's dtype)."""
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    x2, stride_x = _rows_view(x, n)
    dy2, stride_dy = _rows_view(dy, n)
    need_db = need_db and bias is not None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        return dx, (torch.zeros_like(bias) if need_db else None)
    key = ("bwd", x.get_device(), x.dtype, dy2.dtype, m, n, stride_x, stride_dy, align16(x2),
           align16(dy2), None if bias is None else (bias.dtype, align16(bias)), need_db,
           BWD_PROGRAMS_PER_SM)
    plan = _PLANS.get(key)
    if plan is None:
        block_n = _block_n(n)
        col_blocks = cdiv(n, block_n)
        row_programs = max(1, min(cdiv(m, _BLOCK_M), BWD_PROGRAMS_PER_SM * sm_count(x.device) // col_blocks))
        plan = LaunchPlan((col_blocks, row_programs),
                          dict(HAS_BIAS=bias is not None, COMPUTE_DB=need_db, BLOCK_M=_BLOCK_M, BLOCK_N=block_n),
                          4, extra=(row_programs, cdiv(cdiv(m, _BLOCK_M), row_programs),
                                    sum_partials_plan(n, False, True)))
        _remember(key, plan)
    row_programs, tiles_per_program, sum_plan = plan.extra
    db_part = torch.empty((row_programs, n), dtype=torch.float32, device=x.device) if need_db else None
    _BWD(plan, (x2, x2 if bias is None else bias, dy2, dx, dx if db_part is None else db_part,
                m, n, tiles_per_program, stride_x, stride_dy, n))
    db = None
    if need_db:
        db = torch.empty(n, dtype=bias.dtype, device=x.device)
        sum_partials(sum_plan, None, db_part, None, db, row_programs, n)
    return dx, db


class BiasGeluFn(torch.autograd.Function):
    """``gelu(x + bias)``; ``bias`` may be None (plain GELU)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, bias)
        return _forward(x, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, bias = ctx.saved_tensors
        return _backward(dy, x, bias, ctx.needs_input_grad[1])


# ============================================================================================
# Custom ops (torch.compile): see attention.py for why eager calls keep the autograd.Function
# ============================================================================================

@torch.library.custom_op("blip_fast::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _forward(x, bias)


@_bias_gelu_fwd_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape, dtype=x.dtype if bias is None else torch.result_type(x, bias))


@torch.library.custom_op("blip_fast::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Optional[Tensor], need_db: bool) -> Tuple[Tensor, Tensor]:
    dx, db = _backward(dy, x, bias, need_db)
    return dx, (x.new_empty(0) if db is None else db)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias, need_db):
    return x.new_empty(x.shape), (bias.new_empty(bias.shape) if need_db and bias is not None else x.new_empty(0))


def _gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)
    ctx.has_bias = bias is not None


def _gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_db = ctx.needs_input_grad[1] and ctx.has_bias
    dx, db = _bias_gelu_bwd_op(dy, x, bias, need_db)
    return dx, (db if need_db else None)


_bias_gelu_fwd_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def bias_gelu(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``gelu(x + bias)`` with the exact (erf) GELU.

    Args:
        x: ``(..., N)`` float32, bfloat16 or float16; any strides.
        bias: ``(N,)`` or None.

    Returns:
        ``(..., N)`` in ``torch.result_type(x, bias)``, as ``F.gelu(x + bias)`` gives, contiguous.
    """
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if compiling():
        return _bias_gelu_fwd_op(x, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return BiasGeluFn.apply(x, bias)
    return _forward(x, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``gelu(x @ weight.T + bias)``: the matmul by cuBLAS, then bias and GELU in one kernel
    (forward) and dx with the bias gradient in one kernel (backward).

    Args:
        x: ``(..., K)``; weight: ``(N, K)``; bias: ``(N,)`` or None. Same floating dtype.

    Returns:
        ``(..., N)``.
    """
    return bias_gelu(F.linear(x, weight), bias)


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
    # Under autocast the matmul casts x and weight to one dtype (a pre-LN block hands over x
    # already in it), and the bias joins in float32 as it does in the eager path.
    mixed = weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)
    if mixed and not (torch.is_autocast_enabled(x.device.type) and weight.dtype in _DTYPES
                      and (bias is None or bias.dtype in _DTYPES)):
        return "x, weight and bias must share one dtype (or run under autocast)"
    if weight.dim() != 2 or x.dim() == 0 or weight.shape[1] != x.shape[-1]:
        return f"weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"bias shape {tuple(bias.shape)} is not ({weight.shape[0]},)"
    return None
