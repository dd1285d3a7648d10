"""Fused ``LayerNorm(dropout(x) + residual)`` over the last dimension, forward and backward.

A program normalises whole rows of ``N`` elements held in registers (``N`` up to
:data:`MAX_N`; one row per program at BLIP's sizes, a few when rows are short), in float32
whatever the storage dtype. The forward saves the per-row mean and
reciprocal standard deviation; the backward recomputes ``dropout(x) + residual`` from the inputs
(the dropout mask is regenerated from its seed, never stored) and runs a persistent grid whose
programs each accumulate partial ``dweight``/``dbias`` sums over a strided set of rows; the
partials are reduced afterwards in a fixed order, so the gradients are deterministic.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import cdiv, draw_seed, dropout_keep, next_power_of_2, row_warps, sm_count

Tensor = torch.Tensor

#: Largest normalised dimension: a row must fit in registers.
MAX_N = 8192
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows a program (forward) or a loop iteration (backward) handles when rows are short: about
# this many elements. Measured on an H100 at N = 768 (benchmarks/notes_norm_gelu_ce.md): four
# rows per forward program beat one by 2-4x; the backward's extra rows cost registers (197
# instead of 80 at N = 768) for no measured gain.
FWD_ROW_ELEMENTS = 4096
BWD_ROW_ELEMENTS = 1024
# Backward persistent grid: enough programs per SM to hide latency, few enough that the
# (programs, N) float32 partial sums stay small next to the activations.
BWD_PROGRAMS_PER_SM = 8


def _rows_per_block(block_n: int, elements: int) -> int:
    return max(1, min(8, elements // block_n))


@triton.jit(do_not_specialize=["seed"])
def _ln_fwd_kernel(
    X, R, W, B, Y, MEAN, RSTD,
    stride_x, stride_r, stride_y,
    M, N, eps, p, keep_scale, seed,
    HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Each program normalises ``ROWS`` whole rows."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, rows[:, None] * N + cols[None, :], p)
        s = tl.where(keep, s * keep_scale, 0.0)
    if HAS_R:
        s += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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


@triton.jit(do_not_specialize=["seed"])
def _ln_bwd_kernel(
    X, R, W, DY, DX, DR, DW_PART, DB_PART, MEAN, RSTD,
    stride_x, stride_r, stride_dy, stride_dx, stride_dr,
    M, N, blocks_per_program, p, keep_scale, seed,
    HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_DR: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``pid`` takes the blocks of ``ROWS`` rows ``pid, pid + programs, ...``."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
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
def _dropout_mask_kernel(OUT, N, p, seed, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, row * N + cols, p)
    tl.store(OUT + row * N + cols, keep.to(tl.int8), mask=cols < N)


def _as_rows(t: Tensor) -> Tensor:
    """``(..., N)`` -> ``(M, N)`` with unit stride along N, copying only when it must."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _keep_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _launch_fwd(x2: Tensor, r2: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float, p: float, seed: int, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    m, n = x2.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    mean = torch.empty(m, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m == 0:
        return y, mean, rstd
    block = next_power_of_2(n)
    rows = _rows_per_block(block, FWD_ROW_ELEMENTS)
    _ln_fwd_kernel[(cdiv(m, rows),)](
        x2, r2 if r2 is not None else x2, weight if weight is not None else x2,
        bias if bias is not None else x2, y, mean, rstd,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
        m, n, eps, p, _keep_scale(p), seed,
        HAS_R=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_DROPOUT=p > 0.0, ROWS=rows, BLOCK_N=block, num_warps=row_warps(block * rows),
    )
    return y, mean, rstd


