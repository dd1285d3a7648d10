"""Micro-benchmark of the Triton LayerNorm, bias+GELU and fused linear cross-entropy kernels.

Times are medians of ``triton.testing.do_bench`` (which flushes L2 between calls) over a
rotation of input sets whose total exceeds L2. Memory-bound ops report achieved bandwidth
(bytes of the tensors they must read and write) against a device-to-device copy of the same
number of bytes timed the same way in the same run. The LM-head cross-entropy reports time and
peak memory (``torch.cuda.max_memory_allocated`` above what was allocated before the call)
against ``F.linear`` + ``F.cross_entropy``.

Usage::

    python benchmarks/bench_norm_gelu_ce.py --out results.json
    python benchmarks/bench_norm_gelu_ce.py --smoke   # tiny shapes on the CPU interpreter
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from typing import Callable, Dict, List, Sequence

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from blip_fast.ops import reference as ref  # noqa: E402
from blip_fast._kernels.triton import bias_gelu as gelu_mod  # noqa: E402
from blip_fast._kernels.triton import cross_entropy as ce_mod  # noqa: E402
from blip_fast._kernels.triton import layer_norm as ln_mod  # noqa: E402

ROTATION_BYTES = 256 * 2**20  # input sets per case: enough to span several L2s


class Bench:
    """Timing and memory helpers; ``smoke`` swaps do_bench for one wall-clock call."""

    def __init__(self, device: torch.device, smoke: bool, kernel_times: bool = False):
        self.device, self.smoke, self.kernel_times = device, smoke, kernel_times
        self.last_kernel_ms = None

    def device_ms(self, fns: Sequence[Callable[[], object]], calls: int = 20) -> float:
        """Summed GPU kernel time of one call from the profiler: no launch or host overhead."""
        from torch.profiler import ProfilerActivity, profile
        for fn in fns[:2]:
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                fns[i % len(fns)]()
            torch.cuda.synchronize()
        total_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                       for e in prof.key_averages())
        return total_us / calls / 1e3

    def time_ms(self, fns: Sequence[Callable[[], object]]) -> float:
        """Median ms of one call, cycling through ``fns`` (one per input set)."""
        cycle = itertools.cycle(fns)
        call = lambda: next(cycle)()  # noqa: E731
        if self.smoke:
            call()
            start = time.perf_counter()
            call()
            return (time.perf_counter() - start) * 1e3
        self.last_kernel_ms = self.device_ms(list(fns)) if self.kernel_times else None
        return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")

    def peak_mb(self, fn: Callable[[], object]) -> float:
        """Peak allocated MiB above the current allocation while ``fn`` runs."""
        if self.smoke:
            return float("nan")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def n_sets(self, bytes_per_set: int) -> int:
        return 1 if self.smoke else max(2, min(8, -(-ROTATION_BYTES // max(1, bytes_per_set))))

    def copy_gbps(self, nbytes: int) -> float:
        """Bandwidth of ``dst.copy_(src)`` moving ``nbytes`` in all (half read, half written)."""
        numel = max(1, nbytes // 4)
        pairs = [(torch.empty(numel // 2 + 1, dtype=torch.float32, device=self.device),
                  torch.empty(numel // 2 + 1, dtype=torch.float32, device=self.device))
                 for _ in range(self.n_sets(nbytes))]
        for src, _ in pairs:
            src.uniform_()
        ms = self.time_ms([lambda s=s, d=d: d.copy_(s) for s, d in pairs])
        return nbytes / ms / 1e6


def randn(shape, dtype, device, requires_grad=False, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(requires_grad)


def record(table: List[Dict], bench: Bench, op: str, case: str, impl: str, ms: float,
           nbytes: int = 0, copy_cache: Dict[int, float] = None, **extra) -> Dict:
    row = {"op": op, "case": case, "impl": impl, "ms": round(ms, 4)}
    if bench.last_kernel_ms is not None:
        row["kernel_ms"] = round(bench.last_kernel_ms, 4)
    if nbytes:
        if nbytes not in copy_cache:
            copy_cache[nbytes] = bench.copy_gbps(nbytes)
        gbps = nbytes / ms / 1e6
        row.update(bytes=nbytes, gbps=round(gbps, 1), copy_gbps=round(copy_cache[nbytes], 1),
                   pct_of_copy=round(100 * gbps / copy_cache[nbytes], 1))
    row.update(extra)
    table.append(row)
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------------------- LayerNorm

def layer_norm_cases(smoke: bool):
    if smoke:
        return [("tiny_res_drop", 64, 48, torch.float32, 1e-12, True, 0.1)]
    return [
        ("vit_64x197x768", 64 * 197, 768, torch.bfloat16, 1e-6, False, 0.0),
        ("vit_64x197x768", 64 * 197, 768, torch.float32, 1e-6, False, 0.0),
        ("bert_192x30x768_res", 192 * 30, 768, torch.bfloat16, 1e-12, True, 0.0),
        ("bert_192x30x768_res_drop0.1", 192 * 30, 768, torch.bfloat16, 1e-12, True, 0.1),
    ]


def bench_layer_norm(bench: Bench, table: List[Dict], copies: Dict[int, float]) -> None:
    dev = bench.device
    for name, m, n, dtype, eps, has_res, p in layer_norm_cases(bench.smoke):
        case = f"{name}_{str(dtype).split('.')[-1]}"
        e = torch.tensor([], dtype=dtype).element_size()
        tensors = 2 + has_res  # x (+ residual) in, y out
        sets = []
        for _ in range(bench.n_sets(tensors * m * n * e)):
            x = randn((m, n), dtype, dev, True)
            r = randn((m, n), dtype, dev, True) if has_res else None
            w = randn((n,), dtype, dev, True)
            b = randn((n,), dtype, dev, True)
            pre = (x + r if has_res else x).detach().requires_grad_()
            sets.append((x, r, w, b, pre, randn((m, n), dtype, dev)))
        impls = {
            "triton": lambda x, r, w, b, pre: ln_mod.layer_norm(x, w, b, eps, r, p),
            "torch F.layer_norm (norm only)": lambda x, r, w, b, pre: F.layer_norm(pre, (n,), w, b, eps),
            "reference": lambda x, r, w, b, pre: ref.layer_norm(x, w, b, eps, r, p),
        }
        fwd_bytes = tensors * m * n * e
        # backward: read x (+ residual) and dy, write dx (+ a separate dresidual under dropout)
        bwd_bytes = (2 + has_res + 1 + (has_res and p > 0)) * m * n * e
        # Bytes each implementation must move at least (the reference runs several kernels).
        nbytes = {"triton": (fwd_bytes, bwd_bytes),
                  "torch F.layer_norm (norm only)": (2 * m * n * e, 3 * m * n * e),
                  "reference": (0, 0)}
        for impl, fn in impls.items():
            ms = bench.time_ms([lambda s=s: fn(*s[:5]) for s in sets])
            record(table, bench, "layer_norm_fwd", case, impl, ms, nbytes[impl][0], copies)
            graphs = []
            for s in sets:
                y = fn(*s[:5])
                leaves = [t for t in ((s[4],) if impl.startswith("torch") else (s[0], s[1]))
                          if t is not None] + [s[2], s[3]]
                graphs.append((y, leaves, s[5]))
            ms = bench.time_ms([lambda y=y, lv=lv, g=g: torch.autograd.grad(y, lv, g, retain_graph=True)
                                for y, lv, g in graphs])
            record(table, bench, "layer_norm_bwd", case, impl, ms, nbytes[impl][1], copies)


def sweep_layer_norm(bench: Bench, out: Dict) -> None:
    """Launch parameters at the ViT bf16 shape."""
    if bench.smoke:
        return
    dev, m, n = bench.device, 64 * 197, 768
    x = [randn((m, n), torch.bfloat16, dev, True) for _ in range(4)]
    w, b = randn((n,), torch.bfloat16, dev, True), randn((n,), torch.bfloat16, dev, True)
    g = randn((m, n), torch.bfloat16, dev)
    saved = ln_mod.FWD_ROW_ELEMENTS
    rows = []
    for row_elems in (1024, 2048, 4096, 8192):
        ln_mod.FWD_ROW_ELEMENTS = row_elems
        ln_mod.clear_plans()
        ms = bench.time_ms([lambda t=t: ln_mod.layer_norm(t, w, b, 1e-6) for t in x])
        rows.append({"row_elements": row_elems, "ms": round(ms, 4),
                     "gbps": round(2 * m * n * 2 / ms / 1e6, 1)})
    ln_mod.FWD_ROW_ELEMENTS = saved
    ln_mod.clear_plans()
    out["layer_norm_fwd_vit_bf16"] = rows
    saved = ln_mod.BWD_PROGRAMS_PER_SM, ln_mod.BWD_ROW_ELEMENTS
    rows = []
    for per_sm, row_elems in itertools.product((2, 4, 8, 16), (1024, 4096)):
        ln_mod.BWD_PROGRAMS_PER_SM, ln_mod.BWD_ROW_ELEMENTS = per_sm, row_elems
        ln_mod.clear_plans()
        ys = [ln_mod.layer_norm(t, w, b, 1e-6) for t in x]
        ms = bench.time_ms([lambda y=y, t=t: torch.autograd.grad(y, (t, w, b), g, retain_graph=True)
                            for y, t in zip(ys, x)])
        rows.append({"programs_per_sm": per_sm, "row_elements": row_elems, "ms": round(ms, 4),
                     "gbps": round(3 * m * n * 2 / ms / 1e6, 1)})
    ln_mod.BWD_PROGRAMS_PER_SM, ln_mod.BWD_ROW_ELEMENTS = saved
    ln_mod.clear_plans()
    out["layer_norm_bwd_vit_bf16"] = rows


# ------------------------------------------------------------------------------- bias + GELU

def bench_bias_gelu(bench: Bench, table: List[Dict], copies: Dict[int, float]) -> None:
    dev = bench.device
    cases = [("tiny", 32, 64)] if bench.smoke else [("vit_mlp_64x197x3072", 64 * 197, 3072),
                                                      ("bert_ffn_192x30x3072", 192 * 30, 3072)]
    dtype = torch.float32 if bench.smoke else torch.bfloat16
    for name, m, n in cases:
        case = f"{name}_{str(dtype).split('.')[-1]}"
        e = torch.tensor([], dtype=dtype).element_size()
        sets = [(randn((m, n), dtype, dev, True), randn((n,), dtype, dev, True),
                 randn((m, n), dtype, dev)) for _ in range(bench.n_sets(2 * m * n * e))]
        impls = {"triton": gelu_mod.bias_gelu, "torch": lambda x, b: F.gelu(x + b)}
        for impl, fn in impls.items():
            ms = bench.time_ms([lambda s=s: fn(s[0], s[1]) for s in sets])
            record(table, bench, "bias_gelu_fwd", case, impl, ms, 2 * m * n * e, copies)
            graphs = [(fn(x, b), (x, b), g) for x, b, g in sets]
            ms = bench.time_ms([lambda y=y, lv=lv, g=g: torch.autograd.grad(y, lv, g, retain_graph=True)
                                for y, lv, g in graphs])
            record(table, bench, "bias_gelu_bwd", case, impl, ms, 3 * m * n * e, copies)
    # linear + GELU (ViT fc1), forward + backward
    m, k, n = (32, 16, 64) if bench.smoke else (64 * 197, 768, 3072)
    x = randn((m, k), dtype, dev, True)
    w = randn((n, k), dtype, dev, True, scale=0.03)
    b = randn((n,), dtype, dev, True)
    g = randn((m, n), dtype, dev)
    for impl, fn in {"triton": gelu_mod.linear_gelu,
                     "torch": lambda x, w, b: F.gelu(F.linear(x, w, b))}.items():
        ms_f = bench.time_ms([lambda: fn(x, w, b)])
        ms_fb = bench.time_ms([lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), g)])
        record(table, bench, "linear_gelu_fwd", f"vit_fc1_{m}x{k}x{n}", impl, ms_f)
        record(table, bench, "linear_gelu_fwd_bwd", f"vit_fc1_{m}x{k}x{n}", impl, ms_fb)


def sweep_bias_gelu_bwd(bench: Bench, out: Dict) -> None:
    if bench.smoke:
        return
    dev, m, n = bench.device, 64 * 197, 3072
    sets = [(randn((m, n), torch.bfloat16, dev, True), randn((n,), torch.bfloat16, dev, True))
            for _ in range(3)]
    g = randn((m, n), torch.bfloat16, dev)
    saved = gelu_mod.BWD_PROGRAMS_PER_SM
    rows = []
    for per_sm in (4, 8, 16, 32):
        gelu_mod.BWD_PROGRAMS_PER_SM = per_sm
        gelu_mod.clear_plans()
        graphs = [(gelu_mod.bias_gelu(x, b), (x, b)) for x, b in sets]
        ms = bench.time_ms([lambda y=y, lv=lv: torch.autograd.grad(y, lv, g, retain_graph=True)
                            for y, lv in graphs])
        rows.append({"programs_per_sm": per_sm, "ms": round(ms, 4),
                     "gbps": round(3 * m * n * 2 / ms / 1e6, 1)})
    gelu_mod.BWD_PROGRAMS_PER_SM = saved
    gelu_mod.clear_plans()
    out["bias_gelu_bwd_vit_bf16"] = rows


# ---------------------------------------------------------------------- linear cross-entropy

def bench_cross_entropy(bench: Bench, table: List[Dict], sweeps: Dict) -> None:
    dev = bench.device
    bsz, length, vocab, hid = (2, 5, 300, 32) if bench.smoke else (128, 30, 30524, 768)
    dtype = torch.float32 if bench.smoke else torch.bfloat16
    h = randn((bsz, length, hid), dtype, dev, True)
    w = randn((vocab, hid), dtype, dev, True, scale=0.05)
    b = randn((vocab,), dtype, dev, True, scale=0.1)
    labels = torch.randint(0, vocab, (bsz, length), device=dev)
    labels[:, (3 * length) // 4:] = -100  # padding
    params = (h, w, b)

    def unfused(reduction, smoothing):
        logits = F.linear(h, w, b)
        loss = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=-100,
                               label_smoothing=smoothing, reduction=reduction)
        return loss.view(labels.shape) if reduction == "none" else loss

    def fused(reduction, smoothing):
        return ce_mod.linear_cross_entropy(h, w, b, labels, smoothing, -100, reduction)

    def step(fn, reduction, smoothing):
        for p in params:
            p.grad = None
        loss = fn(reduction, smoothing)
        loss.sum().backward() if reduction == "none" else loss.backward()

    case = f"lm_head_B{bsz}_L{length}_V{vocab}_H{hid}_{str(dtype).split('.')[-1]}"
    for reduction, smoothing in (("mean", 0.1), ("mean", 0.0), ("none", 0.1)):
        res = {}
        for impl, fn in (("torch unfused", unfused), ("triton fused", fused)):
            ms = bench.time_ms([lambda: step(fn, reduction, smoothing)])
            for p in params:
                p.grad = None
            peak = bench.peak_mb(lambda: step(fn, reduction, smoothing))
            res[impl] = record(table, bench, "linear_cross_entropy_fwd_bwd",
                               f"{case}_{reduction}_ls{smoothing}", impl, ms, peak_mib=round(peak, 1))
        res["triton fused"]["time_vs_unfused"] = round(res["triton fused"]["ms"] / res["torch unfused"]["ms"], 3)
        res["triton fused"]["peak_vs_unfused"] = round(
            res["triton fused"]["peak_mib"] / res["torch unfused"]["peak_mib"], 3) if not bench.smoke else None
    if bench.smoke:
        return
    saved = ce_mod.CHUNK_BYTES
    rows = []
    for mib in (16, 32, 64, 128, 256):
        ce_mod.CHUNK_BYTES = mib * 2**20
        ms = bench.time_ms([lambda: step(fused, "mean", 0.1)])
        for p in params:
            p.grad = None
        rows.append({"chunk_mib": mib, "ms": round(ms, 4),
                     "peak_mib": round(bench.peak_mb(lambda: step(fused, "mean", 0.1)), 1)})
    ce_mod.CHUNK_BYTES = saved
    sweeps["cross_entropy_chunk_bytes"] = rows
    saved = ce_mod._MAX_BLOCK_V
    rows = []
    for block_v in (2048, 4096, 8192):
        ce_mod._MAX_BLOCK_V = block_v
        rows.append({"block_v": block_v,
                     "ms": round(bench.time_ms([lambda: step(fused, "mean", 0.1)]), 4)})
    ce_mod._MAX_BLOCK_V = saved
    sweeps["cross_entropy_block_v"] = rows


# ------------------------------------------------------------------------------------- main

def print_table(table: List[Dict]) -> None:
    cols = ["op", "case", "impl", "ms", "kernel_ms", "gbps", "pct_of_copy", "peak_mib", "time_vs_unfused",
            "peak_vs_unfused"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in table)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in table:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU interpreter, to check the script runs")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the launch-parameter sweeps")
    parser.add_argument("--kernel-times", action="store_true",
                        help="also report summed GPU kernel time per call (torch.profiler), "
                             "which separates kernel time from launch and host overhead")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --smoke)")
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    bench = Bench(device, args.smoke, args.kernel_times and not args.smoke)
    table: List[Dict] = []
    sweeps: Dict = {}
    copies: Dict[int, float] = {}
    errors: Dict[str, str] = {}
    sections = [("layer_norm", lambda: bench_layer_norm(bench, table, copies)),
                ("bias_gelu", lambda: bench_bias_gelu(bench, table, copies)),
                ("cross_entropy", lambda: bench_cross_entropy(bench, table, sweeps))]
    if not args.no_sweeps:
        sections += [("sweep_layer_norm", lambda: sweep_layer_norm(bench, sweeps)),
                     ("sweep_bias_gelu", lambda: sweep_bias_gelu_bwd(bench, sweeps))]
    for name, run in sections:
        try:
            run()
        except Exception as exc:  # report and go on: one broken section must not hide the rest
            errors[name] = repr(exc)
            print(f"section {name} failed: {exc!r}", file=sys.stderr, flush=True)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/bench_norm_gelu_ce.py", *(argv or sys.argv[1:])]),
        "copy_gbps_1GiB": None if args.smoke else round(bench.copy_gbps(2**30), 1),
        "results": table, "sweeps": sweeps, "errors": errors,
    }
    print_table(table)
    for name, rows in sweeps.items():
        print(f"\nsweep {name}:")
        for r in rows:
            print("  ", r)
    print(f"\ncopy bandwidth (1 GiB moved): {result['copy_gbps_1GiB']} GB/s on {result['device']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
