"""The ``cuda`` backend over NVIDIA apex, used when blip_fast's own extension is not built and
apex (with its CUDA extensions) is importable.

* LayerNorm: ``apex.normalization.fused_layer_norm(_affine)`` after the residual add (apex has no
  residual input), for weight and bias both given or both absent and of the input's dtype.
* Momentum update: ``amp_C.multi_tensor_axpby`` through ``apex.multi_tensor_apply`` with
  ``out = momentum * p_m + (1 - momentum) * p``, one call per dtype pair (apex's kernel takes
  float32 and float16; bfloat16 pairs are declined, and go to the next backend).

apex's multi-tensor kernels are plain pybind11 calls, opaque to torch.compile: while compiling,
the momentum update is declined too.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._dispatch import Backend

Tensor = torch.Tensor

_AXPBY_DTYPES = (torch.float32, torch.float16)
# amp_C flags a non-finite input in its noop buffer when arg_to_check is -1, 0 or 1; any other
# value checks nothing (the reference propagates NaN/inf without a flag).
_NO_CHECK = 2


def load() -> Optional[Backend]:
    """The apex backend, or None when apex or its CUDA extensions are not importable."""
    try:
        from apex.normalization import fused_layer_norm as fln  # noqa: F401
        import fused_layer_norm_cuda  # noqa: F401  (apex's compiled kernels)
    except Exception:  # noqa: BLE001 - any import failure means "no apex"
        return None
    if not torch.cuda.is_available():
        return Backend("cuda", unavailable_reason="no CUDA device (apex's kernels run CUDA tensors only)")
    ops = {"layer_norm": layer_norm}
    checks = {"layer_norm": why_not_layer_norm}
    try:
        import amp_C  # noqa: F401
        from apex.multi_tensor_apply import multi_tensor_applier  # noqa: F401
    except Exception:  # noqa: BLE001 - apex built without its amp_C extension
        pass
    else:
        ops["momentum_update"] = momentum_update
        checks["momentum_update"] = why_not_momentum_update
    from .cuda_backend import auto_checks
    return Backend("cuda", ops=ops, checks=checks, auto_checks=auto_checks(ops))


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               residual: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    from apex.normalization.fused_layer_norm import fused_layer_norm, fused_layer_norm_affine
    if residual is not None:
        x = x + residual
    shape = (x.shape[-1],)
    if weight is None:
        return fused_layer_norm(x, shape, eps)
    return fused_layer_norm_affine(x, weight, bias, shape, eps)


def why_not_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       residual: Optional[Tensor] = None, dropout_p: float = 0.0) -> Optional[str]:
    if dropout_p:
        return "dropout inside LayerNorm is not in apex's kernel (the triton backend fuses it)"
    if x.device.type != "cuda":
        return f"tensors on {x.device.type} (apex runs CUDA tensors)"
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {dtype}"
    if (weight is None) != (bias is None):
        return "apex's fused LayerNorm takes weight and bias together or neither"
    if weight is not None and (weight.dtype != dtype or bias.dtype != dtype):
        return f"apex's fused LayerNorm wants the parameters in the input's dtype ({dtype}), got {weight.dtype}/{bias.dtype}"
    if residual is not None and residual.shape != x.shape:
        return f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}"
    return None


def momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> None:
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier
    groups: Dict[Tuple[torch.device, torch.dtype, torch.dtype], Tuple[List[Tensor], List[Tensor]]] = {}
    for p_m, p in zip(params_m, params):
        group = groups.setdefault((p_m.device, p_m.dtype, p.dtype), ([], []))
        group[0].append(p_m)
        group[1].append(p.detach())
    with torch.no_grad():
        for (device, _, _), (ms, ps) in groups.items():
            noop = torch.zeros(1, dtype=torch.int, device=device)
            multi_tensor_applier(amp_C.multi_tensor_axpby, noop, [ms, ps, ms], momentum, 1.0 - momentum, _NO_CHECK)


def why_not_momentum_update(params_m: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> Optional[str]:
    if torch.compiler.is_compiling():
        return "apex's multi-tensor kernels are opaque to torch.compile"
    if len(params_m) != len(params):
        return f"{len(params_m)} momentum parameters but {len(params)} online ones"
    for p_m, p in zip(params_m, params):
        if p_m.device.type != "cuda" or p.device != p_m.device:
            return "parameters not all on one CUDA device"
        if p_m.dtype not in _AXPBY_DTYPES or p.dtype not in _AXPBY_DTYPES:
            return f"apex's multi_tensor_axpby takes float32/float16, got {p_m.dtype}/{p.dtype}"
        if p_m.shape != p.shape or not (p_m.is_contiguous() and p.is_contiguous()):
            return "apex's multi_tensor_axpby wants contiguous pairs of one shape"
        if type(p_m.data) is not torch.Tensor or type(p.data) is not torch.Tensor:
            return "tensor subclasses (e.g. sharded DTensor parameters) take the per-tensor path"
    return None
