"""Fused ``LayerNorm(dropout(x) + residual)`` over the last dimension, forward and backward.

A program normalises whole rows of ``N`` elements held in registers (``N`` up to
:data:`MAX_N`; a few rows per program at BLIP's sizes), in float32 whatever the storage dtype.
The forward saves the per-row mean and reciprocal standard deviation; the backward recomputes
``dropout(x) + residual`` from the inputs (the dropout mask is regenerated from its seed, never
stored) and runs a persistent grid, sized to the programs the SMs hold at once, whose programs
each accumulate partial ``dweight``/``dbias`` sums over a strided set of rows; one more small
kernel reduces the partials in a fixed order (deterministic) and casts them to the parameters'
dtypes.

The dropout seed is a one-element int64 device tensor (see :func:`common.draw_seed`), so CUDA
graphs replay with fresh masks and the backward regenerates the forward's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (
    KernelLauncher,
    LaunchPlan,
    align16,
    cdiv,
    compiling,
    draw_seed,
    dropout_keep,
    interpreting,
    next_power_of_2,
    resident_programs_per_sm,
    row_warps,
    seed_tensor,
    sm_count,
    sum_partials,
    sum_partials_plan,
)

Tensor = torch.Tensor

#: Largest normalised dimension: a row must fit in registers.
MAX_N = 8192
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows a program (forward) or a loop iteration (backward) handles when rows are short: about
# this many elements. Measured on an H100 at N = 768 (benchmarks/notes_norm_gelu_ce.md): four
# rows per forward program beat one by 2-4x.
FWD_ROW_ELEMENTS = 4096
BWD_ROW_ELEMENTS = 1024
#: Programs per SM of the backward's persistent grid; None: as many as the SMs hold at once
#: (from the compiled kernel's registers), capped at BWD_MAX_PROGRAMS_PER_SM.
BWD_PROGRAMS_PER_SM: Optional[int] = None
BWD_MAX_PROGRAMS_PER_SM = 16
_BWD_FIRST_GUESS_PER_SM = 4  # before the kernel is compiled and its registers known


def _rows_per_block(block_n: int, elements: int) -> int:
    return max(1, min(8, elements // block_n))


@triton.jit
def _ln_fwd_kernel(
    X, R, W, B, SEED, Y, MEAN, RSTD, S,
    stride_x, stride_r, stride_y, stride_s,
    M, N, eps, p, keep_scale,
    HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_S: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Each program normalises ``ROWS`` whole rows. SEED: one int64, read only with dropout.
    STORE_S: also write the normalised sum ``dropout(x) + residual`` to S (pre-LN blocks keep it as
    their residual stream)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(SEED), rows[:, None] * N + cols[None, :], p)
        s = tl.where(keep, s * keep_scale, 0.0)
    if HAS_R:
        s += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_S:
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(s, axis=1) / N
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    y = centred * rstd[:, None]
    if HAS_W:
        y *= tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["blocks_per_program"])  # the plan resizes the grid after compiling
def _ln_bwd_kernel(
    X, R, W, SEED, DY, DX, DR, DW_PART, DB_PART, MEAN, RSTD, DS,
    stride_x, stride_r, stride_dy, stride_dx, stride_dr, stride_ds,
    M, N, blocks_per_program, p, keep_scale,
    HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_DR: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``pid`` takes the blocks of ``ROWS`` rows ``pid, pid + programs, ...``. HAS_DS: the
    stored sum's own gradient (DS) joins the one through the normalisation."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    # A trip count fixed on the host keeps the loop bounds plain integers.
    for _ in range(0, blocks_per_program):
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows[:, None] * N + cols[None, :], p)
            s = tl.where(keep, s * keep_scale, 0.0)
        if HAS_R:
            s += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            ds += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if STORE_DR:
            tl.store(DR + rows[:, None] * stride_dr + cols[None, :], ds.to(DR.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            ds = tl.where(keep, ds * keep_scale, 0.0)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], ds.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
        rows += programs * ROWS
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _dropout_mask_kernel(OUT, SEED, N, p, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(SEED), row * N + cols, p)
    tl.store(OUT + row * N + cols, keep.to(tl.int8), mask=cols < N)


# ============================================================================================
# Host side
# ============================================================================================

_INTERPRET = interpreting()  # fixed at import, as triton's @jit decided it for the kernels
_FWD = KernelLauncher(_ln_fwd_kernel)
_BWD = KernelLauncher(_ln_bwd_kernel)
_PLANS: dict = {}
_MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget every launch plan (after changing the module's launch parameters)."""
    _PLANS.clear()


