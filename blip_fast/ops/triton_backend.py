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
import math
import os

import torch

from ._dispatch import Backend
from .measured import faster_library_backend

# op name -> kernel module (inside blip_fast._kernels.triton)
_KERNEL_MODULES = {
    "attention": "attention",
    "layer_norm": "layer_norm",
    "add_layer_norm": "layer_norm",
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
    auto_checks = {op: _AUTO_CHECKS.get(op, _auto_check) for op in ops}
    return Backend("triton", ops=ops, checks=checks, auto_checks=auto_checks)


def _auto_check(*args, **kwargs) -> str | None:
    if _interpreting():
        return ("the Triton CPU interpreter is a test tool, far slower than the other backends; "
                "select it explicitly with blip_fast.use_backend('triton') to use it")
    return None


# --------------------------------------------------------------------------------------------
# Where ``auto`` prefers the next backend: eager calls too small to pay for the host time
# --------------------------------------------------------------------------------------------
#
# An eager call costs max(host time, GPU time). The triton kernels win on GPU time at BLIP's
# shapes, but their launch path runs in Python (an autograd.Function and triton launches):
# below some amount of work per call the next backend of AUTO_ORDER (torch SDPA's C++ path for
# attention, torch's own kernels for the others) finishes first. The thresholds are the
# crossovers measured eagerly, as the models call the ops, on an H100 host (benchmarks/kernels.py,
# section "crossover"; benchmarks/RESULTS.md, "Kernels"). Under CUDA-graph capture and
# torch.compile only GPU time counts, and triton is taken whatever the size.

#: op -> {(training, masked): least work per call for which triton is the faster eager choice}.
#: Work: attention 4*B*H*Lq*Lk*D (forward FLOPs); layer_norm and bias_gelu elements;
#: linear_gelu output elements. ``training``: autograd records the call; ``masked``: a key padding
#: mask (attention) or a residual (layer_norm). Measured eagerly (do_bench, L2 flushed) through
#: blip_fast.ops on an H100 host, 2026-11-23, bf16 (RESULTS.md, "Kernels", crossover tables):
#:
#: * attention with a mask: triton faster at every size (B = 1..64, L = 30), forward and
#:   forward+backward (SDPA pays for building the mask and cannot use flash);
#: * attention without a mask, forward+backward: SDPA (cuDNN) faster or level up to 7.6 GFLOP
#:   (ViT-B/16 at 224, B = 64), where triton's GPU-time lead (8%) is under the eager noise;
#: * attention without a mask, forward: SDPA faster up to 0.3-1.9 GFLOP, triton from 1.2 GFLOP
#:   (cross-attention B = 64: 0.0276 vs 0.0294 ms) and far ahead at 7.6 (0.056 vs 0.121 ms);
#: * layer_norm forward+backward: torch's C++ autograd path faster at every measured size
#:   (64 to 16384 rows of 768, with or without residual and dropout); forward: triton faster;
#: * bias_gelu forward+backward: triton faster at 17.7M and 38.7M elements (BERT, ViT MLPs);
#: * linear_gelu forward+backward: addmm + gelu faster eagerly at every size (64..12608 rows).
NEVER = math.inf
EAGER_MIN_WORK = {
    "attention": {(True, False): 8e9, (True, True): 0, (False, False): 1.1e9, (False, True): 0},
    "layer_norm": {(True, False): NEVER, (True, True): NEVER, (False, False): 0, (False, True): 0},
    "bias_gelu": {(True, False): 16e6, (False, False): 0},
    "linear_gelu": {(True, False): NEVER, (False, False): NEVER},
}


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def compiling() -> bool:
    return torch.compiler.is_compiling()


def _training(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _below_crossover(op: str, work: int, training: bool, masked: bool) -> str | None:
    threshold = EAGER_MIN_WORK[op].get((training, masked), 0)
    if work >= threshold or compiling() or _capturing():
        return None
    if threshold == NEVER:
        return (f"eager {op} ({'training' if training else 'inference'}): the next backend measured "
                f"faster at every size (host time of the Python launch path; RESULTS.md, Kernels)")
    return (f"eager {op} of {work:.3g} work units is below the measured crossover ({threshold:.3g}) "
            f"where the triton launch path's host time outweighs its GPU time; the next backend is faster")


#: Attention calls where cuDNN (through the ``sdpa`` backend) is faster on the GPU itself, eager or
#: captured (H100, bf16, benchmarks/RESULTS.md "Kernels", 2026-11-23): forward+backward of
#: unmasked self-attention from L = 512 (ViT-384 L = 577: 0.476 ms cuDNN vs 0.502 ms; ViT-480
#: L = 901: 0.513 vs 0.58 ms), and head dim 128 (ViT shape L = 197: cuDNN 0.188 ms vs 0.261 ms
#: forward+backward, 0.036 vs 0.045 ms forward). The forward alone at long L is as fast or faster
#: here (L = 577: 0.114 vs 0.116 ms; L = 901: 0.116 vs 0.137 ms), so inference keeps triton.
LONG_SELF_ATTENTION_TRAINING = 512
MAX_HEAD_DIM_BEFORE_SDPA = 64


def _gpu_time_loss(q, k, key_padding_mask, causal, training: bool) -> str | None:
    lq, d, lk = q.shape[2], q.shape[3], k.shape[2]
    if d > MAX_HEAD_DIM_BEFORE_SDPA:
        return (f"head dim {d} > {MAX_HEAD_DIM_BEFORE_SDPA}: cuDNN attention measured faster on an "
                f"H100 (RESULTS.md, Kernels)")
    if (training and key_padding_mask is None and not causal
            and min(lq, lk) >= LONG_SELF_ATTENTION_TRAINING):
        return (f"unmasked forward+backward at L >= {LONG_SELF_ATTENTION_TRAINING}: cuDNN attention "
                f"measured faster on an H100 (RESULTS.md, Kernels)")
    return None


def _auto_attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None,
                    need_weights=False):
    reason = _auto_check()
    if reason is None:
        training = _training(q, k, v)
        reason = _gpu_time_loss(q, k, key_padding_mask, causal, training)
    if reason is None:
        batch, heads, lq, d = q.shape
        work = 4 * batch * heads * lq * k.shape[2] * d
        reason = _below_crossover("attention", work, training, key_padding_mask is not None)
    if reason is None:  # measured rows (blip_fast.ops.measured) where flash_attn / xformers win
        reason = faster_library_backend("triton", q, k, v, key_padding_mask, causal, dropout_p, scale)
    return reason


def _auto_layer_norm(x, weight, bias, eps, residual=None, dropout_p=0.0):
    reason = _auto_check()
    if reason is None:
        reason = _below_crossover("layer_norm", x.numel(), _training(x, weight, bias, residual),
                                  residual is not None)
    return reason


#: Whether ``auto`` takes the fused residual add + LayerNorm of pre-LN blocks (one kernel writing
#: the float32 sum and the autocast-dtype output) where it takes triton's LayerNorm. Off until a
#: device run measures it against the unfused pair (``BLIP_FAST_FUSED_ADD_LN=1`` turns it on, for
#: that measurement: ``python -m benchmarks.profile_step``); explicit ``triton`` always fuses.
AUTO_FUSED_ADD_LAYER_NORM = os.environ.get("BLIP_FAST_FUSED_ADD_LN", "0") == "1"


def _auto_add_layer_norm(x, residual, weight, bias, eps, y_dtype=None):
    if not AUTO_FUSED_ADD_LAYER_NORM:
        return ("the fused add + LayerNorm is not yet measured against the unfused pair "
                "(BLIP_FAST_FUSED_ADD_LN=1 to take it)")
    return _auto_layer_norm(x, weight, bias, eps, residual)


def _auto_bias_gelu(x, bias):
    reason = _auto_check()
    if reason is None:
        reason = _below_crossover("bias_gelu", x.numel(), _training(x, bias), False)
    return reason


def _auto_linear_gelu(x, weight, bias):
    reason = _auto_check()
    if reason is None and not _training(x, weight, bias):
        # Forward only, the fused bias+GELU after a bias-free matmul moves the same bytes as
        # addmm (bias in the cuBLAS epilogue) + gelu: measured level or slower on the GPU too
        # (ViT fc1 0.151 vs 0.151 ms, ViT-L fc1 0.239 vs 0.226 ms, CUDA graph).
        reason = "forward-only linear+GELU: addmm + gelu measured as fast on the GPU (RESULTS.md, Kernels)"
    if reason is None:
        reason = _below_crossover("linear_gelu", x.numel() // max(1, x.shape[-1]) * weight.shape[0],
                                  _training(x, weight, bias), False)
    return reason


_AUTO_CHECKS = {"attention": _auto_attention, "layer_norm": _auto_layer_norm,
                "add_layer_norm": _auto_add_layer_norm, "bias_gelu": _auto_bias_gelu,
                "linear_gelu": _auto_linear_gelu}
