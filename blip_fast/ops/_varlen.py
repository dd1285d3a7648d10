"""Attention masks as variable-length batches, for the ``flash_attn`` and ``xformers`` backends.

Those libraries take a key padding mask the varlen way: queries and keys packed row after row,
``cu_seqlens`` giving where each sequence starts, and one mask kind per call (none, or causal
aligned to the bottom right of each sequence). The mask of :func:`blip_fast.ops.attention` (keys
kept per batch row; causal aligned to the bottom right of the whole ``(Lq, Lk)`` matrix) maps onto
at most two such calls ("segments"):

* no causal mask: every query of row ``b`` attends to the kept keys of row ``b``, gathered in
  order (any mask);
* causal with a prefix ("right-padded") mask keeping ``n_b`` keys: with ``off = Lk - Lq``, query
  ``i`` sees keys ``j <= min(i + off, n_b - 1)``. The queries with ``i + off < n_b`` form a
  bottom-right causal block over the ``n_b`` keys; the later ones see all ``n_b`` keys (a plain
  block); queries with ``i + off < 0`` (only when ``Lq > Lk``) see none.

Queries that see no key (a row whose keys are all masked; the first ``Lq - Lk`` causal queries)
are in no segment and come back as zeros. A causal mask whose kept keys are not a prefix raises
:class:`CausalMaskNotPrefix`: no single bottom-right causal block describes it.

Building a plan reads the per-row key counts on the host (one device synchronisation, so no
CUDA-graph capture); a plan is cached for the mask tensor it was built from (same object, same
version), so the layers of one forward pass share it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

#: Everything the ``flash_attn`` and ``xformers`` backends need to know about one varlen call.
VarlenKernel = Callable[[Tensor, Tensor, Tensor, "Segment"], Tensor]
#: ``kernel(q, k, v, causal)`` on ``(B, L, H, D)`` tensors, causal aligned bottom right, Lq <= Lk.
DenseKernel = Callable[[Tensor, Tensor, Tensor, bool], Tensor]


class CausalMaskNotPrefix(ValueError):
    """A causal call whose key padding mask keeps keys that are not a prefix of each row."""


@dataclass
class Segment:
    """One varlen kernel call: packed sequences of ``q_lens[i]`` queries and ``k_lens[i]`` keys.

    ``q_index`` / ``k_index``: int64 rows of the ``(B * Lq)`` queries / ``(B * Lk)`` keys that make
    up the packed tensors, in order (``None``: every row, in order). ``causal``: each sequence is
    causal, aligned bottom right (``k_lens[i] >= q_lens[i]`` then holds).
    """

    causal: bool
    q_lens: Tuple[int, ...]
    k_lens: Tuple[int, ...]
    q_index: Optional[Tensor]
    k_index: Optional[Tensor]
    #: Objects the libraries build from the lengths (cu_seqlens, xformers' bias), kept with the plan.
    cache: Dict[object, object] = field(default_factory=dict, repr=False)

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_k(self) -> int:
        return max(self.k_lens)

    def cu_seqlens(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """``(cu_seqlens_q, cu_seqlens_k)``: int32 ``(num_sequences + 1,)`` on ``device``."""
        key = ("cu_seqlens", device)
        if key not in self.cache:
            cu = []
            for lens in (self.q_lens, self.k_lens):
                starts = [0]
                for n in lens:
                    starts.append(starts[-1] + n)
                cu.append(torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True))
            self.cache[key] = tuple(cu)
        return self.cache[key]


@dataclass
class VarlenPlan:
    """The segments that together compute one masked attention call of ``batch`` rows."""

    batch: int
    lq: int
    lk: int
    segments: List[Segment]


def _true_rows(mask: Tensor, total: int) -> Tensor:
    """Flat int64 indices of the True entries of ``mask``, in order (``total`` of them, known on
    the host already: no second synchronisation, unlike ``nonzero``)."""
    flat = mask.reshape(-1)
    dest = torch.where(flat, flat.cumsum(0) - 1, total)  # everything masked goes to a spare slot
    rows = torch.empty(total + 1, dtype=torch.long, device=flat.device)
    rows.scatter_(0, dest, torch.arange(flat.numel(), device=flat.device))
    return rows[:total]


def build_plan(key_padding_mask: Tensor, causal: bool, lq: int, lk: int) -> Optional[VarlenPlan]:
    """The varlen segments of one call, or None when the mask keeps every key (use the dense kernels).

    Args:
        key_padding_mask: ``(B, Lk)``, True (non-zero) where the key is kept.
        causal: bottom-right aligned causal mask on top of the padding.

    Raises:
        CausalMaskNotPrefix: ``causal`` and some row keeps keys after a masked one.
    """
    keep = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    batch, device = keep.shape[0], keep.device
    lens = keep.sum(1)
    qpos = torch.arange(lq, device=device)[None, :]
    if not causal:
        lens_h = lens.tolist()  # the one host synchronisation
        if all(n == lk for n in lens_h):
            return None
        live = [n > 0 for n in lens_h]
        q_lens = tuple(lq for n in lens_h if n > 0)
        k_lens = tuple(n for n in lens_h if n > 0)
        if not q_lens:
            return VarlenPlan(batch, lq, lk, [])
        q_index = None if all(live) else _true_rows((lens > 0)[:, None].expand(batch, lq), sum(q_lens))
        return VarlenPlan(batch, lq, lk, [Segment(False, q_lens, k_lens, q_index, _true_rows(keep, sum(k_lens)))])

    off = lk - lq
    first = max(0, -off)  # queries before this one see no key at all
    is_prefix = (keep == (torch.arange(lk, device=device)[None, :] < lens[:, None])).all(1)
    n_causal = (lens - max(off, 0)).clamp_min(0)  # queries of the causal block, from `first` on
    n_full = torch.where(lens > 0, lq - first - n_causal, 0)  # queries after it, seeing every kept key
    lens_h, prefix_h, causal_h, full_h = torch.stack([lens, is_prefix.long(), n_causal, n_full]).tolist()
    if all(n == lk for n in lens_h):
        return None
    if not all(prefix_h):
        bad = [b for b, ok in enumerate(prefix_h) if not ok]
        raise CausalMaskNotPrefix(f"causal attention with a key padding mask that is not a prefix in rows {bad[:8]}")

    def segment(is_causal: bool, counts: Sequence[int], rows: Tensor, uses: Tensor) -> Segment:
        q_lens = tuple(c for c in counts if c > 0)
        k_lens = tuple(n for n, c in zip(lens_h, counts) if c > 0)
        return Segment(is_causal, q_lens, k_lens, _true_rows(rows, sum(q_lens)),
                       _true_rows(keep & uses[:, None], sum(k_lens)))

    segments = []
    if any(causal_h):
        rows = (qpos >= first) & (qpos < first + n_causal[:, None])
        segments.append(segment(True, causal_h, rows, n_causal > 0))
    if any(full_h):
        rows = (qpos >= first + n_causal[:, None]) & (lens > 0)[:, None]
        segments.append(segment(False, full_h, rows, n_full > 0))
    return VarlenPlan(batch, lq, lk, segments)


# Plans per mask tensor: id -> (weak reference, version, {(causal, lq): plan or exception}).
_PLAN_CACHE: Dict[int, Tuple[weakref.ref, int, Dict[Tuple[bool, int], object]]] = {}
_PLAN_CACHE_SIZE = 16


def plan_for(key_padding_mask: Tensor, causal: bool, lq: int, lk: int) -> Optional[VarlenPlan]:
    """:func:`build_plan`, cached for this mask tensor while it is alive and unmodified."""
    key = id(key_padding_mask)
    entry = _PLAN_CACHE.get(key)
    if entry is None or entry[0]() is not key_padding_mask or entry[1] != key_padding_mask._version:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            for k in [k for k, e in _PLAN_CACHE.items() if e[0]() is None] or [next(iter(_PLAN_CACHE))]:
                del _PLAN_CACHE[k]
        entry = (weakref.ref(key_padding_mask), key_padding_mask._version, {})
        _PLAN_CACHE[key] = entry
    plans = entry[2]
    if (causal, lq) not in plans:
        try:
            plans[(causal, lq)] = build_plan(key_padding_mask, causal, lq, lk)
        except CausalMaskNotPrefix as exc:
            plans[(causal, lq)] = exc
    plan = plans[(causal, lq)]
    if isinstance(plan, CausalMaskNotPrefix):
        raise plan
    return plan


def _connected_zeros(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Zeros shaped like ``q`` whose gradient reaches q, k and v (as exact zeros)."""
    no = torch.zeros((), dtype=torch.bool, device=q.device)
    out = torch.where(no, q, 0)
    for t in (k, v):
        if t.numel():
            out = out + torch.where(no, t.reshape(-1)[0], 0)
    return out


