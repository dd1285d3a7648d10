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
    is a one-element int64 tensor drawn by torch's generator of the inputs' device and read by the
    kernels from memory: ``torch.manual_seed`` makes runs reproducible, a replayed CUDA graph
    draws a fresh seed each time, and activation checkpointing recomputes with the same one.
    :func:`dropout_keep_mask` returns the mask of a seed for tests and debugging.

Launches
    Each call looks up a launch plan (blocks, grid, constexprs) by a small key of what the kernel
    specialises on, and launches the compiled kernel directly (:class:`common.KernelLauncher`).
    Under ``torch.compile`` the public function calls the ``blip_fast::attention_fwd`` /
    ``attention_bwd`` custom ops instead of the autograd.Function.

Layouts
    Inputs are read through their strides (any layout, e.g. q/k/v slices of a fused qkv
    projection, with no copy). The output and the gradients are ``(B, H, L, D)`` views of
    ``(B, L, H, D)`` memory, so the usual ``transpose(1, 2).reshape(B, L, H * D)`` that follows is
    free.
"""
from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .common import (
    KernelLauncher,
    LaunchPlan,
    align16,
    cdiv,
    compiling,
    draw_seed,
    dropout_keep,
    interpreting,
    load_tile,
    new_output,
    next_power_of_2,
    seed_tensor,
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
def _load_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed, read from device memory (graph replays see fresh seeds); 0 unused."""
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    return seed


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
    Q, K, V, KPM, SEED, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, Lq, Lk, qk_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), H, B)``. Q: (B, H, Lq, D), K/V: (B, H, Lk, D), KPM: (B, Lk)
    bool, SEED: one int64 (read only with DROPOUT), Out: (B, H, Lq, D) in the input dtype, LSE: (B, H, Lq) float32 contiguous (base 2,
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
    seed = _load_seed(SEED, DROPOUT)

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
def _bwd_dkdv_inner(dk, dv, k, v, key_keep, q_base, do_base, o_base, lse_base, delta_base,
                    stride_qm, stride_qd, stride_gm, stride_gd, stride_om, stride_od, k_pos, rng_cols,
                    lo, hi, Lq, Lk, qk_scale, seed, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                    INLINE_DELTA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, BLOCK_D) float32 of one key block over query blocks [lo, hi).

    Works on transposed tiles (keys along rows) so that no probability tile is transposed.
    q_base, do_base, lse_base, delta_base: scalar pointers to query 0 of this (b, h); k_pos:
    (BLOCK_N, 1) key index minus the causal shift; rng_cols: (BLOCK_N, 1) dropout counters of
    (query 0, key). Query rows past Lq load q = dO = 0 and lse = +inf, hence p = 0: they need
    no mask. Key rows past Lk only produce garbage in rows of dK/dV that are never stored.
    With INLINE_DELTA, ``delta = rowsum(dO * O)`` of each query block is recomputed here from
    the output (o_base) instead of read from a buffer a separate kernel filled.
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
        if INLINE_DELTA:
            o = load_tile(tile_ptrs(o_base, offs_m, offs_d, stride_om, stride_od), offs_m, offs_d,
                          Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        else:
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
def _bwd_dkdv_program(start_n, b, h, Q, K, V, KPM, Out, DO, LSE, Delta, DK, DV,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_ob, stride_oh, stride_om, stride_od,
                      stride_gb, stride_gh, stride_gm, stride_gd,
                      stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                      stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                      stride_mb, stride_mn,
                      H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                      RNG64: tl.constexpr, INLINE_DELTA: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    o_base = Out + b64 * stride_ob + h64 * stride_oh
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
            dk, dv, k, v, key_keep, q_base, do_base, o_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_gm, stride_gd, stride_om, stride_od, k_pos, rng_cols,
            lo, full, Lq, Lk, qk_scale, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, True,
            HAS_KPM, DROPOUT, INLINE_DELTA, DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, key_keep, q_base, do_base, o_base, lse_base, delta_base,
        stride_qm, stride_qd, stride_gm, stride_gd, stride_om, stride_od, k_pos, rng_cols,
        full, Lq, Lq, Lk, qk_scale, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, False,
        HAS_KPM, DROPOUT, INLINE_DELTA, DOT_PRECISION)
    dk_ptrs = tile_ptrs(DK + b64 * stride_dkb + h64 * stride_dkh, offs_n, offs_d, stride_dkn, stride_dkd)
    dv_ptrs = tile_ptrs(DV + b64 * stride_dvb + h64 * stride_dvh, offs_n, offs_d, stride_dvn, stride_dvd)
    store_tile(dk_ptrs, dk * sm_scale, offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    store_tile(dv_ptrs, dv, offs_n, offs_d, Lk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)


@triton.jit
def _bwd_dq_program(start_m, b, h, Q, K, V, KPM, Out, DO, LSE, Delta, DQ,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_gb, stride_gh, stride_gm, stride_gd,
                    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                    stride_mb, stride_mn,
                    H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                    RNG64: tl.constexpr, INLINE_DELTA: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    if INLINE_DELTA:
        o = load_tile(tile_ptrs(Out + b64 * stride_ob + h64 * stride_oh, offs_m, offs_d, stride_om, stride_od),
                      offs_m, offs_d, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
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
    Q, K, V, KPM, SEED, Out, DO, LSE, Delta, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    H, Lq, Lk, sm_scale, qk_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr,
    INLINE_DELTA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    """Grid ``(cdiv(Lk, BLOCK_N1) + cdiv(Lq, BLOCK_M2), H, B)``: programs below
    ``cdiv(Lk, BLOCK_N1)`` write dK, dV of one key block; the others write dQ of one query block.
    Shapes as in the forward; Out is the forward output (read for delta when INLINE_DELTA, else
    Delta holds ``rowsum(dO * O)`` from :func:`_attn_bwd_delta_kernel`); DO may have any
    strides; DQ/DK/DV are in the input dtype."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seed = _load_seed(SEED, DROPOUT)
    n_key_blocks = tl.cdiv(Lk, BLOCK_N1)
    if pid < n_key_blocks:
        _bwd_dkdv_program(
            pid * BLOCK_N1, b, h, Q, K, V, KPM, Out, DO, LSE, Delta, DK, DV,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
            stride_gb, stride_gh, stride_gm, stride_gd,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_mb, stride_mn, H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
            HEAD_DIM, BLOCK_D, HAS_KPM, CAUSAL, DROPOUT, RNG64, INLINE_DELTA, DOT_PRECISION,
            BLOCK_M1, BLOCK_N1)
    else:
        _bwd_dq_program(
            (pid - n_key_blocks) * BLOCK_M2, b, h, Q, K, V, KPM, Out, DO, LSE, Delta, DQ,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
            stride_gb, stride_gh, stride_gm, stride_gd,
            stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_mb, stride_mn,
            H, Lq, Lk, sm_scale, qk_scale, seed, dropout_p,
            HEAD_DIM, BLOCK_D, HAS_KPM, CAUSAL, DROPOUT, RNG64, INLINE_DELTA, DOT_PRECISION,
            BLOCK_M2, BLOCK_N2)


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
    Q, K, V, KPM, SEED, Out, DO, LSE, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    H, Lq, Lk, sm_scale, qk_scale, dropout_p,
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
    seed = _load_seed(SEED, DROPOUT)
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
def _dropout_mask_kernel(Mask, SEED, H, Lq, Lk, dropout_p,
                         RNG64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Lq, BLOCK_M), H, B)``: Mask (B, H, Lq, Lk) uint8 contiguous, 1 = kept."""
    seed = tl.load(SEED)
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

class FwdConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


class BwdConfig(NamedTuple):
    """Blocks of the two-kind backward (:func:`_attn_bwd_kernel`)."""

    block_m1: int  # query block of the dK/dV programs
    block_n1: int  # key block owned by a dK/dV program
    block_m2: int  # query block owned by a dQ program
    block_n2: int  # key block of the dQ programs
    num_warps: int = 4
    num_stages: int = 2


class ShortBwdConfig(NamedTuple):
    """Blocks of the one-program-per-head backward (:func:`_attn_bwd_short_kernel`); its query
    block is ``Lq`` rounded up to a power of two."""

    block_n: int
    num_warps: int = 4
    num_stages: int = 2


#: Largest Lq that takes the one-program-per-head backward (text self/cross-attention). Longer
#: query sequences need several programs per head for parallelism and registers.
SHORT_Q_MAX = 64
#: Let the two-kind backward recompute ``delta = rowsum(dO * O)`` inside its programs instead of
#: running a separate kernel for it (one launch and one pass over dO and O fewer), where the
#: registers allow (16-bit inputs with D <= 64: no spills for sm_90; at D = 128 or in float32
#: the extra tile spills, see tests/compile_check_attention.py). Off: measured on an H100 the
#: extra O loads in the dK/dV loop cost more than the separate kernel (bf16, D = 64: backward
#: 431 us with it vs 387 us kernel + delta without at L = 577; 156 vs 149 us at L = 197;
#: benchmarks/RESULTS.md, "Kernels").
INLINE_DELTA = False
INLINE_DELTA_MAX_D = 64

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
    BwdConfig(64, 128, 128, 64, 8, 2), BwdConfig(64, 128, 128, 32, 8, 3),
    BwdConfig(32, 64, 32, 32, 4, 2), BwdConfig(32, 32, 32, 32, 4, 2), BwdConfig(16, 32, 32, 16, 4, 2),
)
_SHORT_BWD_CANDIDATES: Sequence[ShortBwdConfig] = (
    ShortBwdConfig(32, 4, 2), ShortBwdConfig(64, 4, 2), ShortBwdConfig(64, 4, 3), ShortBwdConfig(32, 2, 2),
    ShortBwdConfig(64, 8, 2), ShortBwdConfig(128, 8, 2),
)

#: Configurations forced by benchmarks (``{"fwd": FwdConfig, "bwd": BwdConfig, "short": ...}``);
#: call :func:`clear_plans` after changing it.
CONFIG_OVERRIDES: Dict[str, object] = {}


def _bucket(n: int) -> int:
    """Problem-size class of a sequence length for tuning (lengths 17..32 share one)."""
    return max(16, next_power_of_2(n))


# The built-in choices below are the fastest candidates measured on an H100 (bf16, D = 64, see
# benchmarks/notes_attention.md). At D = 128 they are the D = 64 blocks that compile without
# register spills for sm_90 (ptxas through tests/compile_check_attention.py).

def _fwd_config(d: int, lq: int, lk: int, dtype: torch.dtype) -> FwdConfig:
    """Built-in forward blocks for sm_90."""
    if dtype == torch.float32:  # float32 dots run on the FMA units: small tiles, fewer registers
        return FwdConfig(32, 32, 4, 2)
    bucket = _bucket(lq)
    if d > 64:
        return FwdConfig(128, 32, 8, 3) if bucket >= 128 else FwdConfig(min(bucket, 64), 32, 4, 3)
    if bucket >= 1024:
        return FwdConfig(64, 64, 4, 3)
    if bucket >= 128:
        return FwdConfig(128, 32, 4, 3)
    if bucket == 64:
        return FwdConfig(64, 32, 4, 2)
    return FwdConfig(bucket, 32, 2, 2)


def _bwd_config(d: int, lq: int, lk: int, dtype: torch.dtype) -> BwdConfig:
    """Built-in blocks of the two-kind backward for sm_90."""
    if dtype == torch.float32 or d > 64:
        return BwdConfig(32, 32, 32, 32, 4, 2)
    return BwdConfig(32, 64, 64, 32, 4, 3)


def _short_bwd_config(d: int, lq: int, lk: int, dtype: torch.dtype) -> ShortBwdConfig:
    """Built-in blocks of the one-program-per-head backward for sm_90."""
    if d > 64 and dtype != torch.float32:
        return ShortBwdConfig(32, 8, 2) if lq <= 32 else ShortBwdConfig(16, 8, 2)
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
#
# The launch path is the host-time budget of every eager step: each call builds a small key of
# what the kernel specialises on (dtype, shapes, strides, 16-byte alignment, mask and dropout
# flags), finds the launch plan made for it (blocks, grid, constexprs, and after the first launch
# the compiled kernel, launched directly: see common.KernelLauncher), allocates its outputs with
# one call each and launches. On the CPU interpreter, where tests patch the block choices, plans
# are rebuilt on every call.

_INTERPRET = interpreting()  # fixed at import, as triton's @jit decided it for the kernels
_FWD = KernelLauncher(_attn_fwd_kernel)
_BWD = KernelLauncher(_attn_bwd_kernel)
_BWD_SHORT = KernelLauncher(_attn_bwd_short_kernel)
_BWD_DELTA = KernelLauncher(_attn_bwd_delta_kernel)
_FWD_PLANS: Dict[tuple, LaunchPlan] = {}
_BWD_PLANS: Dict[tuple, LaunchPlan] = {}
_MAX_PLANS = 4096  # distinct shapes; past it the caches start over
_OUT_ORDER = (0, 2, 1, 3)  # (B, H, L, D) tensors stored as (B, L, H, D)


def clear_plans() -> None:
    """Forget every launch plan (after changing :data:`CONFIG_OVERRIDES` or block choices)."""
    _FWD_PLANS.clear()
    _BWD_PLANS.clear()


def _remember(plans: Dict[tuple, LaunchPlan], key: tuple, plan: LaunchPlan) -> LaunchPlan:
    if not _INTERPRET:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plans[key] = plan
    return plan


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products (no tf32) so that GPU and interpreter agree.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _needs_rng64(b: int, h: int, lq: int, lk: int) -> bool:
    return b * h * lq * lk >= 2**31


def _mask_key(kpm: Optional[Tensor]):
    return None if kpm is None else (kpm.stride(), kpm.dtype, align16(kpm))


def _fwd_plan(key: tuple, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], causal: bool,
              dropout: bool, launch_args) -> LaunchPlan:
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    consts = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_KPM=kpm is not None, CAUSAL=causal,
                  DROPOUT=dropout, RNG64=_needs_rng64(batch, heads, lq, lk),
                  DOT_PRECISION=_dot_precision(q.dtype))

    def plan_for(cfg: FwdConfig) -> LaunchPlan:
        return LaunchPlan((cdiv(lq, cfg.block_m), heads, batch),
                          dict(consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                          cfg.num_warps, cfg.num_stages)

    if _INTERPRET:
        cfg = _INTERPRETER_FWD
    elif "fwd" in CONFIG_OVERRIDES:
        cfg = CONFIG_OVERRIDES["fwd"]
    elif _autotuning():
        tune_key = ("attn_fwd", d, q.dtype, _bucket(lq), _bucket(lk), kpm is not None, causal, dropout)
        cands = [c for c in _FWD_CANDIDATES if _fits(lq, lk, c.block_m, c.block_n)] or [_fwd_config(d, lq, lk, q.dtype)]
        cfg = tune(tune_key, cands, lambda c: _FWD(plan_for(c), launch_args()))
    else:
        cfg = _fwd_config(d, lq, lk, q.dtype)
    return _remember(_FWD_PLANS, key, plan_for(cfg))


def _forward(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], causal: bool,
             dropout_p: float, scale: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Output (B, H, Lq, D) in q's dtype, stored (B, Lq, H, D), and the base-2 log-sum-exp
    (B, H, Lq) float32. ``seed`` (one int64 on q's device) is read only when ``dropout_p > 0``."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    dropout = dropout_p > 0.0
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    ms = (0, 0) if kpm is None else kpm.stride()
    key = (q.get_device(), q.dtype, batch, heads, lq, lk, d, qs, ks, vs,
           align16(q), align16(k), align16(v), _mask_key(kpm), causal, dropout)
    out = new_output((batch, heads, lq, d), q.dtype, q.device, order=_OUT_ORDER)
    lse = new_output((batch, heads, lq), torch.float32, q.device)

    def launch_args():
        return (q, k, v, q if kpm is None else kpm, seed if dropout else q, out, lse,
                *qs, *ks, *vs, *out.stride(), *ms, heads, lq, lk, scale * _LOG2E, dropout_p)

    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _fwd_plan(key, q, k, v, kpm, causal, dropout, launch_args)
    _FWD(plan, launch_args())
    return out, lse


def _bwd_plan(key: tuple, q: Tensor, k: Tensor, kpm: Optional[Tensor], causal: bool,
              dropout: bool, short: bool, inline_delta: bool, launch_args) -> LaunchPlan:
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    consts = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_KPM=kpm is not None, CAUSAL=causal,
                  DROPOUT=dropout, RNG64=_needs_rng64(batch, heads, lq, lk))
    tune_key = (d, q.dtype, _bucket(lq), _bucket(lk), kpm is not None, causal, dropout)
    if short:
        def plan_for(cfg: ShortBwdConfig) -> LaunchPlan:
            return LaunchPlan((1, heads, batch),
                              dict(consts, DOT_PRECISION=_dot_precision(q.dtype),
                                   BLOCK_M=_bucket(lq), BLOCK_N=cfg.block_n),
                              cfg.num_warps, cfg.num_stages)

        if _INTERPRET:
            cfg = _INTERPRETER_SHORT_BWD
        elif "short" in CONFIG_OVERRIDES:
            cfg = CONFIG_OVERRIDES["short"]
        elif _autotuning():
            cands = [c for c in _SHORT_BWD_CANDIDATES if c.block_n <= _bucket(lk)]
            cfg = tune(("attn_bwd_short",) + tune_key, cands or [_short_bwd_config(d, lq, lk, q.dtype)],
                       lambda c: _BWD_SHORT(plan_for(c), launch_args()))
        else:
            cfg = _short_bwd_config(d, lq, lk, q.dtype)
        return _remember(_BWD_PLANS, key, plan_for(cfg))

    def plan_for(cfg: BwdConfig) -> LaunchPlan:
        delta_block = 32 if _INTERPRET else 64
        delta_plan = None if inline_delta else LaunchPlan(
            (cdiv(lq, delta_block), heads, batch),
            dict(HEAD_DIM=d, BLOCK_D=consts["BLOCK_D"], BLOCK_M=delta_block), 4)
        return LaunchPlan((cdiv(lk, cfg.block_n1) + cdiv(lq, cfg.block_m2), heads, batch),
                          dict(consts, INLINE_DELTA=inline_delta, DOT_PRECISION=_dot_precision(q.dtype),
                               BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1,
                               BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2),
                          cfg.num_warps, cfg.num_stages, extra=delta_plan)

    if _INTERPRET:
        cfg = _INTERPRETER_BWD
    elif "bwd" in CONFIG_OVERRIDES:
        cfg = CONFIG_OVERRIDES["bwd"]
    elif _autotuning():
        cands = [c for c in _BWD_CANDIDATES
                 if _fits(lq, lk, c.block_m1, c.block_n1) and _fits(lq, lk, c.block_m2, c.block_n2)]

        def trial(c: BwdConfig) -> None:
            plan = plan_for(c)
            args, delta_args = launch_args()
            if plan.extra is not None:
                _BWD_DELTA(plan.extra, delta_args)
            _BWD(plan, args)

        cfg = tune(("attn_bwd", inline_delta) + tune_key, cands or [_bwd_config(d, lq, lk, q.dtype)], trial)
    else:
        cfg = _bwd_config(d, lq, lk, q.dtype)
    return _remember(_BWD_PLANS, key, plan_for(cfg))


def _short_backward(q: Tensor) -> bool:
    # float32 tiles of 64 queries spill registers in the one-program form: those take the other.
    return q.shape[2] <= (SHORT_Q_MAX if q.dtype != torch.float32 else min(SHORT_Q_MAX, 32))


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              kpm: Optional[Tensor], causal: bool, dropout_p: float, scale: float,
              seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes and dtype of q, k, v, stored (B, L, H, D)) for ``grad_out``."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    dropout = dropout_p > 0.0
    short = _short_backward(q)
    inline_delta = INLINE_DELTA and (_INTERPRET or (d <= INLINE_DELTA_MAX_D and q.dtype != torch.float32))
    qs, ks, vs, os_, gs = q.stride(), k.stride(), v.stride(), out.stride(), grad_out.stride()
    ms = (0, 0) if kpm is None else kpm.stride()
    key = (q.get_device(), q.dtype, batch, heads, lq, lk, d, qs, ks, vs, os_, gs,
           align16(q), align16(k), align16(v), align16(out), align16(grad_out), _mask_key(kpm),
           causal, dropout, short, inline_delta)
    dq = new_output(q.shape, q.dtype, q.device, order=_OUT_ORDER)
    dk = new_output(k.shape, k.dtype, k.device, order=_OUT_ORDER)
    dv = new_output(v.shape, v.dtype, v.device, order=_OUT_ORDER)
    kpm_arg = q if kpm is None else kpm
    seed_arg = seed if dropout else q
    scalars = (heads, lq, lk, scale, scale * _LOG2E, dropout_p)
    delta = None

    if short:
        def launch_args():
            return (q, k, v, kpm_arg, seed_arg, out, grad_out, lse, dq, dk, dv,
                    *qs, *ks, *vs, *os_, *gs, *dq.stride(), *dk.stride(), *dv.stride(), *ms, *scalars)
    else:
        if not inline_delta:
            delta = new_output((batch, heads, lq), torch.float32, q.device)

        def launch_args():
            args = (q, k, v, kpm_arg, seed_arg, out, grad_out, lse, q if delta is None else delta,
                    dq, dk, dv, *qs, *ks, *vs, *os_, *gs, *dq.stride(), *dk.stride(), *dv.stride(),
                    *ms, *scalars)
            delta_args = None if delta is None else (out, grad_out, delta, *os_, *gs, heads, lq)
            return args, delta_args

    plan = _BWD_PLANS.get(key)
    if plan is None:
        plan = _bwd_plan(key, q, k, kpm, causal, dropout, short, inline_delta, launch_args)
    if short:
        _BWD_SHORT(plan, launch_args())
    else:
        args, delta_args = launch_args()
        if plan.extra is not None:
            _BWD_DELTA(plan.extra, delta_args)
        _BWD(plan, args)
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], seed: Optional[Tensor],
                causal: bool, dropout_p: float, scale: float) -> Tensor:
        out, lse = _forward(q, k, v, kpm, causal, dropout_p, scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, kpm, seed)
        ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, kpm, seed = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, kpm, ctx.causal, ctx.dropout_p,
                               ctx.scale, seed)
        return dq, dk, dv, None, None, None, None, None


