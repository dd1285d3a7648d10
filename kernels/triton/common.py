"""Helpers shared by the Triton kernels: launch-size helpers, dropout seeds and the RNG mask.

Dropout in the kernels is counter-based (Philox through ``tl.rand``): the keep mask of element
``i`` is a pure function of ``(seed, i)``, so the backward pass regenerates it instead of
storing it, and recomputation under activation checkpointing gives the same mask as long as the
same seed is passed.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Dict, Hashable, Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl


def next_power_of_2(n: int) -> int:
    """Smallest power of 2 >= n (0 for n <= 0), like ``triton.next_power_of_2``.

    Plain Python: recent triton wraps its own in a JIT object that costs microseconds per call,
    and these run on every launch.
    """
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (plain Python, see :func:`next_power_of_2`)."""
    return -(-a // b)


def draw_seed(device: torch.device) -> int:
    """A dropout seed drawn from torch's RNG (reproducible under ``torch.manual_seed``).

    Drawn on the CPU generator so that no device-to-host synchronisation is needed.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "a dropout seed drawn on the host during CUDA-graph capture would replay the same mask on "
            "every step. Fix: capture with dropout off in the Triton kernels (eval mode or p=0), or use a "
            "backend whose dropout draws from torch's CUDA generator (sdpa / reference)")
    return int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())


@triton.jit
def dropout_keep(seed, offsets, p):
    """Boolean keep mask for dropout with probability ``p`` at element ``offsets``."""
    return tl.rand(seed, offsets) >= p


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant on the CPU interpreter).

    Used to size persistent grids, e.g. the per-program partial sums of a parameter gradient.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_warps(block: int) -> int:
    """``num_warps`` for a kernel that reduces one row of ``block`` (a power of 2) elements."""
    if block >= 16384:
        return 16
    if block >= 4096:
        return 8
    if block >= 1024:
        return 4
    return 2



# --------------------------------------------------------------------------------------------
# Launch-side helpers
# --------------------------------------------------------------------------------------------

#: When True, :func:`new_output` fills buffers with NaN so that tests catch elements a kernel
#: forgot to write. Toggle with :func:`poison_outputs`.
POISON_OUTPUTS = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the context, output buffers from :func:`new_output` start as NaN (for tests)."""
    global POISON_OUTPUTS
    previous, POISON_OUTPUTS = POISON_OUTPUTS, enabled
    try:
        yield
    finally:
        POISON_OUTPUTS = previous


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
               order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """An uninitialised kernel output of logical ``shape``.

    ``order`` lays memory out as ``shape`` permuted by ``order`` (outermost first) and returns
    the view in logical order; e.g. ``order=(0, 2, 1, 3)`` stores a ``(B, H, L, D)`` tensor as
    ``(B, L, H, D)``, which a following ``transpose(1, 2).reshape(B, L, H * D)`` reads for free.
    """
    order = tuple(range(len(shape))) if order is None else tuple(order)
    physical = [shape[i] for i in order]
    if POISON_OUTPUTS:
        buf = torch.full(physical, float("nan"), dtype=dtype, device=device)
    else:
        buf = torch.empty(physical, dtype=dtype, device=device)
    inverse = [order.index(i) for i in range(len(shape))]
    return buf.permute(inverse)


def interpreting() -> bool:
    """True when kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Tiling helpers (device side)
# --------------------------------------------------------------------------------------------

@triton.jit
def tile_ptrs(base, offs_r, offs_c, stride_r, stride_c):
    """Pointers to the tile ``base[offs_r, offs_c]`` of a strided 2-D view."""
    return base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c


@triton.jit
def load_tile(ptrs, offs_r, offs_c, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a pointer tile from :func:`tile_ptrs`; rows ``>= n_rows`` / columns ``>= n_cols`` read 0.

    The bounds checks are compile-time switches so that interior tiles load without predicates.
    """
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=offs_c[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(ptrs, value, offs_r, offs_c, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Store ``value`` (cast to the pointee type) through a pointer tile, skipping out-of-bounds."""
    value = value.to(ptrs.dtype.element_ty)
    if CHECK_ROWS and CHECK_COLS:
        tl.store(ptrs, value, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols))
    elif CHECK_ROWS:
        tl.store(ptrs, value, mask=offs_r[:, None] < n_rows)
    elif CHECK_COLS:
        tl.store(ptrs, value, mask=offs_c[None, :] < n_cols)
    else:
        tl.store(ptrs, value)


# --------------------------------------------------------------------------------------------
# Launch-configuration tuning (host side)
# --------------------------------------------------------------------------------------------

_TUNED: Dict[Hashable, Any] = {}


def tune(key: Hashable, candidates: Sequence[Any], launch: Callable[[Any], None]) -> Any:
    """The fastest of ``candidates`` for ``key``, timing ``launch(candidate)`` on first use.

    ``launch`` must be idempotent (the kernel fully rewrites its outputs). Candidates that fail
    to compile or run (e.g. out of shared memory) are skipped. The choice is cached per process.
    """
    if key not in _TUNED:
        from triton.testing import do_bench

        best, best_ms = None, float("inf")
        for cand in candidates:
            try:
                ms = do_bench(lambda: launch(cand), warmup=5, rep=25)
            except Exception:  # noqa: BLE001 - an unusable config is simply not a candidate
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        if best is None:
            raise RuntimeError(f"no launch configuration works for {key!r}")
        _TUNED[key] = best
    return _TUNED[key]


def tuned_configs() -> Dict[Hashable, Any]:
    """A copy of the configurations :func:`tune` picked so far (for benchmarks and logs)."""
    return dict(_TUNED)
