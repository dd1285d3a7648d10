"""The ``flash_attn`` backend: attention through the flash-attention package.

Only ``attention``; every other op falls through to the next backend under ``auto``.

* FlashAttention-3 (``flash_attn_interface``, built from the flash-attention repository's
  ``hopper/`` folder) on Hopper GPUs, forward and backward, when importable and the call has no
  dropout (FA3 has none); FlashAttention-2 (``flash_attn`` >= 2.1) otherwise.
* float16 / bfloat16, head dim a multiple of 8 up to 256, compute capability 8.0 or newer.
* Layout: q, k, v ``(B, H, L, D)`` go in as ``(B, L, H, D)`` views (copied only when misaligned);
  the output is a ``(B, H, Lq, D)`` view of ``(B, Lq, H, D)`` memory.
* Masks: causal -> ``causal=True`` (flash-attn >= 2.1 aligns it bottom right, as
  :func:`blip_fast.ops.attention` does); key padding -> kept keys packed for
  ``flash_attn_varlen_func``; causal + right padding -> at most two varlen calls
  (:mod:`blip_fast.ops._varlen`). Causal with a padding mask that is not a prefix of each row
  has no flash-attn form and raises :class:`~blip_fast.ops.BackendUnavailableError`. Queries
  that see no key are zeros.
* Dropout draws from torch's CUDA generator (``torch.manual_seed`` reproduces a run).
* ``torch.compile``: the op runs eagerly (a graph break); ``auto`` leaves compiled and
  CUDA-graph-captured calls, and causal calls with padding, to other backends.
"""
from __future__ import annotations

import re
from types import ModuleType
from typing import Optional, Tuple

import torch

from . import _varlen
from ._dispatch import Backend, BackendUnavailableError
from .measured import auto_attention_check

Tensor = torch.Tensor

INSTALL_HINT = ("pip install flash-attn --no-build-isolation (FlashAttention-2, built for the installed "
                "torch and CUDA), or FlashAttention-3 from the flash-attention repository's hopper/ folder")
MIN_FA2_VERSION = (2, 1)  # bottom-right aligned causal masks
MAX_HEAD_DIM = 256

_FA2: Optional[ModuleType] = None  # flash_attn (the package)
_FA3: Optional[ModuleType] = None  # flash_attn_interface (FlashAttention-3)


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _import_libraries() -> str:
    """Import FA2 / FA3 into the module globals; the reasons either is missing ('' if none is)."""
    global _FA2, _FA3
    problems = []
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
        version = getattr(flash_attn, "__version__", "0")
        if _version_tuple(version) < MIN_FA2_VERSION:
            problems.append(f"flash_attn {version} aligns causal masks top left (needs >= 2.1)")
        else:
            _FA2 = flash_attn
    except Exception as exc:  # noqa: BLE001 - a broken install is "not importable"
        problems.append(f"flash_attn: {exc!r}")
    try:
        import flash_attn_interface  # noqa: F401
        _FA3 = flash_attn_interface
    except Exception as exc:  # noqa: BLE001
        problems.append(f"flash_attn_interface (FlashAttention-3): {exc!r}")
    return "; ".join(problems)


def load() -> Backend:
    problems = _import_libraries()
    if _FA2 is None and _FA3 is None:
        return Backend("flash_attn", unavailable_reason=f"flash-attn is not importable ({problems}); fix: {INSTALL_HINT}")
    if not torch.cuda.is_available():
        return Backend("flash_attn", unavailable_reason="no CUDA device (flash-attn runs on CUDA)")
    return Backend("flash_attn", ops={"attention": attention}, checks={"attention": why_not_attention},
                   auto_checks={"attention": _auto_attention})