def _remember(key: tuple, plan) -> None:
    if not _INTERPRET:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan


def _rows_view(t: Tensor, n: int) -> Tuple[Tensor, int]:
    """``t`` as rows of ``n`` with unit stride along them, and the row stride; copies only when
    the layout is not already one (a contiguous tensor is used as it is: no view call)."""
    if t.is_contiguous():
        return t, n
    if t.stride(-1) != 1:
        t = t.contiguous()
    t = t.reshape(-1, n)
    return t, t.stride(0)


def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """A 1-d parameter the kernels index as ``base + col`` (a strided view is copied)."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def _keep_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _sum_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None or residual.dtype == x.dtype else torch.result_type(x, residual)


def _forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, p: float, seed: Optional[Tensor], store_sum: bool = False,
             y_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``y`` (shape of x, contiguous, ``y_dtype`` or else the dtype of ``x`` promoted with
    ``residual``), mean, rstd (M,), and with ``store_sum`` the sum ``dropout(x) + residual`` (that
    promoted dtype; else None)."""
    n = x.shape[-1]
    sum_dtype = _sum_dtype(x, residual)
    out_dtype = y_dtype or sum_dtype
    x2, stride_x = _rows_view(x, n)
    r2, stride_r = (None, 0) if residual is None else _rows_view(residual, n)
    m = x.numel() // n if n else 0
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty(x.shape, dtype=sum_dtype, device=x.device) if store_sum else None
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd, total
    dropout = p > 0.0
    key = ("fwd", x.get_device(), x.dtype, out_dtype, m, n, stride_x, stride_r, align16(x2),
           None if r2 is None else (r2.dtype, align16(r2)),
           None if weight is None else (weight.dtype, align16(weight)),
           None if bias is None else (bias.dtype, align16(bias)), dropout, store_sum, FWD_ROW_ELEMENTS)
    plan = _PLANS.get(key)
    if plan is None:
        block = next_power_of_2(n)
        rows = _rows_per_block(block, FWD_ROW_ELEMENTS)
        plan = LaunchPlan((cdiv(m, rows),),
                          dict(HAS_R=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                               HAS_DROPOUT=dropout, STORE_S=store_sum, ROWS=rows, BLOCK_N=block),
                          row_warps(block * rows))
        _remember(key, plan)
    _FWD(plan, (x2, x2 if r2 is None else r2, x2 if weight is None else weight,
                x2 if bias is None else bias, seed if dropout else x2, y, mean, rstd,
                y if total is None else total, stride_x, stride_r, n, n, m, n, eps, p, _keep_scale(p)))
    return y, mean, rstd, total


def _bwd_programs(m: int, rows_per_iter: int, per_sm: int, device: torch.device) -> int:
    return max(1, min(cdiv(m, rows_per_iter), per_sm * sm_count(device)))


def _backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
              mean: Tensor, rstd: Tensor, p: float, seed: Optional[Tensor], need_dx: bool,
              need_dr: bool, need_dw: bool, bias_dtype: Optional[torch.dtype],
              dsum: Optional[Tensor] = None
              ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """dx, dresidual, dweight, dbias (None where not asked; ``bias_dtype`` None: no dbias).
    ``dsum``: the gradient of the stored sum (pre-LN blocks), added to the one through ``y``."""
    n = x.shape[-1]
    m = mean.shape[0]
    x2, stride_x = _rows_view(x, n)
    r2, stride_r = (None, 0) if residual is None else _rows_view(residual, n)
    dy2, stride_dy = _rows_view(dy, n)
    ds2, stride_ds = (None, 0) if dsum is None else _rows_view(dsum, n)
    dropout = p > 0.0
    res_dtype = None if residual is None else residual.dtype
    # Without dropout and with equal dtypes dx == dresidual: one buffer serves both.
    store_dr = need_dr and (dropout or res_dtype != x.dtype)
    compute_dw = need_dw and weight is not None
    compute_db = bias_dtype is not None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dr = torch.empty(x.shape, dtype=res_dtype, device=x.device) if store_dr else None
    key = ("bwd", x.get_device(), x.dtype, m, n, stride_x, stride_r, stride_dy, align16(x2),
           align16(dy2), dy2.dtype, None if r2 is None else (r2.dtype, align16(r2)),
           None if weight is None else (weight.dtype, align16(weight)), dropout, store_dr,
           compute_dw, compute_db, bias_dtype, None if ds2 is None else (ds2.dtype, stride_ds, align16(ds2)),
           BWD_PROGRAMS_PER_SM, BWD_ROW_ELEMENTS)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _bwd_plan(key, x, m, n, residual is not None, weight is not None, dropout, store_dr,
                         compute_dw, compute_db, bias_dtype, ds2 is not None)
    programs, blocks_per_program, sum_plan = plan.extra
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if compute_dw else None
    db_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if compute_db else None
    if m > 0:
        _BWD(plan, (x2, x2 if r2 is None else r2, x2 if weight is None else weight,
                    seed if dropout else x2, dy2, dx, dx if dr is None else dr,
                    dx if dw_part is None else dw_part, dx if db_part is None else db_part, mean, rstd,
                    dy2 if ds2 is None else ds2, stride_x, stride_r, stride_dy, n, n, stride_ds, m, n,
                    blocks_per_program, p, _keep_scale(p)))
    dw = db = None
    if compute_dw or compute_db:
        dw = torch.empty(n, dtype=weight.dtype, device=x.device) if compute_dw else None
        db = torch.empty(n, dtype=bias_dtype, device=x.device) if compute_db else None
        if m == 0:
            for t in (dw, db):
                if t is not None:
                    t.zero_()
        else:
            sum_partials(sum_plan, dw_part, db_part, dw, db, programs, n)
    d_res = (dr if store_dr else dx) if need_dr else None
    return (dx if need_dx else None), d_res, dw, db