class LayerNormFn(torch.autograd.Function):
    """Autograd wrapper; ``seed`` is only read when ``dropout_p > 0``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                residual: Optional[Tensor], dropout_p: float, seed: int) -> Tensor:
        n = x.shape[-1]
        out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
        x2 = _as_rows(x)
        r2 = _as_rows(residual) if residual is not None else None
        w = weight.contiguous() if weight is not None else None
        b = bias.contiguous() if bias is not None else None
        y, mean, rstd = _launch_fwd(x2, r2, w, b, eps, dropout_p, seed, out_dtype)
        ctx.save_for_backward(x2, r2, w, mean, rstd)
        ctx.meta = (x.shape, x.dtype, None if residual is None else residual.dtype,
                    None if bias is None else bias.dtype, dropout_p, seed, n)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, r2, w, mean, rstd = ctx.saved_tensors
        x_shape, x_dtype, res_dtype, b_dtype, p, seed, n = ctx.meta
        need_dx, need_dw, need_db, _, need_dr = ctx.needs_input_grad[:5]
        dy2 = _as_rows(dy)
        m = x2.shape[0]
        # Without dropout and with equal dtypes dx == dresidual: one buffer serves both.
        store_dr = need_dr and (p > 0.0 or res_dtype != x_dtype)
        dx = torch.empty((m, n), dtype=x_dtype, device=x2.device)
        dr = torch.empty((m, n), dtype=res_dtype, device=x2.device) if store_dr else None
        compute_dw = need_dw and w is not None
        compute_db = need_db and b_dtype is not None
        block = next_power_of_2(n)
        rows_per_iter = _rows_per_block(block, BWD_ROW_ELEMENTS)
        programs = max(1, min(cdiv(m, rows_per_iter), BWD_PROGRAMS_PER_SM * sm_count(x2.device)))
        dw_part = torch.empty((programs, n), dtype=torch.float32, device=x2.device) if compute_dw else None
        db_part = torch.empty((programs, n), dtype=torch.float32, device=x2.device) if compute_db else None
        if m > 0:
            _ln_bwd_kernel[(programs,)](
                x2, r2 if r2 is not None else x2, w if w is not None else x2, dy2, dx,
                dr if dr is not None else dx, dw_part if dw_part is not None else dx,
                db_part if db_part is not None else dx, mean, rstd,
                x2.stride(0), r2.stride(0) if r2 is not None else 0, dy2.stride(0), dx.stride(0),
                dr.stride(0) if dr is not None else 0,
                m, n, cdiv(cdiv(m, rows_per_iter), programs), p, _keep_scale(p), seed,
                HAS_R=r2 is not None, HAS_W=w is not None, HAS_DROPOUT=p > 0.0,
                STORE_DR=store_dr, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                ROWS=rows_per_iter, BLOCK_N=block, num_warps=row_warps(block * rows_per_iter),
            )
        dw = dw_part.sum(0).to(w.dtype) if compute_dw else None
        db = db_part.sum(0).to(b_dtype) if compute_db else None
        d_res = (dr if store_dr else dx).view(x_shape) if need_dr else None
        return (dx.view(x_shape) if need_dx else None), dw, db, None, d_res, None, None


def layer_norm_fn(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  residual: Optional[Tensor] = None, dropout_p: float = 0.0,
                  seed: Optional[int] = None) -> Tensor:
    """:func:`layer_norm` with an explicit dropout ``seed`` (drawn from torch's RNG if None)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    return LayerNormFn.apply(x, weight, bias, eps, residual, float(dropout_p), int(seed or 0))


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
        ``(..., N)`` in the dtype of ``x`` (promoted with ``residual``'s).
    """
    return layer_norm_fn(x, weight, bias, eps, residual, dropout_p)


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


def dropout_mask(seed: int, shape: Tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """The keep mask (bool, ``shape``) that :func:`layer_norm_fn` applies with ``seed`` and ``p``.

    A debugging / testing aid: the kernels regenerate the same mask from ``(seed, row * N + col)``.
    """
    n = shape[-1]
    m = 1
    for d in shape[:-1]:
        m *= d
    out = torch.empty((m, n), dtype=torch.int8, device=device)
    if m > 0:
        _dropout_mask_kernel[(m,)](out, n, p, seed, BLOCK_N=next_power_of_2(n))
    return out.view(shape).bool()
