"""The ``cuda`` backend: the native CUDA extension (``kernels/cuda``, built with CMake; see
:mod:`blip_fast.native`), or NVIDIA apex's fused kernels when the extension is not built and apex
is importable (:mod:`blip_fast.ops.cuda_apex`).

The extension registers torch custom ops in the ``blip_fast_cuda`` namespace:

* ``layer_norm(x, weight, bias, eps, residual)``: ``LayerNorm(x + residual)`` with its autograd
  in C++ (so an eager step pays no Python per backward node) over ``layer_norm_fwd`` /
  ``layer_norm_bwd``, which torch.compile traces through the fake kernels registered here;
* ``momentum_update_(params_m, params, momentum)``: the EMA of every pair in one launch.

Dropout inside ``layer_norm`` is not in the native kernel: a call with ``dropout_p > 0`` is
declined, so ``auto`` hands it to the next backend (the triton kernel fuses it).

``auto`` takes this backend only for the ops in :data:`AUTO_OPS`, those a device measurement
(``benchmarks/run_native_on_device.sh``; benchmarks/RESULTS.md) showed faster than what ``auto``
picks otherwise; an explicit ``use_backend("cuda")`` runs every op it supports.
"""
from __future__ import annotations

from typing import FrozenSet, Optional, Sequence

import torch

from ._dispatch import Backend

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Widest normalised dimension (kernels/cuda/launchers.h), and the widest when rows cannot be
#: read in 16-byte vectors (a tensor not 16-byte aligned, or a row not a multiple of 16 bytes).
MAX_N = 8192
SCALAR_MAX_N = 4096

#: The ops ``auto`` runs on this backend: only those measured faster than the backend auto would
#: pick otherwise (never on a guess). Measured on an H100 (benchmarks/RESULTS.md, "Native CUDA
#: extension"): the momentum update over BLIP_Pretrain's set 0.94 ms vs 1.66 ms for auto's
#: previous choice (foreach mul + add) and 0.99 ms for ``torch._foreach_lerp_``; LayerNorm
#: forward + backward eagerly 1.5-2.1x auto's previous choice (torch) at every BLIP shape, and
#: under CUDA graphs faster than triton's at width 768 (0.051 vs 0.054 ms at 64x197 rows).
AUTO_OPS: FrozenSet[str] = frozenset({"layer_norm", "momentum_update"})
#: Under CUDA-graph capture or torch.compile, where host time does not count, triton's LayerNorm
#: is faster at width 1024 (ViT-L: 0.063 vs 0.074 ms forward + backward): auto leaves wider rows
#: to it there.
AUTO_LAYER_NORM_MAX_N_CAPTURED = 768


def auto_checks(ops) -> dict:
    """``Backend.auto_checks`` for ``ops``: decline under ``auto`` the ops not in :data:`AUTO_OPS`."""
    def check(op):
        def why_not_auto(*args, **kwargs):
            if op in AUTO_OPS:
                if op == "layer_norm" and args[0].shape[-1] > AUTO_LAYER_NORM_MAX_N_CAPTURED and (
                        _compiling() or torch.cuda.is_current_stream_capturing()):
                    return (f"width {args[0].shape[-1]} under CUDA graphs / compile: triton's LayerNorm "
                            f"measured faster there")
                return None
            return (f"auto runs {op} on the cuda backend only where a device run measured it faster "
                    f"(cuda_backend.AUTO_OPS, benchmarks/RESULTS.md); use_backend('cuda') runs it")
        return why_not_auto
    return {op: check(op) for op in ops}


def _native():
    # Imported on first use, not with blip_fast: `python -m blip_fast.native` runs that module
    # as __main__, and must not find it imported already.
    from .. import native
    return native