def _bwd_plan(key, x, m, n, has_r, has_w, dropout, store_dr, compute_dw, compute_db, bias_dtype, has_ds=False):
    block = next_power_of_2(n)
    rows_per_iter = _rows_per_block(block, BWD_ROW_ELEMENTS)
    num_warps = row_warps(block * rows_per_iter)
    per_sm = BWD_PROGRAMS_PER_SM or _BWD_FIRST_GUESS_PER_SM
    programs = _bwd_programs(m, rows_per_iter, per_sm, x.device)
    sum_plan = sum_partials_plan(n, compute_dw, compute_db)

    def size_grid(plan: LaunchPlan, compiled) -> None:
        """Once compiled: as many programs as the SMs hold at once (a partial second wave of a
        persistent grid costs a whole program's time)."""
        if BWD_PROGRAMS_PER_SM is not None:
            return
        resident = resident_programs_per_sm(compiled, num_warps, x.device)
        if resident is None:
            return
        programs = _bwd_programs(m, rows_per_iter, min(resident, BWD_MAX_PROGRAMS_PER_SM), x.device)
        plan.set_grid((programs,))
        plan.extra = (programs, cdiv(cdiv(m, rows_per_iter), programs), sum_plan)

    plan = LaunchPlan((programs,),
                      dict(HAS_R=has_r, HAS_W=has_w, HAS_DROPOUT=dropout, STORE_DR=store_dr,
                           COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, HAS_DS=has_ds, ROWS=rows_per_iter,
                           BLOCK_N=block),
                      num_warps, extra=(programs, cdiv(cdiv(m, rows_per_iter), programs), sum_plan),
                      on_compiled=size_grid)
    _remember(key, plan)
    return plan


