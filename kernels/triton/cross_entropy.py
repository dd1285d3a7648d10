"""Fused linear + cross-entropy for the LM head, with the gradients computed in the forward.

For a chunk of rows at a time the logits ``hidden_chunk @ weight.T + bias`` are computed by
cuBLAS in the input dtype into one reused buffer; a Triton kernel then reads each row of logits
twice (log-sum-exp, then softmax) and overwrites it with the gradient of the loss with respect
to those logits, already scaled by the reduction (``1 / n_valid`` for ``'mean'``). Two more
matmuls turn it into this chunk's slice of ``grad_hidden`` and its contribution to
``grad_weight`` (and a column sum to ``grad_bias``) before the buffer is reused for the next
chunk. The backward only multiplies the stored gradients by the upstream scalar.

``reduction='none'`` has one upstream gradient per row, unknown in the forward: there the
forward computes the losses only (no gradient matmuls) and the backward recomputes the logits
chunk by chunk with the per-row upstream gradient folded into the kernel's scale.

Memory, with ``R`` rows, vocabulary ``V``, hidden size ``H`` and element size ``e`` of the input
dtype, beyond the inputs:

* one chunk of logits, ``chunk_rows * V * e`` (at most :data:`CHUNK_BYTES`, 64 MiB; the full
  ``R x V`` logits, let alone a float32 copy, never exist);
* ``grad_hidden`` ``R * H * e`` and ``grad_weight`` ``V * H * e`` (accumulated in the weight's
  dtype with cuBLAS's float32 accumulation inside each chunk), a float32 ``grad_bias`` ``V * 4``
  and float32 per-row losses ``R * 4``, held from the forward until the backward (the price of
  computing the gradients early; the unfused path holds its saved log-probabilities, ``R * V * e``,
  over the same span).

For BLIP's LM head (``R = 128 * 30``, ``V = 30524``, ``H = 768``, bfloat16) that is about
59 MiB + 6 MiB + 45 MiB against roughly 700 MiB for ``F.linear`` + ``F.cross_entropy``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import KernelLauncher, LaunchPlan, align16, cdiv, compiling, interpreting, next_power_of_2

Tensor = torch.Tensor

#: Upper bound on the bytes of one chunk of logits.
CHUNK_BYTES = 64 * 2**20
_MAX_BLOCK_V = 4096
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS, LABELS, LOSS, SCALE,
    stride_logits, stride_scale,
    V, ignore_index, confidence, smooth_per_class, smoothing,
    COMPUTE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: loss (0 when ignored) and, if asked, ``scale * dloss/dlogits`` written in place."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_logits
    label = tl.load(LABELS + row)
    ignored = label == ignore_index
    cols = tl.arange(0, BLOCK_V)

    m = float("-inf")
    d = 0.0
    z_label = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK_V):
        c = start + cols
        z = tl.load(ptr + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        # Selecting by comparison never reads out of bounds, whatever the label.
        z_label += tl.sum(tl.where(c == label, z, 0.0), axis=0)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(c < V, z, 0.0), axis=0)
    lse = m + tl.log(d)
    loss = lse - z_label
    if HAS_SMOOTHING:
        loss = confidence * loss + smoothing * (lse - z_sum / V)
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))

    if COMPUTE_GRAD:
        # Ignored rows get exact zeros, even when the scale is inf (mean over no valid row).
        scale = tl.where(ignored, 0.0, tl.load(SCALE + row * stride_scale).to(tl.float32))
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            z = tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - smooth_per_class - tl.where(c == label, confidence, 0.0)
            tl.store(ptr + c, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


_INTERPRET = interpreting()  # fixed at import, as triton's @jit decided it for the kernel
_LOSS_GRAD = KernelLauncher(_ce_loss_grad_kernel)
_PLANS: dict = {}


def _aligned(n: int, element_size: int, align_bytes: int = 16) -> int:
    """``n`` rounded up so that ``n * element_size`` is a multiple of ``align_bytes``."""
    step = max(1, align_bytes // element_size)
    return -(-n // step) * step


def _ce_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def chunk_rows_for(n_rows: int, vocab: int, element_size: int,
                   chunk_bytes: Optional[int] = None) -> int:
    """Rows per chunk: the fewest equal chunks whose logits fit in ``chunk_bytes``."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    max_rows = max(1, chunk_bytes // max(1, vocab * element_size))
    n_chunks = max(1, cdiv(n_rows, max_rows))
    return max(1, cdiv(n_rows, n_chunks))


