"""Measured attention timings: where ``auto`` may pick the ``flash_attn`` and ``xformers`` backends.

These two backends come after ``triton`` in :data:`~blip_fast.ops.AUTO_ORDER` and run kernels
that torch SDPA often runs too, so ``auto`` takes them only where a measurement on this GPU model
says they are the fastest choice for this kind of call, never on a guess. The measurements are
rows of eager milliseconds per call through :func:`blip_fast.ops.attention` under each backend, as
the models call it (host time included), written by the attention micro-benchmark
(``python -m benchmarks --kernels --sections attention`` writes ``attention_timings.json``;
``benchmarks/run_xformers_on_device.sh`` runs it with xformers installed).

:data:`ATTENTION_TIMINGS` holds the rows recorded in this repository (none yet: until a device run
is recorded, ``auto`` never picks these backends; an explicit request still runs them). The
environment variable ``BLIP_FAST_ATTENTION_TIMINGS=/path/to/attention_timings.json`` replaces
them with a measurement of your own.

A call matches the rows of the same GPU name, dtype, head dim, mask kind (key padding, causal),
self- or cross-attention (``Lq == Lk``) and mode (forward+backward when autograd records the call,
else forward); of those, the row with the nearest work ``4 B H Lq Lk D``, within a factor
:data:`MAX_WORK_RATIO`. A backend wins the call when its time there is below every other backend
that would take the call by :data:`MARGIN`.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional

import torch

Tensor = torch.Tensor

TIMINGS_ENV = "BLIP_FAST_ATTENTION_TIMINGS"
#: Backends whose ``auto`` use is decided by these rows.
LIBRARY_BACKENDS = ("flash_attn", "xformers")
#: A backend must be this much faster than the alternatives (timing noise of eager calls).
MARGIN = 0.05
#: A row speaks for calls with up to this factor more or less work.
MAX_WORK_RATIO = 2.0

#: Row keys (what ``attention_timings.json`` holds under "rows"; paste a device run's rows here).
ROW_KEYS = ("device", "dtype", "shape", "batch", "heads", "lq", "lk", "head_dim", "padding", "causal",
            "training", "ms", "source")
#: Recorded rows: dicts with :data:`ROW_KEYS`; "ms" maps backend names to eager milliseconds per
#: call through blip_fast.ops, "source" says the command, date and commit.
ATTENTION_TIMINGS: List[Dict[str, Any]] = []


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = data["rows"] if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of timing rows or {{'rows': [...]}}")
    return rows


def timing_rows() -> List[Dict[str, Any]]:
    """The rows in effect: the file named by ``BLIP_FAST_ATTENTION_TIMINGS``, else the recorded ones."""
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        return ATTENTION_TIMINGS
    try:
        return _load(path, os.path.getmtime(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{TIMINGS_ENV}={path!r} cannot be read as attention timings ({exc}); fix the "
                         f"file (python -m benchmarks --kernels --sections attention writes one) or unset it") from exc


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _training(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def select_row(rows: List[Dict[str, Any]], device: str, dtype: str, batch: int, heads: int, lq: int, lk: int,
               head_dim: int, padding: bool, causal: bool, training: bool) -> Optional[Dict[str, Any]]:
    """Of ``rows``, the one that speaks for this call (see the module docstring), or None."""
    work = 4.0 * batch * heads * lq * lk * head_dim
    best, best_dist = None, math.log(MAX_WORK_RATIO) + 1e-9
    for row in rows:
        if (row.get("device") != device or row.get("dtype") != dtype or row.get("head_dim") != head_dim
                or bool(row.get("padding")) != padding or bool(row.get("causal")) != causal
                or bool(row.get("training")) != training or (row["lq"] == row["lk"]) != (lq == lk)):
            continue
        dist = abs(math.log(work / (4.0 * row["batch"] * row["heads"] * row["lq"] * row["lk"] * row["head_dim"])))
        if dist <= best_dist:
            best, best_dist = row, dist
    return best


def matching_row(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                 training: bool) -> Optional[Dict[str, Any]]:
    """The measured row that speaks for this attention call, or None."""
    rows = timing_rows()
    if not rows or q.device.type != "cuda":
        return None
    batch, heads, lq, d = q.shape
    return select_row(rows, _device_name(q.device), str(q.dtype).replace("torch.", ""), batch, heads, lq,
                      k.shape[2], d, key_padding_mask is not None, bool(causal), training)


def slower_than(backend: str, row: Dict[str, Any], takes_call: Callable[[str], bool]) -> Optional[str]:
    """Why ``backend`` is not the pick at ``row``: a backend that ``takes_call`` measured faster
    by more than :data:`MARGIN`, or no time for ``backend``; None when it is the pick."""
    ms = row["ms"]
    mine = ms.get(backend)
    if mine is None:
        return f"{backend} was not measured at {_describe(row)}"
    for other, t in sorted(ms.items(), key=lambda item: (item[1] is None, item[1])):
        if other != backend and t is not None and t * (1.0 + MARGIN) < mine and takes_call(other):
            return f"measured slower than {other!r} at {_describe(row)}: {mine:.4f} vs {t:.4f} ms"
    return None


def _why_not_auto(name: str, *args, **kwargs) -> Optional[str]:
    from . import _dispatch
    try:
        backend = _dispatch.get_backend_object(name)
    except _dispatch.BackendUnavailableError as exc:
        return str(exc)
    # The library backends decide among themselves on their capability alone (their auto checks
    # would ask each other back).
    check = backend.why_not if name in LIBRARY_BACKENDS else backend.why_not_auto
    return check("attention", *args, **kwargs)


def _describe(row: Dict[str, Any]) -> str:
    return (f"{row.get('shape', '?')} (B={row['batch']} H={row['heads']} Lq={row['lq']} Lk={row['lk']} "
            f"D={row['head_dim']}, {'forward+backward' if row.get('training') else 'forward'}, {row['device']})")


def _excluded_now(backend: str) -> Optional[str]:
    if torch.compiler.is_compiling():
        return (f"torch.compile: {backend} runs outside the graph (a graph break), the triton and sdpa "
                f"backends trace into it")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return f"CUDA-graph capture: {backend} is measured eagerly only; auto leaves captured calls to the others"
    return None


def auto_attention_check(backend: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                         causal: bool = False, dropout_p: float = 0.0, scale: Optional[float] = None) -> Optional[str]:
    """None when ``auto`` should run this attention call on ``backend`` (a library backend), else why not."""
    reason = _excluded_now(backend)
    if reason is not None:
        return reason
    row = matching_row(q, k, key_padding_mask, causal, _training(q, k, v))
    if row is None:
        return (f"no measurement of this kind of call on this GPU says {backend} is the fastest (auto "
                f"takes it only where one does: blip_fast.ops.measured); select it with "
                f"blip_fast.use_backend({backend!r})")
    kwargs = dict(key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p, scale=scale)
    return slower_than(backend, row, lambda other: _why_not_auto(other, q, k, v, **kwargs) is None)


def faster_library_backend(backend: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                           causal: bool = False, dropout_p: float = 0.0, scale: Optional[float] = None) -> Optional[str]:
    """For a backend before the library ones in ``AUTO_ORDER`` (triton): the reason to leave this
    call to a library backend measured faster at it and able to run it, else None."""
    if torch.compiler.is_compiling() or not timing_rows() or _excluded_now(backend) is not None:
        return None  # in this order: traceable first, then the cheapest (no rows: nothing to do)
    row = matching_row(q, k, key_padding_mask, causal, _training(q, k, v))
    if row is None or row["ms"].get(backend) is None:
        return None
    kwargs = dict(key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p, scale=scale)
    library_row = dict(row, ms={n: t for n, t in row["ms"].items() if n in LIBRARY_BACKENDS or n == backend})
    return slower_than(backend, library_row, lambda other: _why_not_auto(other, q, k, v, **kwargs) is None)


def rows_from_attention_results(results: Dict[str, Any], device: str, dtype: str, source: str,
                                impl_to_backend: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """Timing rows from the attention section of ``python -m benchmarks --kernels``
    (``{shape name: {"shape": {...}, "results": {impl: {"fwd_ms", "fwd_bwd_ms", ...}}}}``): the
    ``ops_<backend>`` implementations, i.e. eager calls through :func:`blip_fast.ops.attention`."""
    impl_to_backend = impl_to_backend or {}
    rows = []
    for name, entry in results.items():
        shape, res = entry.get("shape", {}), entry.get("results", {})
        for training, key in ((False, "fwd_ms"), (True, "fwd_bwd_ms")):
            ms = {}
            for impl, r in res.items():
                backend = impl_to_backend.get(impl, impl[4:] if impl.startswith("ops_") else None)
                if backend and backend != "auto" and isinstance(r, dict) and r.get(key) is not None:
                    ms[backend] = round(float(r[key]), 5)
            if len(ms) > 1:
                rows.append(dict(device=device, dtype=dtype, shape=name, batch=shape["batch"], heads=shape["heads"],
                                 lq=shape["lq"], lk=shape["lk"], head_dim=shape["head_dim"],
                                 padding=bool(shape.get("padding")), causal=bool(shape.get("causal")),
                                 training=training, ms=ms, source=source))
    return rows