class LayerNormFn(torch.autograd.Function):
    """Autograd wrapper; ``seed`` (one int64 device tensor) is only read when ``dropout_p > 0``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                residual: Optional[Tensor], dropout_p: float, seed: Optional[Tensor]) -> Tensor:
        y, mean, rstd, _ = _forward(x, residual, weight, bias, eps, dropout_p, seed)
        ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
        ctx.meta = (None if bias is None else bias.dtype, dropout_p)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, residual, weight, mean, rstd, seed = ctx.saved_tensors
        bias_dtype, p = ctx.meta
        need_dx, need_dw, need_db, _, need_dr = ctx.needs_input_grad[:5]
        dx, dr, dw, db = _backward(dy, x, residual, weight, mean, rstd, p, seed, need_dx, need_dr,
                                   need_dw, bias_dtype if need_db else None)
        return dx, dw, db, None, dr, None, None


# ============================================================================================
# Custom ops (torch.compile): see attention.py for why eager calls keep the autograd.Function
# ============================================================================================

@torch.library.custom_op("blip_fast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       residual: Optional[Tensor], dropout_p: float, seed: Optional[Tensor]
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward(x, residual, weight, bias, eps, dropout_p, seed)[:3]


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, residual, dropout_p, seed):
    out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("blip_fast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], mean: Tensor, rstd: Tensor, dropout_p: float,
                       seed: Optional[Tensor], need_dx: bool, need_dr: bool, need_dw: bool,
                       need_db: bool, dsum: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _backward(dy, x, residual, weight, mean, rstd, dropout_p, seed, need_dx, need_dr,
                      need_dw, bias.dtype if need_db and bias is not None else None, dsum)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_layer_norm_bwd_op.register_fake
def _(dy, x, residual, weight, bias, mean, rstd, dropout_p, seed, need_dx, need_dr, need_dw, need_db, dsum=None):
    n = x.shape[-1]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            x.new_empty(x.shape, dtype=residual.dtype) if need_dr and residual is not None else x.new_empty(0),
            weight.new_empty(n) if need_dw and weight is not None else x.new_empty(0),
            bias.new_empty(n) if need_db and bias is not None else x.new_empty(0))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps, residual, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.present = (weight is not None, bias is not None, residual is not None)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, bias, mean, rstd, seed = ctx.saved_tensors
    has_w, has_b, has_r = ctx.present
    need_dx, need_dw, need_db, _, need_dr = ctx.needs_input_grad[:5]
    need_dr = need_dr and has_r
    # Without dropout and with equal dtypes d(residual) is dx itself; an op's outputs may not
    # alias each other, so that case asks for dx only.
    shared = need_dr and ctx.dropout_p == 0.0 and residual.dtype == x.dtype
    dx, dr, dw, db = _layer_norm_bwd_op(dy, x, residual, weight, bias, mean, rstd, ctx.dropout_p, seed,
                                        need_dx or shared, need_dr and not shared, need_dw and has_w,
                                        need_db and has_b)
    return (dx if need_dx else None, dw if need_dw and has_w else None, db if need_db and has_b else None,
            None, (dx if shared else dr) if need_dr else None, None, None)


_layer_norm_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup)


# -- pre-LN blocks: (x + residual, LayerNorm(x + residual)) ----------------------------------------
def _add_ln_grads(dsum: Optional[Tensor], dy: Optional[Tensor], x: Tensor, residual: Tensor,
                  weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                  needs: Tuple[bool, bool, bool, bool], backward_op) -> tuple:
    """(dx, dresidual, dweight, dbias) of :func:`add_layer_norm` through ``backward_op`` (the
    eager function or the custom op); ``needs``: which of them autograd asks for."""
    need_dx, need_dr, need_dw, need_db = needs
    if dy is None:  # only the sum was used further on
        dy = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    # With equal dtypes d(residual) is dx itself (no dropout here): ask for one buffer.
    shared = need_dr and residual.dtype == x.dtype
    dx, dr, dw, db = backward_op(dy, x, residual, weight, bias, mean, rstd, need_dx or shared,
                                 need_dr and not shared, need_dw and weight is not None,
                                 need_db and bias is not None, dsum)
    return (dx if need_dx else None, (dx if shared else dr) if need_dr else None,
            dw if need_dw and weight is not None else None, db if need_db and bias is not None else None)


def _eager_backward(dy, x, residual, weight, bias, mean, rstd, need_dx, need_dr, need_dw, need_db, dsum):
    return _backward(dy, x, residual, weight, mean, rstd, 0.0, None, need_dx, need_dr, need_dw,
                     bias.dtype if need_db else None, dsum)


def _op_backward(dy, x, residual, weight, bias, mean, rstd, need_dx, need_dr, need_dw, need_db, dsum):
    return _layer_norm_bwd_op(dy, x, residual, weight, bias, mean, rstd, 0.0, None, need_dx, need_dr, need_dw,
                              need_db, dsum)


class AddLayerNormFn(torch.autograd.Function):
    """Autograd wrapper of :func:`add_layer_norm`: outputs (sum, y)."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                y_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
        y, mean, rstd, total = _forward(x, residual, weight, bias, eps, 0.0, None, True, y_dtype)
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
        return total, y

    @staticmethod
    def backward(ctx, dsum: Optional[Tensor], dy: Optional[Tensor]):
        x, residual, weight, bias, mean, rstd = ctx.saved_tensors
        grads = _add_ln_grads(dsum, dy, x, residual, weight, bias, mean, rstd, tuple(ctx.needs_input_grad[:4]),
                              _eager_backward)
        return (*grads, None, None)


@torch.library.custom_op("blip_fast::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           eps: float, y_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, rstd, total = _forward(x, residual, weight, bias, eps, 0.0, None, True, y_dtype)
    return total, y, mean, rstd


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, y_dtype):
    total_dtype = _sum_dtype(x, residual)
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=total_dtype), x.new_empty(x.shape, dtype=y_dtype or total_dtype),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, _, _ = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd)


