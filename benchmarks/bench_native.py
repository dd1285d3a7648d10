"""Kernel micro-benchmarks of the native CUDA extension (the ``cuda`` backend), sections of
``python -m benchmarks --kernels`` (see ``benchmarks/kernels.py``):

* ``native_layer_norm``: LayerNorm forward and backward, with and without the residual add, at
  BLIP's shapes in bf16: the native kernels, the Triton kernels and torch (``F.layer_norm`` after
  the add, as the reference computes), eager (host time included: what a model call costs) and
  replayed from CUDA graphs (GPU time), with the bandwidth reached against a device-to-device
  copy of the same bytes timed the same way in the same run;
* ``momentum_update``: the EMA over BLIP_Pretrain's momentum parameters (ViT-B/16 + BERT-base
  with cross-attention + projections, float32): the native multi-tensor kernel against
  ``torch._foreach_lerp_``, the ``_foreach_mul_`` + ``_foreach_add_`` pair of the ``sdpa``
  backend, the per-tensor loop of the reference, and ``blip_fast.ops`` under ``auto``.

Without the extension the native rows say why and the others are still measured.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import kernels as K

#: name, rows, N, eps, residual
NATIVE_LN_CASES = [
    ("vit_b_64x197x768", 64 * 197, 768, 1e-6, False),
    ("vit_b_64x197x768_res", 64 * 197, 768, 1e-6, True),
    ("vit_b_128x197x768", 128 * 197, 768, 1e-6, False),
    ("vit_b_128x197x768_res", 128 * 197, 768, 1e-6, True),
    ("bert_128x35x768", 128 * 35, 768, 1e-12, False),
    ("bert_128x35x768_res", 128 * 35, 768, 1e-12, True),
    ("vit_l_64x197x1024", 64 * 197, 1024, 1e-6, False),
    ("vit_l_64x197x1024_res", 64 * 197, 1024, 1e-6, True),
]
NATIVE_LN_QUICK = ("vit_b_64x197x768", "bert_128x35x768_res", "vit_l_64x197x1024")
NATIVE_LN_SMOKE = [("tiny", 9, 48, 1e-6, False), ("tiny_res", 9, 48, 1e-12, True)]


def _native() -> Optional[str]:
    """None when the native extension runs here, else why not."""
    from blip_fast import native
    from blip_fast.ops import _dispatch
    reason = _dispatch.get_backend_object("cuda").unavailable_reason
    if reason is None and not native.is_loaded():
        reason = "the cuda backend runs on apex here, not on the native extension"
    return reason


def _rate(row: Dict[str, Any], key: str, nbytes: int, copy_gbps: float) -> None:
    ms = row.get(f"{key}_graph_ms")
    if ms:
        gbps = nbytes / ms / 1e6
        row[f"{key}_gbps"] = round(gbps, 1)
        row[f"{key}_pct_copy"] = round(100 * gbps / copy_gbps, 1)


def section_native_layer_norm(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from blip_fast import ops
    from blip_fast._kernels.triton import layer_norm as tln
    from blip_fast.ops import reference as ref
    timer, dtype = ctx["timer"], K.DTYPE
    reason = _native()
    out: Dict[str, Any] = {"native": reason or "loaded"}
    cases = NATIVE_LN_SMOKE if K.SMOKE else [c for c in NATIVE_LN_CASES if not ctx["quick"] or c[0] in NATIVE_LN_QUICK]
    nat = torch.ops.blip_fast_cuda if reason is None else None
    for name, rows, n, eps, has_res in cases:
        e = torch.finfo(dtype).bits // 8
        fwd_bytes = (2 + has_res) * rows * n * e       # read x (and r), write y
        bwd_bytes = (3 + has_res) * rows * n * e       # read x (and r) and dy, write dx (= dr)
        copy_f, copy_b = K.copy_gbps(fwd_bytes, timer, graph=True), K.copy_gbps(bwd_bytes, timer, graph=True)
        sets = K._ln_sets(rows, n, has_res, dtype, max(2, min(8, (256 << 20) // fwd_bytes)))
        case: Dict[str, Any] = dict(rows=rows, n=n, residual=has_res, eps=eps, fwd_bytes=fwd_bytes,
                                    bwd_bytes=bwd_bytes, copy_graph_gbps_fwd_size=round(copy_f, 1),
                                    copy_graph_gbps_bwd_size=round(copy_b, 1))
        model_calls = {
            "torch": lambda x, r, w, b: ref.layer_norm(x, w, b, eps, r),
            "triton": lambda x, r, w, b: tln.layer_norm(x, w, b, eps, r),
        }
        if nat is not None:
            model_calls["cuda"] = lambda x, r, w, b: nat.layer_norm(x, w, b, eps, r)
            x, r, w, b, _ = sets[0]
            y64 = ref.layer_norm(x.double(), w.double(), b.double(), eps, None if r is None else r.double())
            case["cuda_rel_err_fwd"] = K.rel_err(nat.layer_norm(x, w, b, eps, r), y64)
        for backend in ("cuda", "triton", "auto"):
            if backend != "cuda" or nat is not None:
                model_calls[f"ops_{backend}"] = _via_ops(ops, backend, eps)
        for impl, fn in model_calls.items():
            row: Dict[str, Any] = {}
            try:
                row["fwd_ms"] = timer.eager(K.cycle_calls([lambda s=s: fn(*s[:4]) for s in sets]))
                steps = [lambda s=s: torch.autograd.grad(fn(*s[:4]), [t for t in s[:4] if t is not None], s[4])
                         for s in sets]
                row["fwd_bwd_ms"] = timer.eager(K.cycle_calls(steps))
                if impl in ("torch", "triton", "cuda"):
                    row.update(_graph_times(impl, sets, eps, timer, nat, tln))
                    _rate(row, "fwd", fwd_bytes, copy_f)
                    _rate(row, "bwd", bwd_bytes, copy_b)
            except Exception as exc:  # noqa: BLE001 - a failing implementation is a result
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                K._sync()
            case[impl] = row
        if nat is None:
            case["cuda"] = {"error": reason}
        K.log(f"native_layer_norm {name}: " + json.dumps(case))
        out[name] = case
        del sets
    return out


def _via_ops(ops, backend: str, eps: float):
    def call(x, r, w, b):
        with ops.use_backend(backend):
            return ops.layer_norm(x, w, b, eps, residual=r)
    return call


def _graph_times(impl: str, sets, eps: float, timer, nat, tln) -> Dict[str, float]:
    """GPU time of the forward and of the backward kernels alone, replayed from CUDA graphs."""
    n = sets[0][0].shape[-1]
    with torch.no_grad():
        if impl == "cuda":
            saved = [(s, nat.layer_norm_fwd(s[0], s[2], s[3], eps, s[1], True)) for s in sets]
            fwd = [lambda s=s: nat.layer_norm_fwd(s[0], s[2], s[3], eps, s[1], True) for s in sets]
            # residual of x's dtype: its gradient is dx (the autograd asks for dx only)
            bwd = [lambda s=s, o=o: nat.layer_norm_bwd(s[4], s[0], s[1], s[2], s[3], o[1], o[2], True, False, True, True)
                   for s, o in saved]
        elif impl == "triton":
            saved = [(s, tln._forward(s[0], s[1], s[2], s[3], eps, 0.0, None)) for s in sets]
            fwd = [lambda s=s: tln._forward(s[0], s[1], s[2], s[3], eps, 0.0, None) for s in sets]
            bwd = [lambda s=s, o=o: tln._backward(s[4], s[0], s[1], s[2], o[1], o[2], 0.0, None, True,
                                                  s[1] is not None, True, s[3].dtype) for s, o in saved]
        else:  # torch: the add, then aten's LayerNorm; its backward reads the sum once
            def forward(s):
                x = s[0] if s[1] is None else s[0] + s[1]
                return x, torch.ops.aten.native_layer_norm(x, [n], s[2], s[3], eps)
            saved = [(s, forward(s)) for s in sets]
            fwd = [lambda s=s: forward(s) for s in sets]
            bwd = [lambda s=s, o=o: torch.ops.aten.native_layer_norm_backward(
                s[4], o[0], [n], o[1][1], o[1][2], s[2], s[3], [True, True, True]) for s, o in saved]
        times = {"fwd_graph_ms": timer.graph(K.cycle_calls(fwd)), "bwd_graph_ms": timer.graph(K.cycle_calls(bwd))}
    times["fwd_bwd_graph_ms"] = times["fwd_graph_ms"] + times["bwd_graph_ms"]
    return times


# ---------------------------------------------------------------------------- momentum update

def blip_pretrain_momentum_params(device: str) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(momentum, online)`` parameter lists of a BLIP_Pretrain with ViT-B/16 (float32), built
    on ``device``; on the smoke run a tiny model's."""
    from blip_fast.models import BLIP_Pretrain
    kwargs = {}
    if K.SMOKE:
        kwargs = dict(vit={"embed_dim": 32, "depth": 2, "num_heads": 2},
                      med_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 64, "encoder_width": 32, "add_cross_attention": True,
                                  "vocab_size": 30524, "max_position_embeddings": 64, "layer_norm_eps": 1e-12,
                                  "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                                  "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
                                  "pad_token_id": 0}, image_size=32)
    with torch.device(device):
        model = BLIP_Pretrain(queue_size=64, **kwargs)
    online, momentum = model._momentum_params()
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p), alpha=0.01)
    return [p.detach() for p in momentum], [p.detach() for p in online]