def _library_for(device: torch.device, dropout: bool) -> Tuple[Optional[ModuleType], str]:
    """(module, "") for the library that runs the call, or (None, reason)."""
    if _FA3 is not None and torch.cuda.get_device_capability(device)[0] == 9 and not dropout:
        return _FA3, ""
    if _FA2 is not None:
        return _FA2, ""
    if dropout:
        return None, "dropout_p > 0: FlashAttention-3 has no dropout and FlashAttention-2 is not installed"
    return None, "FlashAttention-3 runs on Hopper (compute capability 9.x) GPUs only; FlashAttention-2 is not installed"


def _first(result):
    return result[0] if isinstance(result, tuple) else result


# ----------------------------------------------------------------------------------- the op

def _dense_kernel(lib: ModuleType, p: float, scale: float):
    def kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        if lib is _FA3:
            return _first(lib.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))
        return lib.flash_attn_func(q, k, v, dropout_p=p, softmax_scale=scale, causal=causal)
    return kernel


def _varlen_kernel(lib: ModuleType, p: float, scale: float):
    def kernel(q: Tensor, k: Tensor, v: Tensor, seg: _varlen.Segment) -> Tensor:
        cu_q, cu_k = seg.cu_seqlens(q.device)
        if lib is _FA3:
            return _first(lib.flash_attn_varlen_func(q, k, v, cu_q, cu_k, seg.max_q, seg.max_k,
                                                     softmax_scale=scale, causal=seg.causal))
        return lib.flash_attn_varlen_func(q, k, v, cu_q, cu_k, seg.max_q, seg.max_k, dropout_p=p,
                                          softmax_scale=scale, causal=seg.causal)
    return kernel


@torch.compiler.disable
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
    """:func:`blip_fast.ops.attention` on flash-attn's kernels (``need_weights`` must be False).

    Returns ``(B, H, Lq, D)`` in the input dtype, stored as ``(B, Lq, H, D)``; queries with no
    kept key are zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    p = float(dropout_p)
    lib, reason = _library_for(q.device, p > 0)
    if lib is None:
        raise BackendUnavailableError(f"backend 'flash_attn' cannot run attention: {reason}")
    try:
        return _varlen.attend(q, k, v, key_padding_mask, bool(causal), _dense_kernel(lib, p, scale),
                              _varlen_kernel(lib, p, scale))
    except _varlen.CausalMaskNotPrefix as exc:
        raise BackendUnavailableError(
            f"backend 'flash_attn' cannot run attention: {exc} (flash-attn's varlen causal mask "
            f"is per packed sequence). Fix: right-pad the keys, or select another backend "
            f"(blip_fast.use_backend('auto') falls back)") from exc


# --------------------------------------------------------------------------------- the checks

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
    reason = _varlen.check_call(q, k, v, key_padding_mask, dropout_p, need_weights, "flash-attn")
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn runs float16 and bfloat16 only, not {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > MAX_HEAD_DIM:
        return f"head dim {d}: flash-attn takes multiples of 8 up to {MAX_HEAD_DIM}"
    if torch.compiler.is_compiling():
        return None  # the device queries below do not trace; the call runs eagerly and reports itself
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"compute capability {major}.{minor}: flash-attn needs 8.0 (Ampere) or newer"
    reason = _varlen.host_sync_forbidden(key_padding_mask)
    if reason is None:
        reason = _library_for(q.device, float(dropout_p) > 0)[1] or None
    return reason


def _auto_attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None,
                    need_weights=False) -> Optional[str]:
    if causal and key_padding_mask is not None:
        return ("causal with key padding: flash-attn needs right-padded keys, known only when the "
                "call runs; auto leaves it to backends that take any mask")
    return auto_attention_check("flash_attn", q, k, v, key_padding_mask, causal, dropout_p, scale)


def library_in_use(device: torch.device, dropout: bool = False) -> str:
    """'flash_attn_interface (FA3)' or 'flash_attn <version> (FA2)' for reports."""
    lib, reason = _library_for(device, dropout)
    if lib is None:
        return f"none ({reason})"
    if lib is _FA3:
        return "flash_attn_interface (FlashAttention-3)"
    return f"flash_attn {getattr(lib, '__version__', '?')} (FlashAttention-2)"