# ============================================================================================
# Custom ops (torch.compile)
# ============================================================================================
#
# Under torch.compile the wrappers call these instead of the autograd.Function, so that the
# fused path traces into one graph with no breaks. Eager calls keep the autograd.Function:
# a custom op costs several times its host time per call. The dropout seed is an input tensor,
# drawn outside the op by torch's generator, so compiled graphs (and CUDA-graph replays of
# them) draw fresh masks the way eager does.

@torch.library.custom_op("blip_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], seed: Optional[Tensor],
                      causal: bool, dropout_p: float, scale: float) -> Tuple[Tensor, Tensor]:
    return _forward(q, k, v, kpm, causal, dropout_p, scale, seed)


@_attention_fwd_op.register_fake
def _(q, k, v, kpm, seed, causal, dropout_p, scale):
    batch, heads, lq, d = q.shape
    return (q.new_empty_strided(q.shape, _out_strides(q.shape)),
            q.new_empty((batch, heads, lq), dtype=torch.float32))


@torch.library.custom_op("blip_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      kpm: Optional[Tensor], seed: Optional[Tensor], causal: bool, dropout_p: float,
                      scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, kpm, causal, dropout_p, scale, seed)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, kpm, seed, causal, dropout_p, scale):
    return tuple(t.new_empty_strided(t.shape, _out_strides(t.shape)) for t in (q, k, v))


