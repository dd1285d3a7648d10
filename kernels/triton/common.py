"""Helpers shared by the Triton kernels: launch-size helpers, dropout seeds and the RNG mask.

Dropout in the kernels is counter-based (Philox through ``tl.rand``): the keep mask of element
``i`` is a pure function of ``(seed, i)``, so the backward pass regenerates it instead of
storing it, and recomputation under activation checkpointing gives the same mask as long as the
same seed is passed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def draw_seed(device: torch.device) -> int:
    """A dropout seed drawn from torch's RNG (reproducible under ``torch.manual_seed``).

    Drawn on the CPU generator so that no device-to-host synchronisation is needed.
    """
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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side launch arithmetic (``triton.cdiv`` is a slower jit wrapper)."""
    return -(-a // b)