def load() -> Backend:
    """The backend over the native library, else over apex, else an unavailable one whose
    reason names the way to build the extension."""
    native = _native()
    load_error = None
    if native.find_library() is not None:
        try:
            native.load()
        except (OSError, FileNotFoundError) as exc:
            load_error = str(exc)
        else:
            register_fakes()
            if not torch.cuda.is_available():
                return Backend("cuda", unavailable_reason="no CUDA device (the native extension is built but "
                               "runs CUDA tensors only)")
            ops = {"layer_norm": layer_norm, "momentum_update": momentum_update}
            return Backend("cuda", ops=ops, auto_checks=auto_checks(ops),
                           checks={"layer_norm": why_not_layer_norm, "momentum_update": why_not_momentum_update})
    from . import cuda_apex
    apex_backend = cuda_apex.load()
    if apex_backend is not None:
        return apex_backend
    if load_error is None:
        load_error = f"the native CUDA extension is not built; fix: {native.BUILD_HINT} (or install NVIDIA apex)"
    return Backend("cuda", unavailable_reason=load_error)


#: The torch operator namespace of the extension (blip_fast.native.OP_NAMESPACE).
OP_NAMESPACE = "blip_fast_cuda"


def _ops():
    return getattr(torch.ops, OP_NAMESPACE)


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               residual: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``LayerNorm(x + residual)`` over the last dimension (``dropout_p`` must be 0: see
    :func:`why_not_layer_norm`). ``x``: ``(..., N)`` float32/bfloat16/float16; weight, bias:
    ``(N,)`` or None, any of those dtypes; residual: x's shape, x's dtype or one of the two float32.
    Returns x's shape, contiguous, in x's dtype promoted with the residual's; float32 statistics.
    Gradients reach x, residual, weight and bias in their own dtypes."""
    if dropout_p:
        raise ValueError("the native LayerNorm has no dropout; dispatch sends dropout_p > 0 to another backend")
    return _ops().layer_norm(x, weight, bias, float(eps), residual)


def momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> None:
    """In place ``p_m = momentum * p_m + (1 - momentum) * p`` for every pair, in one launch (up to
    1024 pairs per launch); bit-identical to the reference's rounding in every dtype."""
    params_m = params_m if isinstance(params_m, list) else list(params_m)
    if not params_m:
        return
    params = params if isinstance(params, list) else list(params)
    _check_pairs(params_m, params)
    with torch.no_grad():
        _ops().momentum_update_(params_m, params, float(momentum))


def _check_pairs(params_m: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """Every pair the kernel cannot update, as a clear error before the launch (about 1 us per
    pair). The extension checks the same in C++; the Python side adds the backend-level fix to the
    message."""
    if len(params_m) != len(params):
        raise ValueError(f"momentum_update: {len(params_m)} momentum parameters but {len(params)} online ones")
    device = params_m[0].device
    for i, (pm, p) in enumerate(zip(params_m, params)):
        if pm.device != device or p.device != device:
            raise ValueError(f"momentum_update: pair #{i} is on {pm.device} / {p.device}; every tensor must be on "
                             f"{device}")
        if pm.numel() != p.numel():
            raise ValueError(f"momentum_update: pair #{i} has {pm.numel()} and {p.numel()} elements")
        if not (pm.is_contiguous() and p.is_contiguous()):
            raise ValueError(f"momentum_update: pair #{i} is not contiguous (the native kernel updates flat "
                             f"storage in place); use another backend (e.g. blip_fast.use_backend('sdpa'))")
        if pm.dtype not in _DTYPES or p.dtype not in _DTYPES:
            raise ValueError(f"momentum_update: pair #{i} is {pm.dtype} / {p.dtype}; the native kernel takes "
                             f"float32, bfloat16 or float16")


# --------------------------------------------------------------------------------------------
# What the kernels take
# --------------------------------------------------------------------------------------------

def _compiling() -> bool:
    return torch.compiler.is_compiling()


def why_not_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       residual: Optional[Tensor] = None, dropout_p: float = 0.0) -> Optional[str]:
    """None when the native kernels can run this call, else the reason."""
    if dropout_p:
        return "dropout inside LayerNorm is not in the native kernel (the triton backend fuses it)"
    if x.device.type != "cuda":
        return f"tensors on {x.device.type} (the cuda backend runs CUDA tensors)"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} (supported: float32, bfloat16, float16)"
    n = x.shape[-1] if x.dim() else 0
    if not 1 <= n <= MAX_N:
        return f"normalised dimension {n} outside 1..{MAX_N}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if tuple(t.shape) != (n,):
                return f"{name} shape {tuple(t.shape)} is not ({n},)"
            if t.dtype not in _DTYPES or t.device != x.device:
                return f"{name} is {t.dtype} on {t.device}, x {x.dtype} on {x.device}"
    if residual is not None:
        if residual.shape != x.shape:
            return f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}"
        if residual.device != x.device:
            return f"residual on {residual.device}, x on {x.device}"
        if residual.dtype != x.dtype and torch.float32 not in (residual.dtype, x.dtype):
            return f"x {x.dtype} with a residual of {residual.dtype} (same dtype, or one of them float32)"
        if residual.dtype not in _DTYPES:
            return f"residual dtype {residual.dtype}"
    if n > SCALAR_MAX_N:
        vec = 16 // x.element_size()
        if n % vec:
            return f"width {n} is not a multiple of {vec} elements, and over {SCALAR_MAX_N} (element-wise path)"
        if not _compiling() and any(t is not None and t.is_contiguous() and t.data_ptr() % 16
                                    for t in (x, residual, weight, bias)):
            return f"a tensor is not 16-byte aligned, and width {n} is over {SCALAR_MAX_N} (element-wise path)"
    return None