def _out_strides(shape) -> Tuple[int, ...]:
    batch, heads, length, d = shape
    return (length * heads * d, d, heads * d, 1)


def _fwd_op_setup(ctx, inputs, output):
    q, k, v, kpm, seed, causal, dropout_p, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale


def _fwd_op_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kpm, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(grad_out, q, k, v, out, lse, kpm, seed, ctx.causal,
                                   ctx.dropout_p, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)


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
        dropout_p: dropout on the probabilities (seeded from torch's generator of q's device,
            see :func:`common.draw_seed`).
        scale: score scale, default ``D ** -0.5``.
        need_weights: must be False (see :func:`why_not_attention`).

    Returns:
        (B, H, Lq, D) in the input dtype, stored as (B, Lq, H, D); rows with no kept key are 0.
    """
    reason = why_not_attention(q, k, v, key_padding_mask, causal, dropout_p, scale, need_weights)
    if reason is not None:
        raise ValueError(f"triton attention cannot run this call: {reason}")
    return attention_impl(q, k, v, key_padding_mask, causal, dropout_p, scale)


def attention_impl(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                   causal: bool = False, dropout_p: float = 0.0, scale: Optional[float] = None,
                   need_weights: bool = False) -> Tensor:
    """:func:`attention` without the argument checks, for callers that ran
    :func:`why_not_attention` already (the ``blip_fast.ops`` dispatcher)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kpm = key_padding_mask
    if kpm is not None and kpm.dtype != torch.bool:
        kpm = kpm != 0
    dropout_p = float(dropout_p)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    causal = bool(causal)
    if compiling():
        return _attention_fwd_op(q, k, v, kpm, seed, causal, dropout_p, scale)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FusedAttention.apply(q, k, v, kpm, seed, causal, dropout_p, scale)
    return _forward(q, k, v, kpm, causal, dropout_p, scale, seed)[0]


def dropout_keep_mask(seed: "int | Tensor", batch: int, heads: int, lq: int, lk: int, p: float,
                      device: torch.device | str = "cuda") -> Tensor:
    """The (B, H, Lq, Lk) bool keep mask the attention kernels use for dropout with ``seed``.

    For tests and debugging: after ``torch.manual_seed(s)``, :func:`common.draw_seed` returns
    the seed the next attention call will use.
    """
    device = torch.device(device)
    mask = torch.empty((batch, heads, lq, lk), dtype=torch.uint8, device=device)
    block_m, block_n = 32, 32
    _dropout_mask_kernel[(cdiv(lq, block_m), heads, batch)](
        mask, seed_tensor(seed, device), heads, lq, lk, float(p),
        RNG64=_needs_rng64(batch, heads, lq, lk), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return mask.bool()