def _add_ln_backward(ctx, dsum, dy, _dmean, _drstd):
    x, residual, weight, bias, mean, rstd = ctx.saved_tensors
    grads = _add_ln_grads(dsum, dy, x, residual, weight, bias, mean, rstd, tuple(ctx.needs_input_grad[:4]),
                          _op_backward)
    return (*grads, None, None)


_add_layer_norm_fwd_op.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


# ============================================================================================
# Public API
# ============================================================================================

def layer_norm_fn(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  residual: Optional[Tensor] = None, dropout_p: float = 0.0,
                  seed: "int | Tensor | None" = None) -> Tensor:
    """:func:`layer_norm` with an explicit dropout ``seed`` (an int or a one-element integer
    tensor; drawn from torch's generator of x's device if None)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    dropout_p = float(dropout_p)
    seed_t = None
    if dropout_p > 0.0:
        seed_t = draw_seed(x.device) if seed is None else seed_tensor(seed, x.device)
    eps = float(eps)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    if compiling():
        return _layer_norm_fwd_op(x, weight, bias, eps, residual, dropout_p, seed_t)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return LayerNormFn.apply(x, weight, bias, eps, residual, dropout_p, seed_t)
    return _forward(x, residual, weight, bias, eps, dropout_p, seed_t)[0]


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               residual: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``LayerNorm(dropout(x) + residual)`` over the last dimension.

    Args:
        x: ``(..., N)`` float32, bfloat16 or float16; any strides.
        weight, bias: ``(N,)`` or None.
        eps: added to the variance.
        residual: optional, same shape as ``x``.
        dropout_p: dropout probability on ``x`` (before the residual add).

    Returns:
        ``(..., N)`` in the dtype of ``x`` (promoted with ``residual``'s), contiguous.
    """
    return layer_norm_fn(x, weight, bias, eps, residual, dropout_p)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   y_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """A pre-LN block's ``s = x + residual`` and ``LayerNorm(s)`` in one pass over the rows.

    Args:
        x, residual: ``(..., N)`` float32, bfloat16 or float16, same shape; any strides.
        weight, bias: ``(N,)`` or None.
        eps: added to the variance.
        y_dtype: dtype of the normalised output (default: the sum's). Under autocast the caller
            passes the autocast dtype: the value the next matmul would cast it to, written directly.

    Returns:
        ``(s, y)``: the sum in ``x``'s dtype promoted with ``residual``'s, and ``LayerNorm(s)``,
        both contiguous. Gradients flow into both from ``s`` and ``y``.
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    eps = float(eps)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    if compiling():
        total, y, _, _ = _add_layer_norm_fwd_op(x, residual, weight, bias, eps, y_dtype)
        return total, y
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        return AddLayerNormFn.apply(x, residual, weight, bias, eps, y_dtype)
    y, _, _, total = _forward(x, residual, weight, bias, eps, 0.0, None, True, y_dtype)
    return total, y


def why_not_add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           eps: float, y_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the kernel can run this call, else the reason."""
    if y_dtype is not None and y_dtype not in _DTYPES:
        return f"output dtype {y_dtype} (supported: float32, bfloat16, float16)"
    return why_not_layer_norm(x, weight, bias, eps, residual)


def why_not_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       residual: Optional[Tensor] = None, dropout_p: float = 0.0) -> Optional[str]:
    """None when the kernel can run this call, else the reason."""
    n = x.shape[-1] if x.dim() else 0
    if x.dtype not in _DTYPES or (residual is not None and residual.dtype not in _DTYPES):
        return f"dtype {x.dtype} (supported: float32, bfloat16, float16)"
    if not 0 < n <= MAX_N:
        return f"normalised dimension {n} outside 1..{MAX_N}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            return f"{name} shape {tuple(t.shape)} is not ({n},)"
    if residual is not None and residual.shape != x.shape:
        return f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}"
    if not 0.0 <= dropout_p <= 1.0:
        return f"dropout_p {dropout_p} outside [0, 1]"
    return None


def dropout_mask(seed: "int | Tensor", shape: Tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """The keep mask (bool, ``shape``) that :func:`layer_norm_fn` applies with ``seed`` and ``p``.

    A debugging / testing aid: the kernels regenerate the same mask from ``(seed, row * N + col)``.
    """
    n = shape[-1]
    m = 1
    for d in shape[:-1]:
        m *= d
    out = torch.empty((m, n), dtype=torch.int8, device=device)
    if m > 0:
        _dropout_mask_kernel[(m,)](out, seed_tensor(seed, torch.device(device)), n, p,
                                   BLOCK_N=next_power_of_2(n))
    return out.view(shape).bool()