def _fused_pass(
    h2: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    label_smoothing: float, ignore_index: int, scale: Optional[Tensor],
    grad_h: bool, grad_w: bool, grad_b: bool, chunk_rows: Optional[int],
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Per-row losses and (``scale``-weighted) gradients, chunk by chunk over the rows.

    Args:
        h2: ``(R, H)``; weight: ``(V, H)``; bias: ``(V,)`` or None; labels: ``(R,)`` integer.
        scale: float32, one element (broadcast) or ``(R,)`` per row: the factor applied to the
            gradient of each row's loss. None computes the losses only.
        grad_h, grad_w, grad_b: which gradients to produce.

    Returns:
        float32 ``(R,)`` losses (0 where ignored), ``grad_hidden`` ``(R, H)`` in ``h2``'s dtype,
        ``grad_weight`` in ``weight``'s dtype, float32 ``grad_bias``; None for those not asked.
    """
    rows, _ = h2.shape
    vocab = weight.shape[0]
    compute_grad = scale is not None and (grad_h or grad_w or grad_b)
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(rows, vocab, h2.element_size())
    chunk_rows = max(1, min(chunk_rows, rows))
    loss = torch.empty(rows, dtype=torch.float32, device=h2.device)
    d_hidden = torch.empty_like(h2, memory_format=torch.contiguous_format) if compute_grad and grad_h else None
    d_weight = None
    d_bias = (torch.zeros(vocab, dtype=torch.float32, device=h2.device)
              if compute_grad and grad_b else None)
    if rows == 0:
        return loss, d_hidden, torch.zeros_like(weight) if compute_grad and grad_w else None, d_bias
    # Rows of the logits buffer start on 16-byte boundaries (BLIP's V = 30524 does not): with an
    # unaligned leading dimension cuBLAS falls back to 2-element-aligned sm80 kernels (seen in the
    # H100 profile of this op and of F.linear + F.cross_entropy alike).
    buf = torch.empty((chunk_rows, _aligned(vocab, h2.element_size())), dtype=h2.dtype,
                      device=h2.device)[:, :vocab]
    if scale is None:
        scale = torch.ones(1, dtype=torch.float32, device=h2.device)  # unused
    per_row = scale.numel() != 1
    block_v = min(next_power_of_2(vocab), _MAX_BLOCK_V)
    consts = dict(COMPUTE_GRAD=compute_grad, HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_V=block_v)
    weight_t = weight.t()
    for start in range(0, rows, chunk_rows):
        end = min(rows, start + chunk_rows)
        h_c = h2[start:end]
        logits = buf[: end - start]
        if bias is not None:
            torch.addmm(bias, h_c, weight_t, out=logits)
        else:
            torch.mm(h_c, weight_t, out=logits)
        args = (logits, labels[start:end], loss[start:end], scale[start:end] if per_row else scale,
                logits.stride(0), 1 if per_row else 0,
                vocab, ignore_index, 1.0 - label_smoothing, label_smoothing / vocab, label_smoothing)
        key = (h2.get_device(), h2.dtype, labels.dtype, end - start, vocab, logits.stride(0), per_row,
               ignore_index, tuple(align16(a) for a in args[:4]), compute_grad, label_smoothing > 0.0)
        plan = _PLANS.get(key)
        if plan is None:
            plan = LaunchPlan((end - start,), consts, _ce_warps(block_v))
            if not _INTERPRET:
                if len(_PLANS) >= 1024:
                    _PLANS.clear()
                _PLANS[key] = plan
        _LOSS_GRAD(plan, args)
        if not compute_grad:
            continue
        if d_hidden is not None:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if grad_w:
            d_weight = torch.mm(logits.t(), h_c) if d_weight is None else d_weight.addmm_(logits.t(), h_c)
        if d_bias is not None:
            d_bias += logits.sum(0, dtype=torch.float32)
    return loss, d_hidden, d_weight, d_bias


def _ce_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                label_smoothing: float, ignore_index: int, reduction: str, chunk_rows: Optional[int],
                need_h: bool, need_w: bool, need_b: bool):
    """The loss (scalar, or ``labels``' shape for ``'none'``, in hidden's dtype) and, except for
    ``'none'``, the gradients of hidden (its shape), weight and bias (float32) for an upstream
    gradient of 1 (None where not asked)."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1).contiguous()
    if reduction == "none":
        loss, _, _, _ = _fused_pass(h2, weight, bias, lab, label_smoothing, ignore_index, None,
                                    False, False, False, chunk_rows)
        return loss.view(labels.shape).to(hidden.dtype), None, None, None
    if reduction == "mean":
        n_valid = (lab != ignore_index).sum()
        scale = (1.0 / n_valid.to(torch.float32)).reshape(1)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
    loss, gh, gw, gb = _fused_pass(h2, weight, bias, lab, label_smoothing, ignore_index, scale,
                                   need_h, need_w, need_b and bias is not None, chunk_rows)
    total = loss.sum()
    if reduction == "mean":
        total = total / n_valid
    return total.to(hidden.dtype), (None if gh is None else gh.view(hidden.shape)), gw, gb


def _ce_backward_none(grad_out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                      labels: Tensor, label_smoothing: float, ignore_index: int,
                      chunk_rows: Optional[int], need_h: bool, need_w: bool, need_b: bool):
    """Gradients for ``reduction='none'`` (logits recomputed chunk by chunk): hidden's, weight's
    and bias's (float32), None where not asked."""
    scale = grad_out.reshape(-1).to(torch.float32).contiguous()
    _, gh, gw, gb = _fused_pass(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                labels.reshape(-1).contiguous(), label_smoothing, ignore_index, scale,
                                need_h, need_w, need_b and bias is not None, chunk_rows)
    return (None if gh is None else gh.view(hidden.shape)), gw, gb


class LinearCrossEntropyFn(torch.autograd.Function):
    """Autograd wrapper; see the module docstring for the algorithm and its memory."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                label_smoothing: float, ignore_index: int, reduction: str,
                chunk_rows: Optional[int]) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.meta = (bias.dtype if bias is not None else None, reduction, label_smoothing,
                    ignore_index, chunk_rows)
        loss, gh, gw, gb = _ce_forward(hidden, weight, bias, labels, label_smoothing, ignore_index,
                                       reduction, chunk_rows, need_h, need_w, need_b)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.grads = (gh, gw, gb)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        bias_dtype, reduction, label_smoothing, ignore_index, chunk_rows = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            gh, gw, gb = _ce_backward_none(grad_out, hidden, weight, bias, labels, label_smoothing,
                                           ignore_index, chunk_rows, need_h, need_w, need_b)
        else:
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: the gradients computed in the forward "
                                   "were already consumed by an earlier backward")
            gh, gw, gb = ctx.grads
            ctx.grads = None
            # The stored gradients are ours alone: scale them in place.
            for g in (gh, gw, gb):
                if g is not None:
                    g.mul_(grad_out)
        if gb is not None:
            gb = gb.to(bias_dtype)
        return gh, gw, gb, None, None, None, None, None


# ============================================================================================
# Custom ops (torch.compile): see attention.py for why eager calls keep the autograd.Function
# ============================================================================================

def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("blip_fast::linear_cross_entropy_fwd", mutates_args=())
def _ce_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
               label_smoothing: float, ignore_index: int, reduction: str, chunk_rows: Optional[int],
               need_h: bool, need_w: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, gh, gw, gb = _ce_forward(hidden, weight, bias, labels, label_smoothing, ignore_index,
                                   reduction, chunk_rows, need_h, need_w, need_b)
    return loss, _or_empty(gh, hidden), _or_empty(gw, hidden), _or_empty(gb, hidden)


@_ce_fwd_op.register_fake
def _(hidden, weight, bias, labels, label_smoothing, ignore_index, reduction, chunk_rows,
      need_h, need_w, need_b):
    loss = hidden.new_empty(labels.shape if reduction == "none" else ())
    grads = reduction != "none"
    return (loss, hidden.new_empty(hidden.shape) if grads and need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape) if grads and need_w else hidden.new_empty(0),
            hidden.new_empty(weight.shape[0], dtype=torch.float32)
            if grads and need_b and bias is not None else hidden.new_empty(0))


@torch.library.custom_op("blip_fast::linear_cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(grad_out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
               label_smoothing: float, ignore_index: int, chunk_rows: Optional[int],
               need_h: bool, need_w: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    gh, gw, gb = _ce_backward_none(grad_out, hidden, weight, bias, labels, label_smoothing,
                                   ignore_index, chunk_rows, need_h, need_w, need_b)
    return _or_empty(gh, hidden), _or_empty(gw, hidden), _or_empty(gb, hidden)


@_ce_bwd_op.register_fake
def _(grad_out, hidden, weight, bias, labels, label_smoothing, ignore_index, chunk_rows,
      need_h, need_w, need_b):
    return (hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_w else hidden.new_empty(0),
            hidden.new_empty(weight.shape[0], dtype=torch.float32)
            if need_b and bias is not None else hidden.new_empty(0))


def _ce_setup(ctx, inputs, output):
    hidden, weight, bias, labels, label_smoothing, ignore_index, reduction, chunk_rows, *_ = inputs
    _, gh, gw, gb = output
    ctx.meta = (bias.dtype if bias is not None else None, reduction, label_smoothing, ignore_index,
                chunk_rows)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, labels)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _ce_op_backward(ctx, grad_out, _gh, _gw, _gb):
    bias_dtype, reduction, label_smoothing, ignore_index, chunk_rows = ctx.meta
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias_dtype is not None
    if reduction == "none":
        hidden, weight, bias, labels = ctx.saved_tensors
        gh, gw, gb = _ce_bwd_op(grad_out, hidden, weight, bias, labels, label_smoothing,
                                ignore_index, chunk_rows, need_h, need_w, need_b)
    else:
        gh, gw, gb = (g * grad_out for g in ctx.saved_tensors)
    return (gh if need_h else None, gw if need_w else None, gb.to(bias_dtype) if need_b else None,
            None, None, None, None, None, None, None, None)


_ce_fwd_op.register_autograd(_ce_op_backward, setup_context=_ce_setup)


def _autocast_cast(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast to the autocast dtype, as autocast would for the ``F.linear`` of the unfused path."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def linear_cross_entropy_fn(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """:func:`linear_cross_entropy` with an explicit number of rows per chunk (None: automatic)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    hidden, weight, bias = _autocast_cast(hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        tracked = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        if compiling():
            return _ce_fwd_op(hidden, weight, bias, labels, float(label_smoothing), int(ignore_index),
                              reduction, chunk_rows, tracked and hidden.requires_grad,
                              tracked and weight.requires_grad,
                              tracked and bias is not None and bias.requires_grad)[0]
        if tracked:
            return LinearCrossEntropyFn.apply(hidden, weight, bias, labels, float(label_smoothing),
                                              int(ignore_index), reduction, chunk_rows)
        lab = labels.reshape(-1).contiguous()
        loss, _, _, _ = _fused_pass(hidden.reshape(-1, hidden.shape[-1]), weight, bias, lab,
                                    float(label_smoothing), int(ignore_index), None,
                                    False, False, False, chunk_rows)
        if reduction == "none":
            return loss.view(labels.shape).to(hidden.dtype)
        total = loss.sum()
        if reduction == "mean":
            total = total / (lab != ignore_index).sum()
        return total.to(hidden.dtype)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, logits never whole.

    Args:
        hidden: ``(..., H)`` float32, bfloat16 or float16.
        weight: ``(V, H)``, hidden's dtype (may be tied to an embedding).
        bias: ``(V,)`` or None.
        labels: ``(...)`` integer class indices, ``ignore_index`` where no loss is taken.
        label_smoothing: as in ``F.cross_entropy``.
        reduction: ``'mean'`` over non-ignored rows, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or ``labels``' shape for ``'none'`` (0 where ignored), in hidden's dtype.
    """
    return linear_cross_entropy_fn(hidden, weight, bias, labels, label_smoothing, ignore_index,
                                   reduction)


def why_not_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
) -> Optional[str]:
    """None when the kernel can run this call, else the reason."""
    if hidden.dtype not in _DTYPES:
        return f"dtype {hidden.dtype} (supported: float32, bfloat16, float16)"
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        return "hidden, weight and bias must share one dtype"
    if weight.dim() != 2 or hidden.dim() == 0 or weight.shape[1] != hidden.shape[-1]:
        return f"weight shape {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}"
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"bias shape {tuple(bias.shape)} is not ({weight.shape[0]},)"
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return "labels must be integer class indices (probability targets are not supported)"
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        return f"labels shape {tuple(labels.shape)} does not match hidden {tuple(hidden.shape)}"
    if not 0.0 <= label_smoothing <= 1.0:
        return f"label_smoothing {label_smoothing} outside [0, 1]"
    return None