def attend_packed(plan: VarlenPlan, q: Tensor, k: Tensor, v: Tensor, kernel: VarlenKernel) -> Tensor:
    """Run the plan's segments with ``kernel``; q ``(B, Lq, H, D)``, k, v ``(B, Lk, H, D)`` ->
    ``(B, Lq, H, D)``. Gathers and scatters are differentiable: gradients flow through them."""
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    q_rows = q.reshape(batch * lq, heads, d)
    k_rows, v_rows = k.reshape(batch * lk, heads, d), v.reshape(batch * lk, heads, v.shape[-1])

    def take(rows: Tensor, index: Optional[Tensor]) -> Tensor:
        return rows if index is None else rows.index_select(0, index)

    if len(plan.segments) == 1 and plan.segments[0].q_index is None:
        seg = plan.segments[0]
        out = kernel(q_rows, take(k_rows, seg.k_index), take(v_rows, seg.k_index), seg)
        return out.view(batch, lq, heads, -1)
    out = _connected_zeros(q_rows, k_rows, v_rows) if not plan.segments else None
    for seg in plan.segments:
        part = kernel(take(q_rows, seg.q_index), take(k_rows, seg.k_index), take(v_rows, seg.k_index), seg)
        if out is None:
            out = part.new_zeros(batch * lq, heads, part.shape[-1])
        out = out.index_copy(0, seg.q_index, part)
    return out.view(batch, lq, heads, -1)


