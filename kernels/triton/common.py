"""Helpers shared by the Triton kernels: launch-size helpers, dropout seeds and the RNG mask.

Dropout in the kernels is counter-based (Philox through ``tl.rand``): the keep mask of element
``i`` is a pure function of ``(seed, i)``, so the backward pass regenerates it instead of
storing it, and recomputation under activation checkpointing gives the same mask as long as the
same seed is passed.
"""
from __future__ import annotations

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
