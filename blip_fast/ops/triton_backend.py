"""The ``triton`` backend: the Triton kernels of ``kernels/triton`` (installed as
``blip_fast._kernels.triton``).

Each kernel module exports the op under the name of the op in :mod:`blip_fast.ops` with the
same signature, and optionally ``why_not_<op>(...)`` returning None when it can run the call or
the reason it cannot (for example an unsupported head dimension), and ``<op>_impl``, the op
without its own argument checks, which dispatch calls after running ``why_not_<op>``. Missing modules simply leave
that op to the next backend under ``auto``.
"""
from __future__ import annotations

import importlib
import os

import torch

from ._dispatch import Backend

# op name -> kernel module (inside blip_fast._kernels.triton)
_KERNEL_MODULES = {
    "attention": "attention",
    "layer_norm": "layer_norm",
    "bias_gelu": "bias_gelu",
    "linear_gelu": "bias_gelu",
    "linear_cross_entropy": "cross_entropy",
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_check(*tensors) -> str | None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.device.type == "cuda" and not _interpreting():
                return None
            if t.device.type == "cpu" and _interpreting():
                return None
            return (f"tensors on {t.device.type} (the triton backend runs CUDA tensors, or CPU "
                    f"tensors with TRITON_INTERPRET=1)")
    return None


def load() -> Backend:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the platform
        return Backend("triton", unavailable_reason=f"triton is not importable ({exc!r}); "
                       "fix: pip install triton (Linux)")
    if not torch.cuda.is_available() and not _interpreting():
        return Backend("triton", unavailable_reason="no CUDA device (set TRITON_INTERPRET=1 to "
                       "run the kernels on the CPU interpreter, for tests)")
    ops, checks = {}, {}
    for op, mod_name in _KERNEL_MODULES.items():
        try:
            mod = importlib.import_module(f"blip_fast._kernels.triton.{mod_name}")
        except ImportError:
            continue
        fn = getattr(mod, op, None)
        if fn is None:
            continue
        # ``<op>_impl`` skips the argument checks that dispatch already ran through the checks
        # below (``why_not_<op>``): host time counts on every eager call.
        ops[op] = getattr(mod, f"{op}_impl", fn)
        kernel_check = getattr(mod, f"why_not_{op}", None)

        def check(*args, _kernel_check=kernel_check, **kwargs):
            reason = _device_check(*args)
            if reason is None and _kernel_check is not None:
                reason = _kernel_check(*args, **kwargs)
            return reason

        checks[op] = check
    auto_checks = {op: _auto_check for op in ops}
    return Backend("triton", ops=ops, checks=checks, auto_checks=auto_checks)


def _auto_check(*args, **kwargs) -> str | None:
    if _interpreting():
        return ("the Triton CPU interpreter is a test tool, far slower than the other backends; "
                "select it explicitly with blip_fast.use_backend('triton') to use it")
    return None
