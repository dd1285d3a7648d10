"""Fused scaled dot-product attention, forward and backward (FlashAttention-2 style).

Semantics are those of :func:`blip_fast.ops.reference.attention`: ``softmax(q k^T * scale)`` with
an optional boolean key padding mask (True = keep) and an optional causal mask aligned to the
bottom right (query ``i`` sits at absolute position ``Lk - Lq + i``), dropout on the
probabilities, and zeros for rows that keep no key.

Forward
    One program per (query block, head, batch) streams over the key blocks with an online softmax
    (running max and sum, base 2), never materialising the ``(Lq, Lk)`` scores. It writes the
    output and the per-row log-sum-exp (base 2, float32), all that the backward needs. Whole key
    blocks that need no bounds or causal mask run in a predicate-free loop; only the last
    (partial or diagonal) blocks pay for masking.

Backward
    A small kernel computes ``delta = rowsum(dO * O)``. One launch then runs two kinds of
    programs: the first ``cdiv(Lk, BLOCK_N1)`` programs each own a key block and loop over the
    query blocks accumulating dK and dV; the next ``cdiv(Lq, BLOCK_M2)`` programs each own a query
    block and loop over the key blocks accumulating dQ. Recomputing the scores for dQ costs two
    extra matmuls per tile pair (seven instead of five), but every gradient element is written
    exactly once by one program: no atomics, no float32 dQ scratch buffer, and bit-for-bit
    deterministic results.

    Short query sequences (``Lq <= SHORT_Q_MAX``: BERT self-attention, text-to-image
    cross-attention, the decoder) instead run one program per head that holds every query: it
    computes delta itself and, in one pass over the key blocks, writes each block's dK and dV
    (complete, as no other program sees those keys) while accumulating dQ. One launch, five
    matmuls per tile, still deterministic.

Dropout
    The keep mask of score ``(b, h, i, j)`` is ``rand(seed, ((b * H + h) * Lq + i) * Lk + j) >= p``
    (Philox, :func:`common.dropout_keep`), regenerated in the backward instead of stored. The seed
    is drawn from torch's CPU generator, so ``torch.manual_seed`` makes runs reproducible;
    :func:`dropout_keep_mask` returns the mask of a seed for tests and debugging.

Layouts
    Inputs are read through their strides (any layout, e.g. q/k/v slices of a fused qkv
    projection, with no copy). The output and the gradients are ``(B, H, L, D)`` views of
    ``(B, L, H, D)`` memory, so the usual ``transpose(1, 2).reshape(B, L, H * D)`` that follows is
    free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .common import (
    cdiv,
    draw_seed,
    dropout_keep,
    interpreting,
    load_tile,
    new_output,
    next_power_of_2,
    store_tile,
    tile_ptrs,
    tune,
)

Tensor = torch.Tensor

__all__ = ["attention", "why_not_attention", "dropout_keep_mask", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest head dim the kernels take (the backward keeps several (block, D) tiles on chip).
MAX_HEAD_DIM = 128
#: Set to 1 to time the candidate block configurations on first use of each problem class
#: instead of taking the built-in choice (see :func:`_fwd_config` / :func:`_bwd_config`).
AUTOTUNE_ENV = "BLIP_FAST_ATTN_AUTOTUNE"

_LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535  # CUDA limit on grid dims y (heads) and z (batch)


# ============================================================================================
# Device-side helpers
# ============================================================================================

@triton.jit
def _mask_scores(s, q_pos, k_pos, k_idx, Lk, CHECK_KEYS: tl.constexpr, CAUSAL: tl.constexpr):
    """``s`` with -inf where key ``k_idx`` is out of bounds or ``k_pos > q_pos`` (causal future).

    All index tiles broadcast to ``s`` (either orientation). Positions are absolute: a caller
    adds the causal shift ``Lk - Lq`` to the query side or subtracts it from the key side,
    whichever is loop-invariant.
    """
    if CHECK_KEYS:
        s = tl.where(k_idx < Lk, s, float("-inf"))
    if CAUSAL:
        s = tl.where(k_pos <= q_pos, s, float("-inf"))
    return s


@triton.jit
def _rng_rows(b, h, H, Lq, Lk, offs_m, RNG64: tl.constexpr):
    """Dropout counters of scores ``(b, h, offs_m, 0)``; scores count row-major over (B, H, Lq, Lk).

    int32 while ``B * H * Lq * Lk < 2**31`` (the host sets RNG64 beyond): Philox sees the same
    counter either way, so the mask does not depend on the choice.
    """
    if RNG64:
        rows = ((b * H + h).to(tl.int64) * Lq + offs_m) * Lk
    else:
        rows = ((b * H + h) * Lq + offs_m) * Lk
    return rows


@triton.jit
def _visible_keys(start_m, Lk, causal_shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """Keys ``[0, hi)`` seen by the query block at ``start_m``, and the prefix ``[0, full)`` of
    whole key blocks that every query of the block sees (no bounds or causal mask needed)."""
    hi = Lk
    full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # Operands of // are kept >= 0: C and numpy (interpreter) round negatives differently.
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + causal_shift, 0))
        full = tl.minimum(full, (tl.maximum(start_m + causal_shift + 1, 0) // BLOCK_N) * BLOCK_N)
    return hi, full


# ============================================================================================
# Forward
# ============================================================================================

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
               q_pos, rng_rows, lo, hi, Lk, qk_scale, seed, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               CHECK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation of one query block over the key blocks in ``[lo, hi)``.

    acc: (BLOCK_M, BLOCK_D) float32 un-normalised output; l_i, m_i: (BLOCK_M,) running sum and
    max of the base-2 scores; k_base, v_base, kpm_base: scalar pointers to key 0 of this (b, h);
    q_pos, rng_rows: (BLOCK_M, 1). Dropout zeroes probabilities in ``acc`` only: ``l_i``
    normalises with the full softmax, as dropout applies after it.
    """
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in tl.range(lo, hi, BLOCK_N):
        # Tile addresses are rebuilt from scalars each step: loop-carried pointer tiles would
        # pin two (BLOCK_N, BLOCK_D) int64 tensors in registers.
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(tile_ptrs(k_base, offs_n, offs_d, stride_kn, stride_kd), offs_n, offs_d,
                      Lk, HEAD_DIM, CHECK_KEYS, BLOCK_D != HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, q_pos, offs_n[None, :], offs_n[None, :], Lk, CHECK_KEYS, CAUSAL)
        if HAS_KPM:
            key_keep = tl.load(kpm_base + offs_n * stride_mn, mask=offs_n < Lk, other=0) != 0
            s = tl.where(key_keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(dropout_keep(seed, rng_rows + offs_n[None, :], dropout_p), p, 0.0)
        v = load_tile(tile_ptrs(v_base, offs_n, offs_d, stride_vn, stride_vd), offs_n, offs_d,
                      Lk, HEAD_DIM, CHECK_KEYS, BLOCK_D != HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KPM, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, Lq, Lk, qk_scale, seed, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), H, B)``. Q: (B, H, Lq, D), K/V: (B, H, Lk, D), KPM: (B, Lk)
    uint8, Out: (B, H, Lq, D) in the input dtype, LSE: (B, H, Lq) float32 contiguous (base 2,
    +inf for rows that keep no key). ``qk_scale`` = scale * log2(e)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(tile_ptrs(Q + b64 * stride_qb + h64 * stride_qh, offs_m, offs_d, stride_qm, stride_qd),
                  offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    kpm_base = KPM + b64 * stride_mb
    causal_shift = Lk - Lq
    q_pos = (offs_m + causal_shift)[:, None]
    rng_rows = _rng_rows(b, h, H, Lq, Lk, offs_m, RNG64)[:, None]

    # A finite initial max keeps exp2(m_old - m_new) NaN-free while a row has seen no key.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi, full = _visible_keys(start_m, Lk, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        q_pos, rng_rows, 0, full, Lk, qk_scale, seed, dropout_p,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, HAS_KPM, DROPOUT, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        q_pos, rng_rows, full, hi, Lk, qk_scale, seed, dropout_p,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KPM, DROPOUT, DOT_PRECISION)

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    inv_l = 1.0 / l_safe
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    o_ptrs = tile_ptrs(Out + b64 * stride_ob + h64 * stride_oh, offs_m, offs_d, stride_om, stride_od)
    store_tile(o_ptrs, acc * inv_l[:, None], offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + (b64 * H + h64) * Lq + offs_m, lse, mask=offs_m < Lq)


# ============================================================================================
# Backward
# ============================================================================================

@triton.jit
def _attn_bwd_delta_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), H, B)``: Delta (B, H, Lq) float32 = rowsum(dO * O)."""
    b64 = tl.program_id(2).to(tl.int64)
    h64 = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(tile_ptrs(Out + b64 * stride_ob + h64 * stride_oh, offs_m, offs_d, stride_om, stride_od),
                  offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = load_tile(tile_ptrs(DO + b64 * stride_gb + h64 * stride_gh, offs_m, offs_d, stride_gm, stride_gd),
                   offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b64 * H + h64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, key_keep, q_base, do_base, lse_base, delta_base,
                    stride_qm, stride_qd, stride_gm, stride_gd, k_pos, rng_cols,
                    lo, hi, Lq, Lk, qk_scale, seed, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, BLOCK_D) float32 of one key block over query blocks [lo, hi).

    Works on transposed tiles (keys along rows) so that no probability tile is transposed.
    q_base, do_base, lse_base, delta_base: scalar pointers to query 0 of this (b, h); k_pos:
    (BLOCK_N, 1) key index minus the causal shift; rng_cols: (BLOCK_N, 1) dropout counters of
    (query 0, key). Query rows past Lq load q = dO = 0 and lse = +inf, hence p = 0: they need
    no mask. Key rows past Lk only produce garbage in rows of dK/dV that are never stored.
    """
    offs_d = tl.arange(0, BLOCK_D)
    keep_scale = 1.0 / (1.0 - dropout_p)
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(tile_ptrs(q_base, offs_m, offs_d, stride_qm, stride_qd), offs_m, offs_d,
                      Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
        lse = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf"))
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        s_t = _mask_scores(s_t, offs_m[None, :], k_pos, k_pos, Lk, False, CAUSAL)
        if HAS_KPM:
            s_t = tl.where(key_keep[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        do = load_tile(tile_ptrs(do_base, offs_m, offs_d, stride_gm, stride_gd), offs_m, offs_d,
                       Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, rng_cols + (offs_m * Lk)[None, :], dropout_p)
            dv = tl.dot(tl.where(keep, p_t * keep_scale, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PRECISION)
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                  q_pos, rng_rows, lo, hi, Lk, qk_scale, seed, dropout_p,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  CHECK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                  DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (BLOCK_M, BLOCK_D) float32 of one query block over key blocks [lo, hi).

    Pointer and index arguments as in :func:`_fwd_inner`.
    """
    offs_d = tl.arange(0, BLOCK_D)
    keep_scale = 1.0 / (1.0 - dropout_p)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(tile_ptrs(k_base, offs_n, offs_d, stride_kn, stride_kd), offs_n, offs_d,
                      Lk, HEAD_DIM, CHECK_KEYS, BLOCK_D != HEAD_DIM)
        v = load_tile(tile_ptrs(v_base, offs_n, offs_d, stride_vn, stride_vd), offs_n, offs_d,
                      Lk, HEAD_DIM, CHECK_KEYS, BLOCK_D != HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, q_pos, offs_n[None, :], offs_n[None, :], Lk, CHECK_KEYS, CAUSAL)
        if HAS_KPM:
            key_keep = tl.load(kpm_base + offs_n * stride_mn, mask=offs_n < Lk, other=0) != 0
            s = tl.where(key_keep[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, rng_rows + offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dkdv_program(start_n, b, h, Q, K, V, KPM, DO, LSE, Delta, DK, DV,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_gb, stride_gh, stride_gm, stride_gd,
                      stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                      stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                      stride_mb, stride_mn,
                      H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                      RNG64: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of the key block ``[start_n, start_n + BLOCK_N)`` of head (b, h)."""
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(tile_ptrs(K + b64 * stride_kb + h64 * stride_kh, offs_n, offs_d, stride_kn, stride_kd),
                  offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    v = load_tile(tile_ptrs(V + b64 * stride_vb + h64 * stride_vh, offs_n, offs_d, stride_vn, stride_vd),
                  offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    key_keep = offs_n < Lk
    if HAS_KPM:
        key_keep = tl.load(KPM + b64 * stride_mb + offs_n * stride_mn, mask=offs_n < Lk, other=0) != 0
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_gb + h64 * stride_gh
    lse_base = LSE + (b64 * H + h64) * Lq
    delta_base = Delta + (b64 * H + h64) * Lq
    causal_shift = Lk - Lq
    k_pos = (offs_n - causal_shift)[:, None]
    rng_cols = _rng_rows(b, h, H, Lq, Lk, 0, RNG64) + offs_n[:, None]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    full = 0
    if CAUSAL:
        # Queries before `lo` see none of these keys; from `full` on they see all of them.
        lo = (tl.maximum(start_n - causal_shift, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M
        full = tl.minimum(tl.maximum(full, lo), Lq)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, key_keep, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_gm, stride_gd, k_pos, rng_cols, lo, full, Lq, Lk,
            qk_scale, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_KPM, DROPOUT,
            DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, key_keep, q_base, do_base, lse_base, delta_base,
        stride_qm, stride_qd, stride_gm, stride_gd, k_pos, rng_cols, full, Lq, Lq, Lk,
        qk_scale, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_KPM, DROPOUT,
        DOT_PRECISION)
    dk_ptrs = tile_ptrs(DK + b64 * stride_dkb + h64 * stride_dkh, offs_n, offs_d, stride_dkn, stride_dkd)
    dv_ptrs = tile_ptrs(DV + b64 * stride_dvb + h64 * stride_dvh, offs_n, offs_d, stride_dvn, stride_dvd)
    store_tile(dk_ptrs, dk * sm_scale, offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    store_tile(dv_ptrs, dv, offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)


@triton.jit
def _bwd_dq_program(start_m, b, h, Q, K, V, KPM, DO, LSE, Delta, DQ,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_gb, stride_gh, stride_gm, stride_gd,
                    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                    stride_mb, stride_mn,
                    H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                    RNG64: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of the query block ``[start_m, start_m + BLOCK_M)`` of head (b, h)."""
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(tile_ptrs(Q + b64 * stride_qb + h64 * stride_qh, offs_m, offs_d, stride_qm, stride_qd),
                  offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = load_tile(tile_ptrs(DO + b64 * stride_gb + h64 * stride_gh, offs_m, offs_d, stride_gm, stride_gd),
                   offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    lse = tl.load(LSE + (b64 * H + h64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(Delta + (b64 * H + h64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    kpm_base = KPM + b64 * stride_mb
    causal_shift = Lk - Lq
    q_pos = (offs_m + causal_shift)[:, None]
    rng_rows = _rng_rows(b, h, H, Lq, Lk, offs_m, RNG64)[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi, full = _visible_keys(start_m, Lk, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mn, q_pos, rng_rows, 0, full, Lk, qk_scale, seed, dropout_p,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, HAS_KPM, DROPOUT, DOT_PRECISION)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mn, q_pos, rng_rows, full, hi, Lk, qk_scale, seed, dropout_p,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KPM, DROPOUT, DOT_PRECISION)
    dq_ptrs = tile_ptrs(DQ + b64 * stride_dqb + h64 * stride_dqh, offs_m, offs_d, stride_dqm, stride_dqd)
    store_tile(dq_ptrs, dq * sm_scale, offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, KPM, DO, LSE, Delta, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    """Grid ``(cdiv(Lk, BLOCK_N1) + cdiv(Lq, BLOCK_M2), H, B)``: programs below
    ``cdiv(Lk, BLOCK_N1)`` write dK, dV of one key block; the others write dQ of one query block.
    Shapes as in the forward; DO may have any strides; DQ/DK/DV are in the input dtype."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_key_blocks = tl.cdiv(Lk, BLOCK_N1)
    if pid < n_key_blocks:
        _bwd_dkdv_program(
            pid * BLOCK_N1, b, h, Q, K, V, KPM, DO, LSE, Delta, DK, DV,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_gb, stride_gh, stride_gm, stride_gd,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_mb, stride_mn, H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
            HEAD_DIM, BLOCK_D, HAS_KPM, CAUSAL, DROPOUT, RNG64, DOT_PRECISION, BLOCK_M1, BLOCK_N1)
    else:
        _bwd_dq_program(
            (pid - n_key_blocks) * BLOCK_M2, b, h, Q, K, V, KPM, DO, LSE, Delta, DQ,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_gb, stride_gh, stride_gm, stride_gd,
            stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_mb, stride_mn,
            H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
            HEAD_DIM, BLOCK_D, HAS_KPM, CAUSAL, DROPOUT, RNG64, DOT_PRECISION, BLOCK_M2, BLOCK_N2)


@triton.jit
def _bwd_short_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, dk_base, dv_base,
                     stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                     stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                     q_pos, rng_rows, lo, hi, Lk, sm_scale, qk_scale, seed, dropout_p,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     CHECK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                     DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """All gradients of key blocks [lo, hi) when one program holds every query of the head.

    dK and dV of a key block are complete after this one visit, so they are stored here;
    dQ (BLOCK_M, BLOCK_D) float32 accumulates. Arguments as in :func:`_bwd_dq_inner`.
    """
    offs_d = tl.arange(0, BLOCK_D)
    keep_scale = 1.0 / (1.0 - dropout_p)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(tile_ptrs(k_base, offs_n, offs_d, stride_kn, stride_kd), offs_n, offs_d,
                      Lk, HEAD_DIM, CHECK_KEYS, BLOCK_D != HEAD_DIM)
        v = load_tile(tile_ptrs(v_base, offs_n, offs_d, stride_vn, stride_vd), offs_n, offs_d,
                      Lk, HEAD_DIM, CHECK_KEYS, BLOCK_D != HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, q_pos, offs_n[None, :], offs_n[None, :], Lk, CHECK_KEYS, CAUSAL)
        if HAS_KPM:
            key_keep = tl.load(kpm_base + offs_n * stride_mn, mask=offs_n < Lk, other=0) != 0
            s = tl.where(key_keep[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, rng_rows + offs_n[None, :], dropout_p)
            p_drop = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            p_drop = p
        ds = p * (dp - delta[:, None])
        dv = tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        store_tile(tile_ptrs(dk_base, offs_n, offs_d, stride_dkn, stride_dkd), dk * sm_scale,
                   offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
        store_tile(tile_ptrs(dv_base, offs_n, offs_d, stride_dvn, stride_dvd), dv,
                   offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    return dq


@triton.jit
def _attn_bwd_short_kernel(
    Q, K, V, KPM, Out, DO, LSE, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(1, H, B)``, for ``Lq <= BLOCK_M`` (text queries): one program per head computes
    delta, dQ, dK and dV in one pass over the keys (five matmuls per tile, one launch).
    Shapes as in :func:`_attn_bwd_kernel`; Out is the forward output."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(tile_ptrs(Q + b64 * stride_qb + h64 * stride_qh, offs_m, offs_d, stride_qm, stride_qd),
                  offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = load_tile(tile_ptrs(DO + b64 * stride_gb + h64 * stride_gh, offs_m, offs_d, stride_gm, stride_gd),
                   offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    o = load_tile(tile_ptrs(Out + b64 * stride_ob + h64 * stride_oh, offs_m, offs_d, stride_om, stride_od),
                  offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + (b64 * H + h64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    dk_base = DK + b64 * stride_dkb + h64 * stride_dkh
    dv_base = DV + b64 * stride_dvb + h64 * stride_dvh
    kpm_base = KPM + b64 * stride_mb
    causal_shift = Lk - Lq
    q_pos = (offs_m + causal_shift)[:, None]
    rng_rows = _rng_rows(b, h, H, Lq, Lk, offs_m, RNG64)[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # With every query here, bottom-right causal masking leaves no key unseen: hi == Lk, so
    # every dK/dV row is written.
    hi, full = _visible_keys(0, Lk, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_short_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, dk_base, dv_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        stride_dkn, stride_dkd, stride_dvn, stride_dvd,
        q_pos, rng_rows, 0, full, Lk, sm_scale, qk_scale, seed, dropout_p,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, HAS_KPM, DROPOUT, DOT_PRECISION)
    dq = _bwd_short_inner(
        dq, q, do, lse, delta, k_base, v_base, kpm_base, dk_base, dv_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        stride_dkn, stride_dkd, stride_dvn, stride_dvd,
        q_pos, rng_rows, full, hi, Lk, sm_scale, qk_scale, seed, dropout_p,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KPM, DROPOUT, DOT_PRECISION)
    dq_ptrs = tile_ptrs(DQ + b64 * stride_dqb + h64 * stride_dqh, offs_m, offs_d, stride_dqm, stride_dqd)
    store_tile(dq_ptrs, dq * sm_scale, offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)


@triton.jit
def _dropout_mask_kernel(Mask, H, Lq, Lk, seed, dropout_p,
                         RNG64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M), H, B)``: Mask (B, H, Lq, Lk) uint8 contiguous, 1 = kept."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rng_rows = _rng_rows(tl.program_id(2), tl.program_id(1), H, Lq, Lk, offs_m, RNG64)[:, None]
    for start_n in tl.range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, rng_rows + offs_n[None, :], dropout_p)
        # The mask is (B, H, Lq, Lk) contiguous, so its flat index is the dropout counter.
        tl.store(Mask + rng_rows + offs_n[None, :], keep.to(tl.uint8),
                 mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


# ============================================================================================
# Launch configurations
# ============================================================================================

@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class BwdConfig:
    """Blocks of the two-kind backward (:func:`_attn_bwd_kernel`)."""

    block_m1: int  # query block of the dK/dV programs
    block_n1: int  # key block owned by a dK/dV program
    block_m2: int  # query block owned by a dQ program
    block_n2: int  # key block of the dQ programs
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class ShortBwdConfig:
    """Blocks of the one-program-per-head backward (:func:`_attn_bwd_short_kernel`); its query
    block is ``Lq`` rounded up to a power of two."""

    block_n: int
    num_warps: int = 4
    num_stages: int = 2


#: Largest Lq that takes the one-program-per-head backward (text self/cross-attention). Longer
#: query sequences need several programs per head for parallelism and registers.
SHORT_Q_MAX = 64

# Interpreter: large blocks keep the CPU tests fast (each device-function call costs ~1 ms there);
# the tests override them to cover multi-block and unequal-block paths.
_INTERPRETER_FWD = FwdConfig(64, 64, 1, 1)
_INTERPRETER_BWD = BwdConfig(64, 64, 64, 64, 1, 1)
_INTERPRETER_SHORT_BWD = ShortBwdConfig(64, 1, 1)

_FWD_CANDIDATES: Sequence[FwdConfig] = (
    FwdConfig(128, 64, 8, 3), FwdConfig(128, 64, 4, 3), FwdConfig(128, 128, 8, 3), FwdConfig(128, 32, 4, 3),
    FwdConfig(64, 64, 4, 3), FwdConfig(64, 32, 4, 2), FwdConfig(32, 64, 4, 2), FwdConfig(32, 32, 4, 2),
    FwdConfig(32, 32, 2, 2), FwdConfig(16, 32, 4, 2),
)
_BWD_CANDIDATES: Sequence[BwdConfig] = (
    BwdConfig(32, 64, 64, 32, 4, 3), BwdConfig(32, 64, 64, 32, 4, 2), BwdConfig(64, 64, 64, 64, 8, 2),
    BwdConfig(32, 128, 128, 32, 8, 2), BwdConfig(32, 128, 128, 32, 4, 3), BwdConfig(64, 64, 64, 64, 4, 2),
    BwdConfig(32, 64, 32, 32, 4, 2), BwdConfig(32, 32, 32, 32, 4, 2), BwdConfig(16, 32, 32, 16, 4, 2),
)
_SHORT_BWD_CANDIDATES: Sequence[ShortBwdConfig] = (
    ShortBwdConfig(32, 4, 2), ShortBwdConfig(64, 4, 2), ShortBwdConfig(64, 4, 3), ShortBwdConfig(32, 2, 2),
    ShortBwdConfig(64, 8, 2), ShortBwdConfig(128, 8, 2),
)


def _bucket(n: int) -> int:
    """Problem-size class of a sequence length for tuning (lengths 17..32 share one)."""
    return max(16, next_power_of_2(n))


# The built-in choices below are the fastest candidates measured on an H100 (bf16, D = 64, see
# benchmarks/notes_attention.md); register and shared-memory use was checked for D up to 128.

def _fwd_config(d: int, lq: int, lk: int, dtype: torch.dtype) -> FwdConfig:
    """Built-in forward blocks for sm_90."""
    if dtype == torch.float32:  # float32 dots run on the FMA units: small tiles, fewer registers
        return FwdConfig(32, 32, 4, 2)
    bucket = _bucket(lq)
    if bucket >= 1024:
        return FwdConfig(64, 64, 4, 3)
    if bucket >= 128:
        return FwdConfig(128, 32, 4, 3)
    if bucket == 64:
        return FwdConfig(64, 32, 4, 2)
    return FwdConfig(bucket, 32, 2, 2)


def _bwd_config(d: int, lq: int, lk: int, dtype: torch.dtype) -> BwdConfig:
    """Built-in blocks of the two-kind backward for sm_90."""
    if dtype == torch.float32:
        return BwdConfig(32, 32, 32, 32, 4, 2)
    return BwdConfig(32, 64, 64, 32, 4, 3)


def _short_bwd_config(d: int, lq: int, lk: int, dtype: torch.dtype) -> ShortBwdConfig:
    """Built-in blocks of the one-program-per-head backward for sm_90."""
    if dtype == torch.float32 or d > 64 or lq > 32:
        return ShortBwdConfig(32, 4, 2)  # 64 x 64 float32 tiles would spill
    return ShortBwdConfig(64 if lk > 32 else 32, 4, 2)


def _autotuning() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") == "1" and not interpreting()


def _fits(lq: int, lk: int, block_q: int, block_k: int) -> bool:
    return block_q <= _bucket(lq) and block_k <= _bucket(lk)


# ============================================================================================
# Host wrappers
# ============================================================================================

def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products (no tf32) so that GPU and interpreter agree.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _kpm_args(kpm: Optional[Tensor], like: Tensor) -> Tuple[Tensor, int, int]:
    if kpm is None:
        return like, 0, 0  # never read: HAS_KPM is False
    kpm = kpm.view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1)


def _needs_rng64(b: int, h: int, lq: int, lk: int) -> bool:
    return b * h * lq * lk >= 2**31


def _forward(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], causal: bool,
             dropout_p: float, scale: float, seed: int) -> Tuple[Tensor, Tensor]:
    """Output (B, H, Lq, D) in q's dtype and the base-2 log-sum-exp (B, H, Lq) float32."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    out = new_output((batch, heads, lq, d), q.dtype, q.device, order=(0, 2, 1, 3))
    lse = new_output((batch, heads, lq), torch.float32, q.device)
    kpm_arg, stride_mb, stride_mn = _kpm_args(kpm, q)

    def launch(cfg: FwdConfig) -> None:
        grid = (cdiv(lq, cfg.block_m), heads, batch)
        _attn_fwd_kernel[grid](
            q, k, v, kpm_arg, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), stride_mb, stride_mn,
            heads, lq, lk, scale * _LOG2E, seed, dropout_p,
            HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_KPM=kpm is not None, CAUSAL=causal,
            DROPOUT=dropout_p > 0.0, RNG64=_needs_rng64(batch, heads, lq, lk),
            DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if interpreting():
        cfg = _INTERPRETER_FWD
    elif _autotuning():
        key = ("attn_fwd", d, q.dtype, _bucket(lq), _bucket(lk), kpm is not None, causal, dropout_p > 0)
        cands = [c for c in _FWD_CANDIDATES if _fits(lq, lk, c.block_m, c.block_n)] or [_fwd_config(d, lq, lk, q.dtype)]
        cfg = tune(key, cands, launch)
    else:
        cfg = _fwd_config(d, lq, lk, q.dtype)
    launch(cfg)
    return out, lse


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              kpm: Optional[Tensor], causal: bool, dropout_p: float, scale: float,
              seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes and dtype of q, k, v) for the upstream gradient ``grad_out``."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    dq = new_output(q.shape, q.dtype, q.device, order=(0, 2, 1, 3))
    dk = new_output(k.shape, k.dtype, k.device, order=(0, 2, 1, 3))
    dv = new_output(v.shape, v.dtype, v.device, order=(0, 2, 1, 3))
    kpm_arg, stride_mb, stride_mn = _kpm_args(kpm, q)
    consts = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_KPM=kpm is not None, CAUSAL=causal,
                  DROPOUT=dropout_p > 0.0, RNG64=_needs_rng64(batch, heads, lq, lk),
                  DOT_PRECISION=_dot_precision(q.dtype))
    scalars = (heads, lq, lk, scale, scale * _LOG2E, seed, dropout_p)
    key = (d, q.dtype, _bucket(lq), _bucket(lk), kpm is not None, causal, dropout_p > 0)

    # float32 tiles of 64 queries spill registers in the one-program form: those take the other.
    if lq <= (SHORT_Q_MAX if q.dtype != torch.float32 else min(SHORT_Q_MAX, 32)):
        def launch_short(cfg: ShortBwdConfig) -> None:
            _attn_bwd_short_kernel[(1, heads, batch)](
                q, k, v, kpm_arg, out, grad_out, lse, dq, dk, dv,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
                *dq.stride(), *dk.stride(), *dv.stride(), stride_mb, stride_mn, *scalars,
                **consts, BLOCK_M=_bucket(lq), BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

        if interpreting():
            short_cfg = _INTERPRETER_SHORT_BWD
        elif _autotuning():
            cands = [c for c in _SHORT_BWD_CANDIDATES if c.block_n <= _bucket(lk)]
            short_cfg = tune(("attn_bwd_short",) + key, cands or [_short_bwd_config(d, lq, lk, q.dtype)],
                             launch_short)
        else:
            short_cfg = _short_bwd_config(d, lq, lk, q.dtype)
        launch_short(short_cfg)
        return dq, dk, dv

    delta = new_output((batch, heads, lq), torch.float32, q.device)
    delta_block = 32 if interpreting() else 64
    _attn_bwd_delta_kernel[(cdiv(lq, delta_block), heads, batch)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, lq,
        HEAD_DIM=d, BLOCK_D=consts["BLOCK_D"], BLOCK_M=delta_block,
    )

    def launch(cfg: BwdConfig) -> None:
        grid = (cdiv(lk, cfg.block_n1) + cdiv(lq, cfg.block_m2), heads, batch)
        _attn_bwd_kernel[grid](
            q, k, v, kpm_arg, grad_out, lse, delta, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(), stride_mb, stride_mn, *scalars, **consts,
            BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if interpreting():
        cfg = _INTERPRETER_BWD
    elif _autotuning():
        cands = [c for c in _BWD_CANDIDATES
                 if _fits(lq, lk, c.block_m1, c.block_n1) and _fits(lq, lk, c.block_m2, c.block_n2)]
        cfg = tune(("attn_bwd",) + key, cands or [_bwd_config(d, lq, lk, q.dtype)], launch)
    else:
        cfg = _bwd_config(d, lq, lk, q.dtype)
    launch(cfg)
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], causal: bool,
                dropout_p: float, scale: float) -> Tensor:
        seed = draw_seed(q.device) if dropout_p > 0.0 else 0
        out, lse = _forward(q, k, v, kpm, causal, dropout_p, scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed = causal, dropout_p, scale, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, kpm, ctx.causal, ctx.dropout_p,
                               ctx.scale, ctx.seed)
        return dq, dk, dv, None, None, None, None


# ============================================================================================
# Public API
# ============================================================================================

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
    if need_weights:
        return "need_weights=True: the fused kernel never materialises the probabilities"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D (B, H, L, D) tensor"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16 or float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if not (q.device == k.device == v.device):
        return f"q, k and v are on different devices ({q.device}, {k.device}, {v.device})"
    batch, heads, lq, d = q.shape
    if k.shape[:2] != (batch, heads) or v.shape[:3] != k.shape[:3]:
        return f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[3] != d or v.shape[3] != d:
        return f"q, k and v head dims differ ({d}, {k.shape[3]}, {v.shape[3]})"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} is larger than {MAX_HEAD_DIM}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    if batch > _MAX_GRID_YZ or heads > _MAX_GRID_YZ:
        return f"batch ({batch}) or heads ({heads}) above the launch-grid limit {_MAX_GRID_YZ}"
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            return f"key_padding_mask must be (B, Lk) = {(batch, k.shape[2])}"
        if key_padding_mask.device != q.device:
            return f"key_padding_mask is on {key_padding_mask.device}, inputs on {q.device}"
    if not 0.0 <= float(dropout_p) < 1.0:
        return f"dropout_p must be in [0, 1), got {dropout_p}"
    return None


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
    """Fused ``softmax(q k^T * scale + mask) v`` with autograd (see :mod:`blip_fast.ops`).

    Args:
        q: (B, H, Lq, D); k, v: (B, H, Lk, D); float16, bfloat16 or float32, any strides.
        key_padding_mask: optional (B, Lk), True (non-zero) where the key is kept.
        causal: bottom-right aligned causal mask.
        dropout_p: dropout on the probabilities (seeded from torch's CPU generator).
        scale: score scale, default ``D ** -0.5``.
        need_weights: must be False (see :func:`why_not_attention`).

    Returns:
        (B, H, Lq, D) in the input dtype, stored as (B, Lq, H, D); rows with no kept key are 0.
    """
    reason = why_not_attention(q, k, v, key_padding_mask, causal, dropout_p, scale, need_weights)
    if reason is not None:
        raise ValueError(f"triton attention cannot run this call: {reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    return _FusedAttention.apply(q, k, v, kpm, bool(causal), float(dropout_p), scale)


def dropout_keep_mask(seed: int, batch: int, heads: int, lq: int, lk: int, p: float,
                      device: torch.device | str = "cuda") -> Tensor:
    """The (B, H, Lq, Lk) bool keep mask the attention kernels use for dropout with ``seed``.

    For tests and debugging: after ``torch.manual_seed(s)``, :func:`common.draw_seed` returns
    the seed the next attention call will use.
    """
    mask = torch.empty((batch, heads, lq, lk), dtype=torch.uint8, device=device)
    block_m, block_n = 32, 32
    _dropout_mask_kernel[(cdiv(lq, block_m), heads, batch)](
        mask, heads, lq, lk, seed, float(p),
        RNG64=_needs_rng64(batch, heads, lq, lk), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return mask.bool()