def section_momentum_update(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from blip_fast import ops
    from blip_fast.ops import reference as ref
    from blip_fast.ops import sdpa
    if K.WARM:
        return {"skipped": "nothing to compile"}
    timer, m = ctx["timer"], 0.995
    params_m, params = blip_pretrain_momentum_params(K.DEV)
    nbytes = 3 * sum(p.numel() * p.element_size() for p in params_m)  # read p_m and p, write p_m
    copy_e, copy_g = K.copy_gbps(nbytes, timer), K.copy_gbps(nbytes, timer, graph=True)
    reason = _native()
    out: Dict[str, Any] = dict(tensors=len(params_m), elements=sum(p.numel() for p in params_m),
                               bytes_moved=nbytes, copy_gbps=round(copy_e, 1), copy_graph_gbps=round(copy_g, 1),
                               native=reason or "loaded")
    impls = {}
    if reason is None:
        impls["cuda"] = lambda: torch.ops.blip_fast_cuda.momentum_update_(params_m, params, m)
    impls["foreach_lerp"] = lambda: torch._foreach_lerp_(params_m, params, 1.0 - m)
    impls["foreach_mul_add (sdpa backend)"] = lambda: sdpa.momentum_update(params_m, params, m)
    impls["per_tensor_loop (reference)"] = lambda: ref.momentum_update(params_m, params, m)

    def via_ops(backend):
        def call():
            with ops.use_backend(backend):
                ops.momentum_update(params_m, params, m)
        return call
    if reason is None:
        impls["ops_cuda"] = via_ops("cuda")
    impls["ops_auto"] = via_ops("auto")
    out["auto_picks"] = ops.resolve("momentum_update", params_m, params, m)[0]
    rows: Dict[str, Any] = {}
    with torch.no_grad():
        for impl, fn in impls.items():
            row: Dict[str, Any] = {}
            try:
                row["eager_ms"] = timer.eager(fn)
                if not impl.startswith("per_tensor"):  # thousands of launches: the GPU would set the pace
                    row["host_us"] = round(K.host_us(fn, calls=10), 1)
                if not impl.startswith("ops_"):
                    row["graph_ms"] = timer.graph(fn)
                    gbps = nbytes / row["graph_ms"] / 1e6
                    row["graph_gbps"] = round(gbps, 1)
                    row["graph_pct_copy"] = round(100 * gbps / copy_g, 1)
                row["eager_gbps"] = round(nbytes / row["eager_ms"] / 1e6, 1)
                row["eager_pct_copy"] = round(100 * row["eager_gbps"] / copy_e, 1)
            except Exception as exc:  # noqa: BLE001 - a failing implementation is a result
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                K._sync()
            rows[impl] = row
            K.log(f"momentum_update {impl}: " + json.dumps(row))
    if reason is not None:
        rows["cuda"] = {"error": reason}
    out["results"] = rows
    return out


# ------------------------------------------------------------------------------------- report

def markdown(report: Dict[str, Any]) -> List[str]:
    """Tables of the two sections (lines for kernels.markdown)."""
    lines: List[str] = []
    ln = report.get("native_layer_norm")
    if isinstance(ln, dict) and any(isinstance(v, dict) and "rows" in v for v in ln.values()):
        lines.append("\n**LayerNorm, native CUDA vs Triton vs torch** (bf16; ms; GB/s and % of a copy of the same "
                     "bytes, both from CUDA graphs; eager includes host time; ops_*: through blip_fast.ops)\n")
        lines.append("| case | impl | fwd eager | fwd+bwd eager | fwd graph | bwd graph | fwd GB/s | fwd % copy | "
                     "bwd GB/s | bwd % copy |")
        lines.append("|---|---|" + "---:|" * 8)
        for name, c in ln.items():
            if not isinstance(c, dict) or "rows" not in c:
                continue
            for impl in ("cuda", "triton", "torch", "ops_cuda", "ops_triton", "ops_auto"):
                r = c.get(impl)
                if not isinstance(r, dict):
                    continue
                if "error" in r:
                    lines.append(f"| {name} | {impl} | {r['error'][:80]} |" + " |" * 7)
                    continue
                lines.append(f"| {name} | {impl} | {K._fmt(r.get('fwd_ms'), 4)} | {K._fmt(r.get('fwd_bwd_ms'), 4)} | "
                             f"{K._fmt(r.get('fwd_graph_ms'), 4)} | {K._fmt(r.get('bwd_graph_ms'), 4)} | "
                             f"{K._fmt(r.get('fwd_gbps'), 1)} | {K._fmt(r.get('fwd_pct_copy'), 1)} | "
                             f"{K._fmt(r.get('bwd_gbps'), 1)} | {K._fmt(r.get('bwd_pct_copy'), 1)} |")
    mu = report.get("momentum_update")
    if isinstance(mu, dict) and "results" in mu:
        lines.append(f"\n**Momentum update** (BLIP_Pretrain ViT-B/16 momentum set: {mu['tensors']} tensors, "
                     f"{mu['elements'] / 1e6:.1f} M float32 elements, {mu['bytes_moved'] / 1e9:.2f} GB moved; "
                     f"copy {mu['copy_graph_gbps']} GB/s graph, {mu['copy_gbps']} eager; auto picks "
                     f"{mu.get('auto_picks')})\n")
        lines.append("| impl | eager ms | host µs per call | graph ms | graph GB/s | graph % copy | eager % copy |")
        lines.append("|---|" + "---:|" * 6)
        for impl, r in mu["results"].items():
            if "error" in r:
                lines.append(f"| {impl} | {r['error'][:80]} |" + " |" * 5)
                continue
            lines.append(f"| {impl} | {K._fmt(r.get('eager_ms'), 4)} | {r.get('host_us', '-')} | {K._fmt(r.get('graph_ms'), 4)} | "
                         f"{K._fmt(r.get('graph_gbps'), 1)} | {K._fmt(r.get('graph_pct_copy'), 1)} | "
                         f"{K._fmt(r.get('eager_pct_copy'), 1)} |")
    return lines

