"""Timing, statistics and memory helpers.

On CUDA every step is bracketed by a device synchronisation and a pair of CUDA events (the
event time is the reported step time; the host wall time is kept as a cross-check). On the CPU
the host clock (``time.perf_counter``) is used. Peak memory is ``torch.cuda.max_memory_allocated``
after a per-case reset; on the CPU it is the process's peak resident set size (``VmHWM``, reset
per case through ``/proc/self/clear_refs`` where the kernel allows it, else the current RSS).
"""
from __future__ import annotations

import gc
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty sequence."""
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
    """Median, p10/p90, quartiles, mean, min, max and standard deviation of step times (ms)."""
    n = len(times_ms)
    mean = sum(times_ms) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in times_ms) / (n - 1)) if n > 1 else 0.0
    return {
        "median_ms": percentile(times_ms, 50), "p10_ms": percentile(times_ms, 10),
        "p90_ms": percentile(times_ms, 90), "p25_ms": percentile(times_ms, 25),
        "p75_ms": percentile(times_ms, 75), "mean_ms": mean, "min_ms": min(times_ms),
        "max_ms": max(times_ms), "std_ms": std,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """Run ``fn`` once; return ``{'ms': step time, 'wall_ms': host wall time}``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        return {"ms": float(start.elapsed_time(end)), "wall_ms": wall}
    t0 = time.perf_counter()
    fn()
    wall = (time.perf_counter() - t0) * 1e3
    return {"ms": wall, "wall_ms": wall}


# -- memory --------------------------------------------------------------------------------------
def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_memory(device: torch.device) -> str:
    """Reset the peak-memory counter; returns what :func:`peak_memory` will report."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:  # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) of the process.
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return "rss_peak"
    except OSError:
        return "rss_current"


def peak_memory(device: torch.device, kind: str) -> Optional[int]:
    """Peak bytes since :func:`reset_peak_memory` (see its ``kind``)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    kb = _read_status_kb("VmHWM" if kind == "rss_peak" else "VmRSS")
    return None if kb is None else kb * 1024


def free_memory(device: torch.device) -> None:
    """Collect garbage and give cached device blocks back (between cases and workloads)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text.lower()
        or isinstance(exc, MemoryError))


# -- the bf16 matmul ceiling ----------------------------------------------------------------------
def matmul_rate(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                warmup: int = 3, reps: int = 20) -> Dict[str, float]:
    """Median rate of an ``n x n x n`` matrix product on random data (TFLOP/s)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    times: List[float] = [time_step(lambda: torch.matmul(a, b, out=out), device)["ms"] for _ in range(reps)]
    stats = summarize(times)
    flops = 2.0 * n ** 3
    del a, b, out
    free_memory(device)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "median_ms": stats["median_ms"],
            "p10_ms": stats["p10_ms"], "p90_ms": stats["p90_ms"],
            "tflops": flops / (stats["median_ms"] * 1e-3) / 1e12}


def cpu_threads() -> int:
    return torch.get_num_threads() or os.cpu_count() or 1
