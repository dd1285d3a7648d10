"""Micro-benchmark of the fused Triton attention at BLIP's attention shapes.

Times the forward and forward+backward of the Triton kernel, of every torch SDPA backend that
accepts the same mask (``torch.nn.attention.sdpa_kernel``), of xformers and flash-attn where
importable (through blip_fast's ``xformers`` / ``flash_attn`` backends, which turn the masks into
the libraries' varlen calls), and of the reference (explicit softmax) implementation, in bfloat16 on one CUDA device. Each is timed twice: eagerly
(``triton.testing.do_bench``, median, L2 flushed, so host launch overhead counts whenever it
exceeds the GPU time, as in an eager training step) and replayed from a CUDA graph
(``do_bench_cudagraph``: GPU time only). Prints a table (ms and the ratio of the fastest SDPA
backend's time and of the reference time to ours: > 1 means we are faster) and writes every
number, plus a per-kernel GPU time breakdown of the Triton path, to JSON.

    python benchmarks/bench_attention.py --out attn.json [--autotune] [--shapes vit224,bert_pad]

Importable: :data:`SHAPES`, :func:`make_inputs`, :func:`candidates` and :func:`bench_shape`
serve a pytest-benchmark test as well.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    """One attention call: q (B, H, Lq, D), k/v (B, H, Lk, D)."""

    name: str
    batch: int
    heads: int
    lq: int
    lk: int
    head_dim: int = 64
    padding: bool = False  # ragged key padding mask (B, Lk)
    causal: bool = False


SHAPES: Sequence[Shape] = (
    Shape("vit224_self", 64, 12, 197, 197),
    Shape("vit384_self", 32, 12, 577, 577),
    Shape("vit480_self", 16, 12, 901, 901),
    Shape("bert_pad_self", 192, 12, 30, 30, padding=True),
    Shape("cross_30_to_197", 192, 12, 30, 197),
    Shape("cross_35_to_577_pad", 64, 12, 35, 577, padding=True),
    Shape("decoder_causal_pad", 64, 12, 30, 30, padding=True, causal=True),
    Shape("vit224_self_d32", 64, 24, 197, 197, head_dim=32),
    Shape("vit224_self_d128", 64, 6, 197, 197, head_dim=128),
)

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Dict[str, object]:
    """Random q, k, v (requiring grad), the key padding mask (ragged lengths, the first row
    full) or None, and an upstream gradient."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q = rand(shape.batch, shape.heads, shape.lq, shape.head_dim)
    k = rand(shape.batch, shape.heads, shape.lk, shape.head_dim)
    v = rand(shape.batch, shape.heads, shape.lk, shape.head_dim)
    mask = None
    if shape.padding:
        lengths = torch.randint(max(1, shape.lk // 3), shape.lk + 1, (shape.batch,), generator=gen)
        lengths[0] = shape.lk
        mask = (torch.arange(shape.lk)[None, :] < lengths[:, None]).to(device)
    grad = torch.randn(shape.batch, shape.heads, shape.lq, shape.head_dim, generator=gen).to(device, dtype)
    return dict(q=q, k=k, v=v, mask=mask, grad=grad)


def _sdpa_call(backend_name: str, shape: Shape) -> Callable:
    """SDPA under one backend, fed the mask the way that backend can take it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blip_fast.ops.reference import build_attention_bias

    backend = getattr(SDPBackend, backend_name)

    def call(q, k, v, mask):
        attn_mask, is_causal = None, False
        if mask is not None or (shape.causal and shape.lq != shape.lk):
            attn_mask = build_attention_bias(mask, shape.causal, shape.lq, shape.lk, q.device)
        elif shape.causal:
            is_causal = True
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    return call


def candidates(shape: Shape) -> Dict[str, Callable]:
    """name -> ``fn(q, k, v, mask) -> out`` for every implementation under test."""
    from blip_fast._kernels.triton.attention import attention as triton_attention
    from blip_fast.ops.reference import attention as reference_attention

    fns: Dict[str, Callable] = {
        "triton": lambda q, k, v, m: triton_attention(q, k, v, key_padding_mask=m, causal=shape.causal),
    }
    for name in SDPA_BACKENDS:
        fns[f"sdpa_{name.lower()}"] = _sdpa_call(name, shape)
    for name, fn in library_attention().items():
        fns[name] = lambda q, k, v, m, fn=fn: fn(q, k, v, key_padding_mask=m, causal=shape.causal)
    fns["reference"] = lambda q, k, v, m: reference_attention(q, k, v, key_padding_mask=m, causal=shape.causal)
    return fns


def library_attention() -> Dict[str, Callable]:
    """The attention of the ``xformers`` / ``flash_attn`` backends importable here (called
    directly, as ``triton`` is: the masks become the libraries' varlen calls)."""
    from blip_fast import ops
    from blip_fast.ops import flash_attn_backend, xformers_backend

    found = {}
    for name, module in (("xformers", xformers_backend), ("flash_attn", flash_attn_backend)):
        if ops.available_backends()[name] is None:
            found[name] = module.attention
    return found


def _step(fn: Callable, input_sets: List[Dict[str, object]], backward: bool) -> Callable[[], None]:
    """One call of ``fn`` (and its backward), on the next of the input sets each time."""
    cycle = itertools.cycle(input_sets)

    def step():
        x = next(cycle)
        out = fn(x["q"], x["k"], x["v"], x["mask"])
        if backward:
            torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["grad"])

    return step


def _timed(fn: Callable, input_sets: List[Dict[str, object]], backward: bool, graph: bool = False) -> float:
    """Median milliseconds of one call, eager or replayed from a CUDA graph."""
    from triton.testing import do_bench, do_bench_cudagraph

    step = _step(fn, input_sets, backward)
    if graph:
        return float(do_bench_cudagraph(step, rep=20, return_mode="median"))
    return float(do_bench(step, warmup=25, rep=100, return_mode="median"))


def kernel_breakdown(fn: Callable, input_sets: List[Dict[str, object]], iters: int = 10) -> Dict[str, float]:
    """Average GPU microseconds per call of each CUDA kernel that ``fn``'s forward+backward runs."""
    from torch.profiler import ProfilerActivity, profile

    step = _step(fn, input_sets, backward=True)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    times: Dict[str, float] = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if total > 0 and evt.key.startswith("_attn"):
            times[evt.key] = total / iters
    return times


def _max_rel_err(fn: Callable, x: Dict[str, object], shape: Shape) -> float:
    """Relative error of the forward against the float64 reference (the rows kept by the mask)."""
    from blip_fast.ops.reference import attention as reference_attention

    with torch.no_grad():
        out = fn(x["q"], x["k"], x["v"], x["mask"]).double()
        q, k, v = (t.double() for t in (x["q"], x["k"], x["v"]))
        ref = reference_attention(q, k, v, key_padding_mask=x["mask"], causal=shape.causal)
    return ((out - ref).norm() / ref.norm()).item()


def bench_shape(shape: Shape, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                n_sets: int = 3, only: Optional[Sequence[str]] = None,
                graphs: bool = True) -> Dict[str, Dict[str, object]]:
    """{implementation: {"fwd_ms", "fwd_bwd_ms", "fwd_graph_ms", "fwd_bwd_graph_ms", "rel_err"
    (or "error")}} for one shape."""
    input_sets = [make_inputs(shape, dtype, torch.device(device), seed) for seed in range(n_sets)]
    results: Dict[str, Dict[str, object]] = {}
    for name, fn in candidates(shape).items():
        if only and name not in only:
            continue
        try:
            err = _max_rel_err(fn, input_sets[0], shape)
            results[name] = dict(fwd_ms=_timed(fn, input_sets, backward=False),
                                 fwd_bwd_ms=_timed(fn, input_sets, backward=True), rel_err=err)
        except Exception as exc:  # noqa: BLE001 - an SDPA backend refusing this mask is a result
            results[name] = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            torch.cuda.synchronize()
            continue
        if graphs:
            try:
                results[name].update(fwd_graph_ms=_timed(fn, input_sets, backward=False, graph=True),
                                     fwd_bwd_graph_ms=_timed(fn, input_sets, backward=True, graph=True))
            except Exception as exc:  # noqa: BLE001
                results[name]["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if name == "triton":
            try:
                results[name]["kernels_us"] = kernel_breakdown(fn, input_sets)
            except Exception as exc:  # noqa: BLE001
                results[name]["kernels_error"] = repr(exc)[:160]
        torch.cuda.synchronize()
    return results


def _ratios(res: Dict[str, Dict[str, object]], key: str) -> Dict[str, Optional[float]]:
    """How many times faster triton is than the fastest SDPA backend and than the reference."""
    ours = res.get("triton", {}).get(key)
    sdpa = [r[key] for n, r in res.items() if n.startswith("sdpa_") and key in r]
    best = min(sdpa) if sdpa else None
    refv = res.get("reference", {}).get(key)
    return dict(best_sdpa_ms=best,
                speedup_vs_best_sdpa=(best / ours) if ours and best else None,
                speedup_vs_reference=(refv / ours) if ours and refv else None)


def _print_table(shape: Shape, res: Dict[str, Dict[str, object]]) -> None:
    print(f"\n{shape.name}: B={shape.batch} H={shape.heads} Lq={shape.lq} Lk={shape.lk} D={shape.head_dim}"
          f"{' padding' if shape.padding else ''}{' causal' if shape.causal else ''}")
    print(f"  {'impl':<26}{'fwd ms':>9}{'fwd+bwd':>9}{'graph fwd':>11}{'graph f+b':>11}{'rel err':>9}")
    ms = lambda r, key: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
    for name, r in res.items():
        if "error" in r:
            print(f"  {name:<26}{'-':>9}{'-':>9}{'-':>11}{'-':>11}   unsupported: {r['error'][:60]}")
            continue
        print(f"  {name:<26}{ms(r, 'fwd_ms'):>9}{ms(r, 'fwd_bwd_ms'):>9}{ms(r, 'fwd_graph_ms'):>11}"
              f"{ms(r, 'fwd_bwd_graph_ms'):>11}{r['rel_err']:>9.1e}")
    for key in ("fwd_ms", "fwd_bwd_ms", "fwd_graph_ms", "fwd_bwd_graph_ms"):
        rt = _ratios(res, key)
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
        print(f"  triton {key[:-3]:<14} speedup: vs fastest SDPA {fmt(rt['speedup_vs_best_sdpa'])}, "
              f"vs reference {fmt(rt['speedup_vs_reference'])}")
    kernels = res.get("triton", {}).get("kernels_us")
    if kernels:
        print("  triton kernels (GPU us per fwd+bwd): " + ", ".join(f"{k} {v:.1f}" for k, v in kernels.items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shapes", help="comma-separated subset of: " + ",".join(s.name for s in SHAPES))
    parser.add_argument("--only", help="comma-separated subset of implementations")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--autotune", action="store_true",
                        help="let the kernel time its candidate block configurations (first call per shape)")
    args = parser.parse_args(argv)
    if args.autotune:
        os.environ["BLIP_FAST_ATTN_AUTOTUNE"] = "1"
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA device", file=sys.stderr)
        return 1
    import triton

    from blip_fast._kernels.triton import common

    dtype = getattr(torch, args.dtype)
    shapes = [s for s in SHAPES if not args.shapes or s.name in args.shapes.split(",")]
    only = args.only.split(",") if args.only else None
    report = dict(
        date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        dtype=args.dtype, autotune=args.autotune, command=" ".join(sys.argv), shapes={},
    )
    for shape in shapes:
        res = bench_shape(shape, dtype, only=only, graphs=not args.no_graphs)
        _print_table(shape, res)
        report["shapes"][shape.name] = dict(
            shape=asdict(shape), results=res,
            **{key[:-3]: _ratios(res, key) for key in ("fwd_ms", "fwd_bwd_ms", "fwd_graph_ms", "fwd_bwd_graph_ms")})
    report["tuned_configs"] = {repr(k): repr(v) for k, v in common.tuned_configs().items()}
    if args.autotune:
        print("\nautotuned configs:")
        for k, v in report["tuned_configs"].items():
            print(f"  {k}: {v}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
