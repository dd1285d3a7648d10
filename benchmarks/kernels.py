"""Kernel micro-benchmarks of the suite: ``python -m benchmarks --kernels`` (or
``python -m benchmarks.kernels``, ``blip-fast bench --kernels``).

On one CUDA device, for each hot op of the models, at BLIP's shapes:

* **attention** (bf16): the Triton kernel, ``blip_fast.ops.attention`` as the models call it
  (``triton``, ``sdpa``, ``xformers`` / ``flash_attn`` where importable, and ``auto`` backends),
  every torch SDPA backend that takes the same mask, xformers / flash-attn, and the reference;
  ``attention_timings.json`` holds the eager ``ops_*`` times in the form
  ``blip_fast.ops.measured`` reads; forward and forward+backward, eager (``do_bench``, L2 flushed: host time
  counts where it exceeds the GPU time) and replayed from a CUDA graph (GPU time);
* **layer_norm** forward / backward GB/s against a device-to-device copy timed in the same run,
  eager and CUDA graph, with and without residual + dropout;
* **bias_gelu** and **linear_gelu** against torch (``addmm`` + ``gelu``);
* **linear_cross_entropy** time and peak memory against ``F.linear`` + ``F.cross_entropy``;
* **host** microseconds per call (launch path only, tiny shapes), direct launch vs triton's JIT,
  and a cProfile of one op;
* **crossover**: eager time of the triton and the alternative backend as the work grows, the
  measurement behind the ``auto`` routing in ``blip_fast/ops/triton_backend.py``;
* **sweeps** of launch parameters (GPU time);
* **native_layer_norm** and **momentum_update**: the native CUDA extension (the ``cuda`` backend)
  against the Triton kernels and torch (``benchmarks/bench_native.py``).

Writes ``kernels.json`` (every number), ``kernels.md`` (tables) and ``host_profile.txt`` into
``--out``. Each section is independent: one that fails is recorded and the rest still run.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import itertools
import json
import os
import platform
import pstats
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

SWEEP_SHAPES = ("vit224_self", "vit384_self", "vit480_self", "smoke_self")
SECTIONS = ("env", "graph_dropout", "attention", "layer_norm", "gelu", "cross_entropy", "host",
            "crossover", "sweeps", "native_layer_norm", "momentum_update")


# ============================================================================================
# Timing
# ============================================================================================

#: Set by --smoke: the CPU, the Triton interpreter and tiny shapes, to check the script runs.
SMOKE = False
#: Set in --warm workers: every case runs once, untimed, to fill triton's compile cache.
WARM = False
DEV = "cuda"
DTYPE = torch.bfloat16


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEV == "cuda" else "cpu (Triton interpreter, smoke run)"


class Timer:
    """Eager (``do_bench``) and CUDA-graph (``do_bench_cudagraph``) medians in ms."""

    def __init__(self, quick: bool):
        self.rep = 30 if quick else 60
        self.warmup = 10 if quick else 20
        self.graph_rep = 10 if quick else 20

    def eager(self, fn: Callable[[], object]) -> float:
        if SMOKE or WARM:
            return _wall_ms(fn)
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median"))

    def graph(self, fn: Callable[[], object]) -> float:
        if SMOKE or WARM:
            return _wall_ms(fn)
        from triton.testing import do_bench_cudagraph
        return float(do_bench_cudagraph(fn, rep=self.graph_rep, return_mode="median"))


def _wall_ms(fn: Callable[[], object]) -> float:
    fn()
    if WARM:
        return 1.0
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cycle_calls(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    it = itertools.cycle(fns)
    return lambda: next(it)()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def host_us(fn: Callable[[], object], calls: int = 100) -> float:
    """Host microseconds per call: wall time of issuing ``calls`` calls, device sync excluded
    (shapes must be small enough that the GPU keeps up, so the launch queue never blocks)."""
    if SMOKE or WARM:
        calls = 1
    for _ in range(1 if SMOKE or WARM else 3):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _sync()
    return elapsed / calls * 1e6


def copy_gbps(nbytes: int, timer: Timer, graph: bool = False) -> float:
    """``dst.copy_(src)`` bandwidth counting bytes read + written (``nbytes`` moved in all),
    timed like the op it is compared with (eager, or replayed from a CUDA graph)."""
    numel = max(1, nbytes // 4)
    pairs = []
    for _ in range(max(2, min(8, (256 << 20) // max(1, nbytes)))):
        src = torch.empty(numel // 2 + 1, dtype=torch.float32, device=DEV).uniform_()
        pairs.append((src, torch.empty_like(src)))
    call = cycle_calls([lambda s=s, d=d: d.copy_(s) for s, d in pairs])
    ms = timer.graph(call) if graph else timer.eager(call)
    return nbytes / ms / 1e6


# ============================================================================================
# Sections
# ============================================================================================

def section_env(ctx: Dict[str, Any]) -> Dict[str, Any]:
    import triton

    from .env import git_commit
    timer = ctx["timer"]
    size = 64 if SMOKE else 8192
    mats = [torch.randn(size, size, device=DEV, dtype=DTYPE) for _ in range(2)]
    mm_ms = timer.eager(lambda: mats[0] @ mats[1])
    mats.clear()
    return dict(device=_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.date.today().isoformat(),
                commit=git_commit(), copy_gbps_1GiB=round(copy_gbps(1 << (20 if SMOKE else 30), timer), 1),
                bf16_matmul_tflops=round(2 * size**3 / mm_ms / 1e9, 1),
                smoke=SMOKE)


def section_graph_dropout(ctx: Dict[str, Any]) -> Dict[str, Any]:
    """Dropout under CUDA-graph capture: each replay draws a fresh mask; eager runs are
    reproducible from torch.manual_seed; the backward uses the forward's mask."""
    from blip_fast._kernels.triton import attention as attn
    from blip_fast._kernels.triton import layer_norm as ln

    if SMOKE:
        return {"skipped": "needs CUDA graphs"}
    q, k, v = (torch.randn(4, 4, 64, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    x = torch.randn(256, 768, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 4, 64, 64, device=DEV, dtype=torch.bfloat16)
    static = {}

    def step():
        out = attn.attention(q, k, v, dropout_p=0.3)
        y = ln.layer_norm(x, None, None, 1e-6, dropout_p=0.3)
        dq, = torch.autograd.grad(out, (q,), g)
        static.update(out=out, y=y, dq=dq)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replays = []
    for _ in range(2):
        graph.replay()
        _sync()
        replays.append({n: t.clone() for n, t in static.items()})
    torch.manual_seed(7)
    e1 = attn.attention(q, k, v, dropout_p=0.3).detach()
    torch.manual_seed(7)
    e2 = attn.attention(q, k, v, dropout_p=0.3).detach()
    return dict(
        replays_differ_attention=not torch.equal(replays[0]["out"], replays[1]["out"]),
        replays_differ_layer_norm=not torch.equal(replays[0]["y"], replays[1]["y"]),
        replays_differ_grad=not torch.equal(replays[0]["dq"], replays[1]["dq"]),
        eager_reproducible=torch.equal(e1, e2),
    )


# ------------------------------------------------------------------------------------ attention

def _shape_list():
    from .bench_attention import SHAPES, Shape
    if SMOKE:
        return [Shape("smoke_self", 2, 2, 20, 20, head_dim=16),
                Shape("smoke_pad_causal", 2, 2, 9, 9, head_dim=16, padding=True, causal=True)]
    return list(SHAPES)


def _attention_shapes(quick: bool, only: Optional[Sequence[str]] = None):
    shapes = _shape_list()
    return [s for s in shapes if s.name in only] if only else shapes


def _attention_impls(shape) -> Dict[str, Callable]:
    from blip_fast import ops

    from .bench_attention import candidates

    fns = dict(candidates(shape))

    def via_ops(backend):
        def call(q, k, v, m):
            return ops.attention(q, k, v, key_padding_mask=m, causal=shape.causal)
        return backend, call

    from .bench_attention import library_attention
    for backend in ("triton", "sdpa", *library_attention(), "auto"):
        fns[f"ops_{backend}"] = via_ops(backend)
    return fns


def _xformers_ops(x: Dict[str, Any], causal: bool) -> Any:
    """The xformers forward operator these inputs take (e.g. FlashAttention-2 or CUTLASS)."""
    from blip_fast.ops.xformers_backend import kernels_used
    try:
        return kernels_used(x["q"], x["k"], x["v"], x["mask"], causal)
    except Exception as exc:  # noqa: BLE001 - a report detail, not a result
        return f"unknown ({exc!r})"[:160]


@contextlib.contextmanager
def _backend(name: Optional[str]):
    from blip_fast import ops
    if name is None:
        yield
        return
    ops.set_backend(name)
    try:
        yield
    finally:
        ops.set_backend(None)


def section_attention(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from .bench_attention import _max_rel_err, _step, kernel_breakdown, make_inputs
    timer = ctx["timer"]
    results = {}
    for shape in _attention_shapes(ctx["quick"], ctx.get("only_shapes") or ctx.get("attention_shapes")):
        sets = [make_inputs(shape, DTYPE, torch.device(DEV), seed) for seed in range(3)]
        res: Dict[str, Dict[str, Any]] = {}
        for name, fn in _attention_impls(shape).items():
            backend = None
            if isinstance(fn, tuple):
                backend, fn = fn
            row: Dict[str, Any] = {}
            try:
                with _backend(backend):
                    row["rel_err"] = _max_rel_err(fn, sets[0], shape)
                    row["fwd_ms"] = timer.eager(_step(fn, sets, backward=False))
                    row["fwd_bwd_ms"] = timer.eager(_step(fn, sets, backward=True))
                    if backend is None:  # the ops_* rows launch the same kernels as their peers
                        row["fwd_graph_ms"] = timer.graph(_step(fn, sets, backward=False))
                        row["fwd_bwd_graph_ms"] = timer.graph(_step(fn, sets, backward=True))
                    if name == "triton" and not SMOKE:
                        row["kernels_us"] = kernel_breakdown(fn, sets)
                    if name == "xformers":
                        row["xformers_ops"] = _xformers_ops(sets[0], shape.causal)
            except Exception as exc:  # noqa: BLE001 - an SDPA backend refusing the mask is a result
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                _sync()
            res[name] = row
            log(f"attention {shape.name} {name}: " + json.dumps({k: v for k, v in row.items() if k != "kernels_us"}))
        results[shape.name] = dict(shape=shape.__dict__, results=res, flops_fwd=4 * shape.batch * shape.heads
                                   * shape.lq * shape.lk * shape.head_dim)
        del sets
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------- layer norm

LN_CASES = [  # name, rows, N, eps, residual, dropout
    ("vit_b_64x197x768", 64 * 197, 768, 1e-6, False, 0.0),
    ("vit_l_64x197x1024", 64 * 197, 1024, 1e-6, False, 0.0),
    ("vit_b384_32x577x768", 32 * 577, 768, 1e-6, False, 0.0),
    ("bert_192x30x768_res", 192 * 30, 768, 1e-12, True, 0.0),
    ("bert_192x30x768_res_drop0.1", 192 * 30, 768, 1e-12, True, 0.1),
    ("bert_128x35x768_res_drop0.1", 128 * 35, 768, 1e-12, True, 0.1),
]
LN_QUICK = ("vit_b_64x197x768", "vit_l_64x197x1024", "bert_192x30x768_res", "bert_192x30x768_res_drop0.1")
LN_SMOKE_CASES = [("tiny_res_drop", 9, 48, 1e-12, True, 0.1), ("tiny", 9, 48, 1e-6, False, 0.0)]


def _ln_sets(rows, n, has_res, dtype, count):
    sets = []
    for _ in range(count):
        x = torch.randn(rows, n, device=DEV, dtype=dtype).mul_(2).add_(0.3).requires_grad_()
        r = torch.randn(rows, n, device=DEV, dtype=dtype, requires_grad=True) if has_res else None
        w = torch.randn(n, device=DEV, dtype=dtype).add_(1).requires_grad_()
        b = torch.randn(n, device=DEV, dtype=dtype, requires_grad=True)
        sets.append((x, r, w, b, torch.randn(rows, n, device=DEV, dtype=dtype)))
    return sets


def section_layer_norm(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from blip_fast._kernels.triton import common
    from blip_fast._kernels.triton import layer_norm as ln
    from blip_fast.ops import reference as ref
    timer, dtype = ctx["timer"], DTYPE
    out = {}
    cases = LN_SMOKE_CASES if SMOKE else [c for c in LN_CASES if not ctx["quick"] or c[0] in LN_QUICK]
    for name, rows, n, eps, has_res, p in cases:
        e = 2
        fwd_bytes = (2 + has_res) * rows * n * e
        bwd_bytes = (2 + has_res + 1 + (has_res and p > 0)) * rows * n * e
        copy_f, copy_b = copy_gbps(fwd_bytes, timer), copy_gbps(bwd_bytes, timer)
        copy_fg, copy_bg = copy_gbps(fwd_bytes, timer, graph=True), copy_gbps(bwd_bytes, timer, graph=True)
        sets = _ln_sets(rows, n, has_res, dtype, max(2, min(8, (256 << 20) // fwd_bytes)))
        impls = {"triton": lambda x, r, w, b: ln.layer_norm(x, w, b, eps, r, p),
                 "reference": lambda x, r, w, b: ref.layer_norm(x, w, b, eps, r, p)}
        case = dict(rows=rows, n=n, residual=has_res, dropout=p, fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes,
                    copy_gbps_fwd_size=round(copy_f, 1), copy_gbps_bwd_size=round(copy_b, 1),
                    copy_graph_gbps_fwd_size=round(copy_fg, 1), copy_graph_gbps_bwd_size=round(copy_bg, 1))
        # parity (no dropout: the reference draws its own mask)
        x, r, w, b, g = sets[0]
        y = ln.layer_norm(x, w, b, eps, r, 0.0)
        y64 = ref.layer_norm(x.double(), w.double(), b.double(), eps, None if r is None else r.double())
        case["rel_err_fwd"] = rel_err(y, y64)
        for impl, fn in impls.items():
            row = {}
            fwd = [lambda s=s: fn(*s[:4]) for s in sets]
            row["fwd_ms"] = timer.eager(cycle_calls(fwd))
            graphs = []
            for s in sets:
                yy = fn(*s[:4])
                leaves = [t for t in (s[0], s[1], s[2], s[3]) if t is not None]
                graphs.append((yy, leaves, s[4]))
            bwd = [lambda yy=yy, lv=lv, gg=gg: torch.autograd.grad(yy, lv, gg, retain_graph=True)
                   for yy, lv, gg in graphs]
            row["bwd_ms"] = timer.eager(cycle_calls(bwd))
            del graphs, bwd
            if impl == "triton":
                # GPU time of the kernels alone: the launch functions below autograd, replayed
                # from a CUDA graph (no autograd state is captured).
                seed = common.draw_seed(torch.device(DEV)) if p > 0 else None
                saved = []
                for x, r, w, b, g in sets:
                    _, mean, rstd = ln._forward(x, r, w, b, eps, p, seed)
                    saved.append((x, r, w, b, g, mean, rstd))
                row["fwd_graph_ms"] = timer.graph(cycle_calls(
                    [lambda s=s: ln._forward(s[0], s[1], s[2], s[3], eps, p, seed) for s in saved]))
                row["bwd_graph_ms"] = timer.graph(cycle_calls(
                    [lambda s=s: ln._backward(s[4], s[0], s[1], s[2], s[5], s[6], p, seed, True, s[1] is not None,
                                              True, s[3].dtype) for s in saved]))
                del saved
            else:
                with torch.no_grad():
                    row["fwd_graph_ms"] = timer.graph(cycle_calls([lambda s=s: fn(*s[:4]) for s in sets]))
            if impl == "triton":
                for key, nbytes, copies in (("fwd", fwd_bytes, (copy_f, copy_fg)), ("bwd", bwd_bytes, (copy_b, copy_bg))):
                    for mode, copy in (("", copies[0]), ("_graph", copies[1])):
                        gbps = nbytes / row[f"{key}{mode}_ms"] / 1e6
                        row[f"{key}{mode}_gbps"] = round(gbps, 1)
                        row[f"{key}{mode}_pct_copy"] = round(100 * gbps / copy, 1)
            case[impl] = row
        log(f"layer_norm {name}: " + json.dumps(case))
        out[name] = case
        del sets
    return out


# ---------------------------------------------------------------------------------- bias + GELU

def section_gelu(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from blip_fast._kernels.triton import bias_gelu as gelu
    timer, dtype = ctx["timer"], DTYPE
    out: Dict[str, Any] = {}
    for name, rows, n in ((("tiny", 9, 48),) if SMOKE else (("vit_fc1_64x197x3072", 64 * 197, 3072), ("bert_ffn_192x30x3072", 192 * 30, 3072))):
        nbytes = 2 * rows * n * 2
        copy = copy_gbps(nbytes, timer)
        sets = [(torch.randn(rows, n, device=DEV, dtype=dtype, requires_grad=True),
                 torch.randn(n, device=DEV, dtype=dtype, requires_grad=True),
                 torch.randn(rows, n, device=DEV, dtype=dtype)) for _ in range(3)]
        x, b, _ = sets[0]
        case: Dict[str, Any] = {"rel_err_fwd": rel_err(gelu.bias_gelu(x, b), F.gelu(x.double() + b.double())),
                                "copy_gbps": round(copy, 1)}
        yb = gelu.bias_gelu(x, b)
        g = sets[0][2]
        dx, db = torch.autograd.grad(yb, (x, b), g)
        x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        dx64, db64 = torch.autograd.grad(F.gelu(x64 + b64), (x64, b64), g.double())
        case["rel_err_dx"], case["rel_err_db"] = rel_err(dx, dx64), rel_err(db, db64)
        for impl, fn in (("triton", gelu.bias_gelu), ("torch", lambda x, b: F.gelu(x + b))):
            fwd = [lambda s=s: fn(s[0], s[1]) for s in sets]
            graphs = [(fn(s[0], s[1]), (s[0], s[1]), s[2]) for s in sets]
            bwd = [lambda y=y, lv=lv, gg=gg: torch.autograd.grad(y, lv, gg, retain_graph=True) for y, lv, gg in graphs]
            row = dict(fwd_ms=timer.eager(cycle_calls(fwd)), bwd_ms=timer.eager(cycle_calls(bwd)))
            del graphs, bwd
            if impl == "triton":  # kernels alone, below autograd (see section_layer_norm)
                row["fwd_graph_ms"] = timer.graph(cycle_calls([lambda s=s: gelu._forward(s[0], s[1]) for s in sets]))
                row["bwd_graph_ms"] = timer.graph(cycle_calls(
                    [lambda s=s: gelu._backward(s[2], s[0], s[1], True) for s in sets]))
            else:
                with torch.no_grad():
                    row["fwd_graph_ms"] = timer.graph(cycle_calls(fwd))
                row["bwd_graph_ms"] = None
            row["fwd_graph_gbps"] = round(nbytes / row["fwd_graph_ms"] / 1e6, 1)
            if row["bwd_graph_ms"]:
                row["bwd_graph_gbps"] = round(1.5 * nbytes / row["bwd_graph_ms"] / 1e6, 1)
            case[impl] = row
        log(f"bias_gelu {name}: " + json.dumps(case))
        out[f"bias_gelu_{name}"] = case
    # linear + GELU: the ViT fc1 / BERT intermediate layer, three ways
    for name, rows, k, n in ((("tiny", 9, 16, 48),) if SMOKE else (("vit_fc1", 64 * 197, 768, 3072), ("bert_intermediate", 192 * 30, 768, 3072),
                             ("vit_l_fc1", 64 * 197, 1024, 4096))):
        x = torch.randn(rows, k, device=DEV, dtype=dtype, requires_grad=True)
        w = (torch.randn(n, k, device=DEV, dtype=dtype) * 0.03).requires_grad_()
        b = torch.randn(n, device=DEV, dtype=dtype, requires_grad=True)
        g = torch.randn(rows, n, device=DEV, dtype=dtype)
        impls = {"triton linear_gelu (mm + fused bias/GELU kernel)": lambda: gelu.linear_gelu(x, w, b),
                 "torch addmm + gelu": lambda: F.gelu(F.linear(x, w, b)),
                 "torch addmm_activation (cuBLASLt GELU epilogue, tanh approx.)":
                     lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)}
        case = {"flops_fwd": 2 * rows * k * n}
        for impl, fn in impls.items():
            row = dict(fwd_ms=timer.eager(fn), fwd_graph_ms=timer.graph(fn))
            try:
                fb = lambda fn=fn: torch.autograd.grad(fn(), (x, w, b), g)  # noqa: E731
                row.update(fwd_bwd_ms=timer.eager(fb), fwd_bwd_graph_ms=timer.graph(fb))
            except Exception as exc:  # noqa: BLE001 - e.g. no derivative for the cuBLASLt epilogue op
                row["fwd_bwd_error"] = repr(exc)[:120]
            case[impl] = row
        log(f"linear_gelu {name}: " + json.dumps(case))
        out[f"linear_gelu_{name}"] = case
    return out


# ------------------------------------------------------------------------------ cross-entropy

def section_cross_entropy(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from blip_fast._kernels.triton import cross_entropy as ce
    timer, dtype = ctx["timer"], DTYPE
    bsz, length, vocab, hid = (2, 8, 300, 16) if SMOKE else (128, 30, 30524, 768)
    h = torch.randn(bsz, length, hid, device=DEV, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hid, device=DEV, dtype=dtype) * 0.05).requires_grad_()
    b = (torch.randn(vocab, device=DEV, dtype=dtype) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (bsz, length), device=DEV)
    labels[:, (3 * length) // 4:] = -100
    params = (h, w, b)

    def unfused(reduction, smoothing):
        loss = F.cross_entropy(F.linear(h, w, b).view(-1, vocab), labels.view(-1), ignore_index=-100,
                               label_smoothing=smoothing, reduction=reduction)
        return loss

    def fused(reduction, smoothing):
        return ce.linear_cross_entropy(h, w, b, labels, smoothing, -100, reduction)

    def step(fn, reduction, smoothing):
        for p in params:
            p.grad = None
        loss = fn(reduction, smoothing)
        (loss.sum() if reduction == "none" else loss).backward()

    def peak(fn):
        if SMOKE:
            fn()
            return float("nan")
        for p in params:
            p.grad = None
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    out: Dict[str, Any] = {"shape": dict(B=bsz, L=length, V=vocab, H=hid, dtype="bfloat16", ignored_per_row=length // 4)}
    with torch.no_grad():
        ref = F.cross_entropy(F.linear(h.double(), w.double(), b.double()).view(-1, vocab), labels.view(-1),
                              ignore_index=-100, label_smoothing=0.1)
        out["rel_err_loss"] = rel_err(fused("mean", 0.1), ref)
    for reduction, smoothing in (("mean", 0.1), ("mean", 0.0), ("none", 0.1)):
        row = {}
        for impl, fn in (("unfused", unfused), ("fused", fused)):
            call = lambda fn=fn: step(fn, reduction, smoothing)  # noqa: E731
            row[f"{impl}_ms"] = timer.eager(call)
            row[f"{impl}_peak_mib"] = round(peak(call), 1)
        row["time_ratio"] = round(row["fused_ms"] / row["unfused_ms"], 3)
        row["peak_ratio"] = round(row["fused_peak_mib"] / row["unfused_peak_mib"], 3)
        out[f"{reduction}_ls{smoothing}"] = row
        log(f"cross_entropy {reduction} {smoothing}: " + json.dumps(row))
    for impl, fn in () if SMOKE else (("fused", fused), ("unfused", unfused)):
        step(fn, "mean", 0.1)
        _sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(fn, "mean", 0.1)
            _sync()
        kernels = {}
        for evt in prof.key_averages():
            t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if t > 0:
                kernels[evt.key[:90]] = round(t / 5, 1)
        out[f"{impl}_kernels_us"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    flops = 3 * 2 * bsz * length * vocab * hid
    rate = ctx["env"].get("bf16_matmul_tflops") or 790.0
    out["roofline"] = dict(matmul_flops=flops, matmul_floor_ms=round(flops / (rate * 1e9), 3))
    return out


# ------------------------------------------------------------------------------------- host time

def section_host(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from blip_fast import ops
    from blip_fast._kernels.triton import attention as attn
    from blip_fast._kernels.triton import bias_gelu as gelu
    from blip_fast._kernels.triton import common
    from blip_fast._kernels.triton import layer_norm as ln

    dev, dt = DEV, DTYPE
    q, k, v = (torch.randn(2, 2, 32, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 2, 32, 64, device=dev, dtype=dt)
    mask = torch.ones(2, 32, dtype=torch.bool, device=dev)
    mask[1, 20:] = False
    x = torch.randn(64, 768, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(768, device=dev, dtype=dt, requires_grad=True)
    gx = torch.randn(64, 768, device=dev, dtype=dt)

    def attn_fb(fn):
        def call():
            out = fn()
            torch.autograd.grad(out, (q, k, v), g)
        return call

    cases = {
        "attention fwd+bwd, triton kernel": attn_fb(lambda: attn.attention(q, k, v, key_padding_mask=mask)),
        "attention fwd+bwd, ops (backend triton)": ("triton", attn_fb(lambda: ops.attention(q, k, v, key_padding_mask=mask))),
        "attention fwd+bwd, ops (backend sdpa)": ("sdpa", attn_fb(lambda: ops.attention(q, k, v, key_padding_mask=mask))),
        "attention fwd+bwd, sdpa no mask": attn_fb(lambda: F.scaled_dot_product_attention(q, k, v)),
        "attention fwd+bwd, reference": ("reference", attn_fb(lambda: ops.attention(q, k, v, key_padding_mask=mask))),
        "attention fwd (no grad), triton kernel": lambda: attn.attention(q.detach(), k.detach(), v.detach(), key_padding_mask=mask),
        "attention fwd (no grad), sdpa no mask": lambda: F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach()),
        "layer_norm fwd+bwd, triton (residual, dropout 0.1)":
            lambda: torch.autograd.grad(ln.layer_norm(x, w, w, 1e-12, x, 0.1), (x, w), gx),
        "layer_norm fwd+bwd, reference (residual, dropout 0.1)":
            lambda: torch.autograd.grad(F.layer_norm(F.dropout(x, 0.1) + x, (768,), w, w, 1e-12), (x, w), gx),
        "layer_norm fwd+bwd, triton": lambda: torch.autograd.grad(ln.layer_norm(x, w, w, 1e-6), (x, w), gx),
        "layer_norm fwd+bwd, torch F.layer_norm": lambda: torch.autograd.grad(F.layer_norm(x, (768,), w, w, 1e-6), (x, w), gx),
        "bias_gelu fwd+bwd, triton": lambda: torch.autograd.grad(gelu.bias_gelu(x, w), (x, w), gx),
        "bias_gelu fwd+bwd, torch": lambda: torch.autograd.grad(F.gelu(x + w), (x, w), gx),
        "autograd floor: x * 2 fwd+bwd": lambda: torch.autograd.grad(x * 2, (x,), gx),
    }
    out: Dict[str, Any] = {}
    for name, fn in cases.items():
        backend = None
        if isinstance(fn, tuple):
            backend, fn = fn
        with _backend(backend):
            out[name] = {"direct_us": round(host_us(fn), 1)}
            if "triton" in name:
                common.set_direct_launch(False)
                try:
                    out[name]["jit_us"] = round(host_us(fn), 1)
                finally:
                    common.set_direct_launch(True)
        log(f"host {name}: {out[name]}")
    plans = list(attn._FWD_PLANS.values()) + list(attn._BWD_PLANS.values())
    out["plans_launched_directly"] = f"{sum(p.direct is not None for p in plans)} of {len(plans)}"
    # Where the time goes: cProfile of the ops path (the way the models call attention).
    fn = attn_fb(lambda: ops.attention(q, k, v, key_padding_mask=mask))
    with _backend("triton"):
        for _ in range(1 if SMOKE else 5):
            fn()
        _sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2 if SMOKE else 200):
            fn()
        prof.disable()
        _sync()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    ctx["host_profile"] = buf.getvalue()
    return out


# ------------------------------------------------------------------------------------ crossover

def section_crossover(ctx: Dict[str, Any]) -> Dict[str, Any]:
    """Eager time of ops.* under each backend as the batch grows: where triton starts winning."""
    from blip_fast import ops
    timer = ctx["timer"]
    dev, dt = DEV, DTYPE
    out: Dict[str, Any] = {}
    patterns = {  # name: (heads, lq, lk, D, masked, causal)
        "self_nomask_L197": (12, 197, 197, 64, False, False),
        "self_pad_L30": (12, 30, 30, 64, True, False),
        "cross_30_to_197": (12, 30, 197, 64, False, False),
        "causal_pad_L30": (12, 30, 30, 64, True, True),
    }
    if SMOKE:
        patterns = {"smoke_pad": (2, 9, 9, 16, True, False), "smoke_causal": (2, 9, 20, 16, False, True)}
    batches = (1, 2) if SMOKE else (1, 4, 16, 64) if ctx["quick"] else (1, 2, 4, 8, 16, 32, 64, 128)
    for pname, (heads, lq, lk, d, masked, causal) in patterns.items():
        rows = []
        for bsz in batches:
            q = torch.randn(bsz, heads, lq, d, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(bsz, heads, lk, d, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(bsz, heads, lk, d, device=dev, dtype=dt, requires_grad=True)
            g = torch.randn_like(q)
            m = None
            if masked:
                m = torch.arange(lk, device=dev)[None, :] < torch.randint(lk // 3, lk + 1, (bsz, 1), device=dev)
            row = {"batch": bsz, "flops_fwd": 4 * bsz * heads * lq * lk * d}
            for backend in ("triton", "sdpa"):  # sdpa comes before reference in AUTO_ORDER
                with _backend(backend):
                    fwd = lambda: ops.attention(q.detach(), k.detach(), v.detach(), key_padding_mask=m, causal=causal)  # noqa: E731
                    fb = lambda: torch.autograd.grad(ops.attention(q, k, v, key_padding_mask=m, causal=causal), (q, k, v), g)  # noqa: E731
                    row[f"{backend}_fwd_ms"] = round(timer.eager(fwd), 4)
                    row[f"{backend}_fwd_bwd_ms"] = round(timer.eager(fb), 4)
            rows.append(row)
            log(f"crossover attention {pname}: {row}")
        out[f"attention_{pname}"] = rows
    # LayerNorm (BERT output: residual + dropout in training; plain in inference), bias_gelu
    for pname, n, has_res, p in (("layer_norm_768_res_drop", 768, True, 0.1), ("layer_norm_768", 768, False, 0.0)):
        rows = []
        n = 48 if SMOKE else n
        for m_rows in ((8,) if SMOKE else (64, 256, 1024, 4096, 16384)):
            x = torch.randn(m_rows, n, device=dev, dtype=dt, requires_grad=True)
            r = torch.randn(m_rows, n, device=dev, dtype=dt, requires_grad=True) if has_res else None
            w = torch.randn(n, device=dev, dtype=dt, requires_grad=True)
            g = torch.randn(m_rows, n, device=dev, dtype=dt)
            row = {"rows": m_rows}
            for backend in ("triton", "reference"):
                with _backend(backend):
                    leaves = [t for t in (x, r, w) if t is not None]
                    fb = lambda: torch.autograd.grad(ops.layer_norm(x, w, w, 1e-12, residual=r, dropout_p=p), leaves, g)  # noqa: E731
                    fwd = lambda: ops.layer_norm(x.detach(), w.detach(), w.detach(), 1e-12, residual=None if r is None else r.detach(), dropout_p=0.0)  # noqa: E731
                    row[f"{backend}_fwd_ms"] = round(timer.eager(fwd), 4)
                    row[f"{backend}_fwd_bwd_ms"] = round(timer.eager(fb), 4)
            rows.append(row)
            log(f"crossover {pname}: {row}")
        out[pname] = rows
    rows = []
    k_in, n_out = (16, 48) if SMOKE else (768, 3072)
    for m_rows in ((8,) if SMOKE else (64, 256, 1024, 4096, 12608)):
        x = torch.randn(m_rows, k_in, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(n_out, k_in, device=dev, dtype=dt) * 0.03).requires_grad_()
        b = torch.randn(n_out, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(m_rows, n_out, device=dev, dtype=dt)
        row = {"rows": m_rows}
        for backend in ("triton", "reference"):
            with _backend(backend):
                fwd = lambda: ops.linear_gelu(x.detach(), w.detach(), b.detach())  # noqa: E731
                fb = lambda: torch.autograd.grad(ops.linear_gelu(x, w, b), (x, w, b), g)  # noqa: E731
                row[f"{backend}_fwd_ms"] = round(timer.eager(fwd), 4)
                row[f"{backend}_fwd_bwd_ms"] = round(timer.eager(fb), 4)
        rows.append(row)
        log(f"crossover linear_gelu_768x3072: {row}")
    out["linear_gelu_768x3072"] = rows
    return out


# --------------------------------------------------------------------------------------- sweeps

def section_sweeps(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from blip_fast._kernels.triton import layer_norm as ln
    timer = ctx["timer"]
    out: Dict[str, Any] = {}
    # LayerNorm backward: persistent-grid size and rows per iteration (GPU time, CUDA graph)
    if ctx.get("only_shapes"):  # a warm worker for the attention sweeps only
        return section_sweeps_attention(ctx, out)
    rows, n = (9, 48) if SMOKE else (64 * 197, 768)
    sets = _ln_sets(rows, n, False, DTYPE, 4)
    res = []
    fwd_ms = timer.graph(cycle_calls([lambda s=s: ln.layer_norm(s[0], s[2], s[3], 1e-6) for s in sets]))
    saved = ln.BWD_PROGRAMS_PER_SM, ln.BWD_ROW_ELEMENTS
    try:
        for per_sm, row_elems in itertools.product((None, 2) if SMOKE else (None, 2, 4, 8), (1024, 4096) if SMOKE else (1024, 2048, 4096)):
            ln.BWD_PROGRAMS_PER_SM, ln.BWD_ROW_ELEMENTS = per_sm, row_elems
            ln.clear_plans()
            call = cycle_calls([lambda s=s: torch.autograd.grad(ln.layer_norm(s[0], s[2], s[3], 1e-6),
                                                                (s[0], s[2], s[3]), s[4]) for s in sets])
            ms = timer.graph(call) - fwd_ms
            res.append({"programs_per_sm": per_sm or "auto", "row_elements": row_elems,
                        "bwd_graph_ms": round(ms, 4), "gbps": round(3 * rows * n * 2 / ms / 1e6, 1)})
            log(f"sweep layer_norm bwd: {res[-1]}")
    finally:
        ln.BWD_PROGRAMS_PER_SM, ln.BWD_ROW_ELEMENTS = saved
        ln.clear_plans()
    out["layer_norm_bwd_vit_bf16"] = res
    if not ctx.get("skip_attention_sweeps"):
        section_sweeps_attention(ctx, out)
    return out


def section_sweeps_attention(ctx: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, Any]:
    """Attention: forward and backward blocks and inline delta at the long ViT shapes."""
    from blip_fast._kernels.triton import attention as attn

    from .bench_attention import _step, make_inputs
    timer = ctx["timer"]
    sweep_shapes = ctx.get("only_shapes") or ctx.get("sweep_shapes") or SWEEP_SHAPES
    for shape in [s for s in _shape_list() if s.name in sweep_shapes]:
        sets = [make_inputs(shape, DTYPE, torch.device(DEV), seed) for seed in range(2)]
        res = []
        variants = [("default", {}, True)]
        variants += [("inline_delta=False", {}, False)]
        variants += [(f"bwd={c}", {"bwd": c}, True) for c in (
            attn.BwdConfig(32, 128, 128, 32, 4, 3), attn.BwdConfig(64, 64, 64, 64, 4, 3),
            attn.BwdConfig(64, 128, 128, 64, 8, 2))]
        variants += [(f"fwd={c}", {"fwd": c}, True) for c in (
            attn.FwdConfig(128, 64, 8, 3), attn.FwdConfig(64, 64, 4, 3), attn.FwdConfig(128, 32, 4, 3))]
        for label, overrides, inline in variants:
            attn.CONFIG_OVERRIDES.clear()
            attn.CONFIG_OVERRIDES.update(overrides)
            attn.INLINE_DELTA = inline
            attn.clear_plans()
            fn = lambda q, k, v, m: attn.attention(q, k, v)  # noqa: E731
            try:
                row = {"variant": label, "fwd_graph_ms": round(timer.graph(_step(fn, sets, False)), 4),
                       "fwd_bwd_graph_ms": round(timer.graph(_step(fn, sets, True)), 4)}
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                row = {"variant": label, "error": repr(exc)[:160]}
            res.append(row)
            log(f"sweep attention {shape.name}: {row}")
        attn.CONFIG_OVERRIDES.clear()
        attn.INLINE_DELTA = True
        attn.clear_plans()
        out[f"attention_{shape.name}"] = res
    return out


# ------------------------------------------------------------- native CUDA extension (cuda backend)

def section_native_layer_norm(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from .bench_native import section_native_layer_norm as run
    return run(ctx)


def section_momentum_update(ctx: Dict[str, Any]) -> Dict[str, Any]:
    from .bench_native import section_momentum_update as run
    return run(ctx)


# ============================================================================================
# Report
# ============================================================================================

_LOG: List[str] = []


def log(msg: str) -> None:
    _LOG.append(msg)
    print(msg, flush=True)


def _fmt(x, digits=3):
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def markdown(report: Dict[str, Any]) -> str:
    """The tables RESULTS.md's Kernels section is made of."""
    lines: List[str] = []
    env = report.get("env", {})
    lines.append(f"Device: {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
                 f"date {env.get('date')}, commit {env.get('commit')}; copy {env.get('copy_gbps_1GiB')} GB/s "
                 f"(1 GiB, read + write), bf16 matmul {env.get('bf16_matmul_tflops')} TFLOP/s.\n")
    att = report.get("attention")
    if isinstance(att, dict) and att:
        for key, title in (("fwd_bwd_graph_ms", "forward + backward, CUDA graph (GPU time)"),
                           ("fwd_graph_ms", "forward, CUDA graph (GPU time)"),
                           ("fwd_bwd_ms", "forward + backward, eager"), ("fwd_ms", "forward, eager")):
            impls = list(next(iter(att.values()))["results"].keys())
            if "graph" in key:
                impls = [i for i in impls if not i.startswith("ops_")]
            lines.append(f"\n**Attention, {title}**, bf16, median ms (ratios: their time / triton's)\n")
            lines.append("| shape | " + " | ".join(impls) + " | vs fastest SDPA | vs reference |")
            lines.append("|---|" + "---:|" * (len(impls) + 2))
            for name, sh in att.items():
                res = sh["results"]
                ours = res.get("triton", {}).get(key)
                sdpa = [r[key] for n, r in res.items() if n.startswith("sdpa_") and key in r]
                refv = res.get("reference", {}).get(key)
                cells = [_fmt(res.get(i, {}).get(key)) if "error" not in res.get(i, {}) else "n/a" for i in impls]
                vs_sdpa = f"{min(sdpa) / ours:.2f}x" if ours and sdpa else "-"
                vs_ref = f"{refv / ours:.2f}x" if ours and refv else "-"
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {vs_sdpa} | {vs_ref} |")
    ln = report.get("layer_norm")
    if isinstance(ln, dict) and ln:
        lines.append("\n**LayerNorm** (bf16), triton: ms, GB/s and % of a copy of the same bytes; torch reference ms\n")
        lines.append("| case | fwd eager | fwd graph | fwd GB/s (graph) | fwd % copy | bwd eager | bwd graph | bwd GB/s (graph) | bwd % copy | ref fwd eager | ref bwd eager | ref fwd graph | ref bwd graph |")
        lines.append("|---|" + "---:|" * 12)
        for name, c in ln.items():
            t, r = c["triton"], c["reference"]
            lines.append(f"| {name} | {_fmt(t['fwd_ms'], 4)} | {_fmt(t['fwd_graph_ms'], 4)} | {t['fwd_graph_gbps']} | "
                         f"{t['fwd_graph_pct_copy']} | {_fmt(t['bwd_ms'], 4)} | {_fmt(t['bwd_graph_ms'], 4)} | "
                         f"{t['bwd_graph_gbps']} | {t['bwd_graph_pct_copy']} | {_fmt(r['fwd_ms'], 4)} | {_fmt(r['bwd_ms'], 4)} | "
                         f"{_fmt(r.get('fwd_graph_ms'), 4)} | {_fmt(r.get('bwd_graph_ms'), 4)} |")
    gl = report.get("gelu")
    if isinstance(gl, dict) and gl:
        lines.append("\n**bias + GELU / linear + GELU** (bf16), median ms\n")
        for name, c in gl.items():
            cols = {k: v for k, v in c.items() if isinstance(v, dict)}
            lines.append(f"- {name}: " + "; ".join(
                f"{impl}: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in row.items()) for impl, row in cols.items()))
    ce = report.get("cross_entropy")
    if isinstance(ce, dict) and ce:
        lines.append("\n**Fused linear + cross-entropy** (B=128, L=30, V=30524, H=768, bf16, fwd+bwd eager)\n")
        lines.append("| setting | unfused ms | fused ms | time ratio | unfused peak MiB | fused peak MiB | peak ratio |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for k, row in ce.items():
            if isinstance(row, dict) and "time_ratio" in row:
                lines.append(f"| {k} | {_fmt(row['unfused_ms'])} | {_fmt(row['fused_ms'])} | {row['time_ratio']} | "
                             f"{row['unfused_peak_mib']} | {row['fused_peak_mib']} | {row['peak_ratio']} |")
    host = report.get("host")
    if isinstance(host, dict) and host:
        lines.append("\n**Host time per call** (µs, tiny shapes; direct launch vs triton's JIT launcher)\n")
        lines.append("| call | direct | JIT |")
        lines.append("|---|---:|---:|")
        for k, row in host.items():
            if isinstance(row, dict):
                lines.append(f"| {k} | {row.get('direct_us')} | {row.get('jit_us', '-')} |")
    from .bench_native import markdown as native_markdown
    lines += native_markdown(report)
    return "\n".join(lines) + "\n"


def write_attention_timings(report: Dict[str, Any], out: str) -> str:
    """``attention_timings.json``: the eager ms per call through blip_fast.ops under each backend
    at each attention shape, in the form ``blip_fast.ops.measured`` reads (``auto`` picks the
    flash_attn / xformers backends only where such rows say they are fastest; point
    BLIP_FAST_ATTENTION_TIMINGS at the file, or add its rows to ATTENTION_TIMINGS)."""
    from blip_fast.ops.measured import rows_from_attention_results
    env = report.get("env", {})
    source = f"{report.get('command')}, {env.get('date')}, commit {env.get('commit')}"
    rows = rows_from_attention_results(report["attention"], _device_name(), str(DTYPE).replace("torch.", ""), source)
    path = os.path.join(out, "attention_timings.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"rows": rows}, f, indent=1)
    log(f"attention timings: {len(rows)} rows -> {path}")
    return path


def _warm_job(job) -> str:
    """One --warm worker: run a section (or one shape of it) once, untimed."""
    global WARM
    WARM = True
    section, only = job
    sys.stdout = open(os.devnull, "w")
    ctx: Dict[str, Any] = {"timer": Timer(True), "quick": False, "env": {}, "only_shapes": only,
                           "skip_attention_sweeps": section == "sweeps" and not only}
    start = time.perf_counter()
    try:
        globals()[f"section_{section}"](ctx)
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - the timed run reports it
        status = f"failed: {exc!r}"[:200]
    return f"warm {section} {only or ''}: {status} ({time.perf_counter() - start:.1f} s)"


def warm(sections: Sequence[str], workers: int, shapes: Optional[Sequence[str]] = None,
         sweep_shapes: Optional[Sequence[str]] = None) -> None:
    """Compile every kernel the timed sections launch, in parallel processes sharing triton's
    on-disk cache, so that the timed run (one process) loads instead of compiling."""
    import concurrent.futures
    import multiprocessing

    jobs = []
    for section in sections:
        if section == "attention":
            jobs += [("attention", [s.name]) for s in _attention_shapes(False, shapes)]
        elif section == "sweeps":
            jobs += [("sweeps", [name]) for name in (sweep_shapes or SWEEP_SHAPES) if name != "smoke_self"]
            jobs.append(("sweeps", None))
        elif section not in ("env",):
            jobs.append((section, None))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for line in pool.map(_warm_job, jobs):
            log(line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_kernels", help="output folder")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="shorter timings, fewer crossover sizes")
    parser.add_argument("--warm", type=int, default=0, metavar="N",
                        help="first compile every kernel in N parallel processes (untimed)")
    parser.add_argument("--warm-only", action="store_true", help="compile (--warm N) and exit")
    parser.add_argument("--shapes", help="attention shapes to run (comma-separated names; default all)")
    parser.add_argument("--sweep-shapes", help="attention shapes of the sweeps (default: "
                        + ",".join(SWEEP_SHAPES[:3]) + ")")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under the Triton interpreter: checks the script, measures nothing")
    args = parser.parse_args(argv)
    global SMOKE, DEV, DTYPE
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 set before python starts", file=sys.stderr)
            return 2
        SMOKE, DEV, DTYPE = True, "cpu", torch.float32
    elif not torch.cuda.is_available():
        print("benchmarks --kernels needs a CUDA device", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    shapes = args.shapes.split(",") if args.shapes else None
    sweep_shapes = args.sweep_shapes.split(",") if args.sweep_shapes else None
    ctx: Dict[str, Any] = {"timer": Timer(args.quick), "quick": args.quick, "env": {},
                           "attention_shapes": shapes, "sweep_shapes": sweep_shapes}
    report: Dict[str, Any] = {"command": " ".join(["python -m benchmarks --kernels", *(argv if argv is not None else sys.argv[1:])])}
    wanted = [s for s in args.sections.split(",") if s]
    if "env" not in wanted:
        wanted.insert(0, "env")
    if args.warm and not SMOKE:
        start = time.perf_counter()
        warm(wanted, args.warm, shapes, sweep_shapes)
        log(f"warm: {time.perf_counter() - start:.1f} s")
        if args.warm_only:
            return 0
    for name in wanted:
        fn = globals().get(f"section_{name}")
        if fn is None:
            report[name] = {"error": f"unknown section {name!r}"}
            continue
        start = time.perf_counter()
        try:
            report[name] = fn(ctx)
            if name == "env":
                ctx["env"] = report[name]
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            report[name] = {"error": repr(exc)[:300], "traceback": traceback.format_exc()[-2000:]}
            log(f"section {name} failed: {exc!r}")
            _sync()
        log(f"section {name}: {time.perf_counter() - start:.1f} s")
        with open(os.path.join(args.out, "kernels.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    if isinstance(report.get("attention"), dict) and report["attention"] and "error" not in report["attention"]:
        write_attention_timings(report, args.out)
    md = markdown(report)
    with open(os.path.join(args.out, "kernels.md"), "w", encoding="utf-8") as f:
        f.write(md)
    if "host_profile" in ctx:
        with open(os.path.join(args.out, "host_profile.txt"), "w", encoding="utf-8") as f:
            f.write(ctx["host_profile"])
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