def why_not_momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> Optional[str]:
    """None when the native kernel can run this call, else the reason.

    Checks only what costs O(1) in Python (the lists hold hundreds of tensors and this runs
    every step); the extension checks every pair in C++ and raises a clear error for a pair it
    cannot update (a CPU, non-contiguous or float64 tensor, or a size mismatch)."""
    if len(params_m) != len(params):
        return f"{len(params_m)} momentum parameters but {len(params)} online ones"
    if not len(params_m):
        return None
    first = params_m[0]
    if not isinstance(first, torch.Tensor) or first.device.type != "cuda":
        return "parameters not on a CUDA device"
    if type(first.data) is not torch.Tensor:
        return "tensor subclasses (e.g. sharded DTensor parameters) take the per-tensor path"
    return None


# --------------------------------------------------------------------------------------------
# Fake kernels (torch.compile traces the ops with these)
# --------------------------------------------------------------------------------------------

_FAKES_REGISTERED = False


def _out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _rows(x: Tensor):
    n = x.shape[-1]
    return x.numel() // n if n else 0


def register_fakes() -> None:
    """Register the fake (meta) kernels of the extension's ops, once per process."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    ns = OP_NAMESPACE

    @torch.library.register_fake(f"{ns}::layer_norm")
    def _(x, weight, bias, eps, residual=None):
        return x.new_empty(x.shape, dtype=_out_dtype(x, residual))

    @torch.library.register_fake(f"{ns}::layer_norm_fwd")
    def _(x, weight, bias, eps, residual, save_stats):
        rows = _rows(x) if save_stats else 0
        return (x.new_empty(x.shape, dtype=_out_dtype(x, residual)), x.new_empty(rows, dtype=torch.float32),
                x.new_empty(rows, dtype=torch.float32))

    @torch.library.register_fake(f"{ns}::layer_norm_bwd")
    def _(dy, x, residual, weight, bias, mean, rstd, need_dx, need_dresidual, need_dweight, need_dbias):
        n = x.shape[-1]
        none = x.new_empty(0)
        return (x.new_empty(x.shape) if need_dx else none,
                x.new_empty(x.shape, dtype=residual.dtype) if need_dresidual and residual is not None else none,
                weight.new_empty(n) if need_dweight and weight is not None else none,
                bias.new_empty(n) if need_dbias and bias is not None else none)

    @torch.library.register_fake(f"{ns}::momentum_update_")
    def _(params_m, params, momentum):
        return None

    _FAKES_REGISTERED = True