def attend_dense(q: Tensor, k: Tensor, v: Tensor, causal: bool, kernel: DenseKernel) -> Tensor:
    """Unmasked or causal attention on ``(B, L, H, D)`` tensors with ``kernel``; the first
    ``Lq - Lk`` queries of a causal call with ``Lq > Lk`` see no key and are zeros (the kernel
    only ever sees ``Lq <= Lk``, where every causal row keeps a key)."""
    lq, lk = q.shape[1], k.shape[1]
    if causal and lq > lk:
        part = kernel(q[:, lq - lk:], k, v, True)
        return torch.cat([part.new_zeros(q.shape[0], lq - lk, *part.shape[2:]), part], dim=1)
    return kernel(q, k, v, causal)


def attend(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
           dense: DenseKernel, varlen: VarlenKernel) -> Tensor:
    """A library backend's attention: ``(B, H, L, D)`` views in, ``(B, H, Lq, D)`` out (stored
    ``(B, Lq, H, D)``); unmasked and causal calls through ``dense``, key padding through the
    packed segments and ``varlen``. Raises :class:`CausalMaskNotPrefix` where a causal key padding
    mask keeps keys that are not a prefix (before any kernel runs)."""
    qb, kb, vb = (to_bmhk(t) for t in (q, k, v))
    plan = None if key_padding_mask is None else plan_for(key_padding_mask, causal, q.shape[2], k.shape[2])
    out = attend_dense(qb, kb, vb, causal, dense) if plan is None else attend_packed(plan, qb, kb, vb, varlen)
    return out.transpose(1, 2)


def to_bmhk(t: Tensor, alignment: int = 8) -> Tensor:
    """``(B, H, L, D)`` -> the ``(B, L, H, D)`` view the libraries take, copied only when the
    view's strides or offset are not multiples of ``alignment`` elements (16 bytes in half
    precision) or its last dimension is not contiguous."""
    t = t.transpose(1, 2)
    strides_ok = all(s % alignment == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    if t.stride(-1) != 1 or not strides_ok or t.storage_offset() % alignment:
        t = t.contiguous()
    return t


def check_call(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], dropout_p: float,
               need_weights: bool, library: str) -> Optional[str]:
    """The checks every library-backed attention backend makes: None when the call is well
    formed and on CUDA, else the reason."""
    if need_weights:
        return f"{library} does not return attention probabilities (need_weights=True)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D (B, H, L, D) tensor"
    if q.device.type != "cuda":
        return f"tensors on {q.device.type}: {library} runs CUDA tensors only"
    if not (q.device == k.device == v.device):
        return f"q, k and v are on different devices ({q.device}, {k.device}, {v.device})"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    batch, heads, lq, d = q.shape
    if k.shape[:2] != (batch, heads) or v.shape[:3] != k.shape[:3] or k.shape[3] != d or v.shape[3] != d:
        return f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            return f"key_padding_mask must be (B, Lk) = {(batch, k.shape[2])}"
        if key_padding_mask.device != q.device:
            return f"key_padding_mask is on {key_padding_mask.device}, inputs on {q.device}"
    if not 0.0 <= float(dropout_p) < 1.0:
        return f"dropout_p must be in [0, 1), got {dropout_p}"
    return None


def host_sync_forbidden(key_padding_mask: Optional[Tensor]) -> Optional[str]:
    """Why a masked call cannot run now (CUDA-graph capture), else None."""
    if key_padding_mask is None or torch.compiler.is_compiling():
        return None
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return ("a key padding mask becomes varlen sequence lengths on the host (a device "
                "synchronisation), which CUDA-graph capture forbids")
    return None
