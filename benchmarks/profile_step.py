"""Where the BLIP_Pretrain training step's GPU time goes: kernel time by category, against the
measured ceilings (bf16 matmul rate, copy bandwidth).

    PYTHONPATH=. python -m benchmarks.profile_step --batch 64 --out $OUT/profile            # graphed step
    PYTHONPATH=. python -m benchmarks.profile_step --batch 64 --eager --out $OUT/profile    # eager step
    PYTHONPATH=. python -m benchmarks.profile_step --batch 64 --by-source --out $OUT/profile  # + which line
    PYTHONPATH=. python -m benchmarks.profile_step --batch 64 --compile --out $OUT/profile  # Inductor, graphed
    BLIP_FAST_FUSED_ADD_LN=1 PYTHONPATH=. python -m benchmarks.profile_step --batch 64 --out $OUT/fused  # A/B
    PYTHONPATH=. python -m benchmarks.profile_step --device cpu --tiny --eager --batch 2 --steps 1  # smoke test
    PYTHONPATH=. python -m benchmarks.profile_step --batch 256 --activation-checkpointing --eager --steps 3 \\
        --no-profile --out $OUT/b256                                                     # does it fit?

The step is the benchmark suite's ``pretrain`` row: ViT-B/16 at 224, queue 57600, 30-token captions,
bf16 autocast, the ``auto`` backend, AdamW (``capturable=True`` inside the graph). The profile runs
``--steps`` steps under ``torch.profiler`` and sums every CUDA kernel's duration by category (first
matching pattern of :data:`CATEGORIES` on the kernel's name); ``busy`` is the union of kernel
intervals, so ``step - busy`` is time the GPU waited for the host. Writes ``profile.json`` and
``profile.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch

from .timing import synchronize

CATEGORIES: Sequence[Tuple[str, str]] = (
    ("nccl", r"nccl"),
    ("attention", r"attn|fmha|flash|cudnn|sdpa|softmax_warp"),
    ("layer_norm", r"_ln_|layer_norm|layernorm"),
    ("gelu", r"gelu"),
    ("cross_entropy", r"_ce_|cross_entropy|log_softmax|nll_loss"),
    ("optimizer_and_ema", r"multi_tensor|adam|momentum_update|lerp"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|cublas|wgmma|splitk|sm90_|sm80_"),
    ("copy_fill", r"memcpy|memset|copy_kernel|fill_kernel|cat_|catarray"),
    ("elementwise_reduce", r"elementwise|vectorized|unrolled|reduce|index|scatter|gather|where|dropout|triton"),
)


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "other"


def attention_flops_per_step(batch: int, vit_depth: int, vit_heads: int, n_img: int, head_dim: int,
                             text_depth: int, text_heads: int, length: int) -> float:
    """Attention matmul FLOPs (QK^T and PV, fwd x1, fwd+bwd x3) of one BLIP_Pretrain step."""
    from . import flops
    a = flops.attention_flops
    vit = vit_depth * (a(batch, vit_heads, n_img, n_img, head_dim, True) + a(batch, vit_heads, n_img, n_img,
                                                                               head_dim, False))
    text_self = text_depth * (a(batch, text_heads, length, length, head_dim, True)  # ITC text encoder
                              + a(batch, text_heads, length, length, head_dim, False)  # momentum
                              + a(3 * batch, text_heads, length, length, head_dim, True)  # ITM
                              + a(batch, text_heads, length, length, head_dim, True))  # decoder
    cross = text_depth * (a(3 * batch, text_heads, length, n_img, head_dim, True)
                          + a(batch, text_heads, length, n_img, head_dim, True))
    return vit + text_self + cross


def shared_kv_flops_saved(batch: int, n_img: int, vit_width: int, text_width: int, layers: int) -> float:
    """FLOPs of the original's work that the fast path does not do: the image tokens' cross-attention
    keys and values are projected once per layer for the batch's B images (forward and backward)
    instead of for the 3B ITM rows and the B decoder rows."""
    kv_macs = 2 * n_img * vit_width * text_width  # K and V, one image
    return 2.0 * 3 * (4 * batch - batch) * kv_macs * layers


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """GB/s of a copy within ``device``'s memory (read + write counted)."""
    from .timing import time_step

    src = torch.empty(n_bytes if device.type == "cuda" else n_bytes // 16, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = statistics.median(time_step(lambda: dst.copy_(src), device)["ms"] for _ in range(10)) / 1e3
    return 2 * src.numel() / seconds / 1e9


def _fused_add_ln() -> bool:
    from blip_fast.ops import triton_backend
    return triton_backend.AUTO_FUSED_ADD_LAYER_NORM


def build_step(args: argparse.Namespace, device: torch.device):
    """The suite's pretrain workload, set up for ``args``; returns (workload, inputs)."""
    from . import workloads
    from .config import FULL, TINY
    from .data import Tokenizer

    ctx = workloads.Context(device=device, sizes=TINY if args.tiny else FULL, tokenizer=Tokenizer("auto"), seed=0)
    ctx.checkpointing = args.activation_checkpointing
    work = workloads.PretrainStep(ctx)
    work.ensure_setup()
    work.dtype = "bf16"
    work.execution = ("compile" if args.compile else "eager") if args.eager else \
        ("compile+graph" if args.compile else "graph")
    work.compile_mode = args.compile_mode
    work.begin_case()
    inputs = work.make_inputs(args.batch, 1)[0]
    return work, inputs


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="the eager step instead of the CUDA-graph replay")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute every ViT block and BERT layer in backward")
    p.add_argument("--steps", type=int, default=10, help="timed (and profiled) steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (Inductor fuses the elementwise work); graphed unless --eager")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--no-profile", action="store_true", help="time and measure memory only")
    p.add_argument("--by-source", action="store_true",
                   help="also profile eager steps with Python stacks and charge each kernel to the blip_fast "
                        "line that launched it")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke test of the script (eager, no kernel profile)")
    p.add_argument("--tiny", action="store_true", help="the suite's tiny sizes (with --device cpu)")
    p.add_argument("--out", default="profile_out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run on a GPU machine, or pass --device cpu --tiny --eager for a smoke test")
        return 2
    if device.type == "cpu" and not args.eager:
        p.error("--device cpu needs --eager (CUDA graphs need a GPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    from . import flops, timing
    from .config import FULL, TINY

    os.makedirs(args.out, exist_ok=True)
    result: Dict[str, Any] = {"batch": args.batch, "execution": ("eager" if args.eager else "graph")
                              + ("+compile" if args.compile else ""),
                              "activation_checkpointing": args.activation_checkpointing, "dtype": "bf16",
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "fused_add_layer_norm_in_auto": _fused_add_ln(),
                              "date": time.strftime("%Y-%m-%d")}
    result["matmul_tflops"] = timing.matmul_rate(device, n=8192 if device.type == "cuda" else 512)["tflops"]
    result["copy_gb_s"] = copy_bandwidth(device)
    work, inputs = build_step(args, device)
    for _ in range(args.warmup):
        work.step(inputs)
    synchronize(device)
    times = []  # peak memory: over the whole run, capture included (a graph's pool is allocated then)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        work.step(inputs)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    s = TINY if args.tiny else FULL
    total_flops = flops.pretrain_step_flops(s.vit_base_dims, s.text_dims, s.pretrain_image, s.pretrain_len,
                                            args.batch, s.queue_size)["total"]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    result.update(step_ms=1e3 * step_s, img_s=args.batch / step_s, peak_memory_gib=peak, flops_per_step=total_flops,
                  tflops=total_flops / step_s / 1e12)
    result["mfu"] = result["tflops"] / result["matmul_tflops"]
    if not args.no_profile:
        result.update(profile(work, inputs, args.steps, device))
        attn = attention_flops_per_step(args.batch, s.vit_base_dims.depth, s.vit_base_heads,
                                        flops.vit_tokens(s.pretrain_image, s.vit_base_dims.patch),
                                        s.attn_head_dim, s.text_dims.layers, s.text_heads, s.pretrain_len)
        saved = shared_kv_flops_saved(args.batch, flops.vit_tokens(s.pretrain_image, s.vit_base_dims.patch),
                                      s.vit_base_dims.width, s.text_dims.width, s.text_dims.layers)
        result["shared_kv_flops_saved"] = saved
        cats = result["categories_ms"]
        if cats.get("gemm"):  # the matmul work the fast path really runs
            result["gemm_tflops"] = (total_flops - attn - saved) / (cats["gemm"] * 1e-3) / 1e12
        if cats.get("attention"):
            result["attention_tflops"] = attn / (cats["attention"] * 1e-3) / 1e12
    if args.by_source:
        result["by_source"] = profile_by_source(work, inputs, max(2, args.steps // 2), device)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


def profile(work: Any, inputs: Any, steps: int, device: torch.device) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from .scaling import _interval_union, _length
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            work.step(inputs)
        synchronize(device)
    wall = (time.perf_counter() - t0) / steps
    per_cat: Dict[str, float] = {}
    per_kernel: Dict[str, float] = {}
    spans = []
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        dur = (evt.time_range.end - evt.time_range.start) / 1e3  # us -> ms
        cat = categorize(evt.name)
        per_cat[cat] = per_cat.get(cat, 0.0) + dur
        per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + dur
        spans.append((evt.time_range.start, evt.time_range.end))
    busy = _length(_interval_union(spans)) / 1e3 / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return {"profiled_step_ms": 1e3 * wall, "busy_ms": busy,
            "categories_ms": {k: v / steps for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(name[:160], v / steps) for name, v in top]}


def _source_frame(evt: Any, package: str) -> str:
    """The innermost Python frame inside ``package`` that led to ``evt`` (walking up its parent
    ops), as ``package/path.py(line): function``; ``"(outside <package>)"`` when none did."""
    marker = package + "/"
    node = evt
    while node is not None:
        for frame in getattr(node, "stack", None) or ():
            at = frame.replace("\\", "/").rfind(marker)
            if at >= 0:
                return frame[at:]
        node = getattr(node, "cpu_parent", None)
    return f"(outside {package})"


def attribute_by_source(events: Sequence[Any], steps: int, package: str = "blip_fast",
                        device: bool = True) -> List[Tuple[str, str, float, int]]:
    """``[(category, source line, ms per step, launches per step)]``, largest first: every CUDA
    kernel's time (``device=False``: every ``aten::`` op's own CPU time) charged to the line of
    ``package`` whose call launched it. Needs a profile taken with ``with_stack=True`` and the
    verbose experimental config (see :func:`profile_by_source`)."""
    totals: Dict[Tuple[str, str], List[float]] = {}
    for evt in events:
        if device:
            items = [(k.name, k.duration) for k in getattr(evt, "kernels", None) or ()]
        else:
            items = [(evt.name, evt.self_cpu_time_total)] if evt.name.startswith("aten::") else []
        if not items:
            continue
        frame = _source_frame(evt, package)
        for name, us in items:
            entry = totals.setdefault((categorize(name), frame), [0.0, 0])
            entry[0] += us
            entry[1] += 1
    rows = [(cat, frame, us / 1e3 / steps, round(n / steps)) for (cat, frame), (us, n) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def profile_by_source(work: Any, inputs: Any, steps: int, device: torch.device) -> List[Tuple[str, str, float, int]]:
    """Eager steps under the profiler with Python stacks: where each kernel was launched from (a
    replayed graph has no launching ops to charge, so this runs the eager step: the same kernels)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    execution, work.execution = work.execution, "eager"
    gpu = device.type == "cuda"
    try:
        work.step(inputs)
        synchronize(device)
        config = torch._C._profiler._ExperimentalConfig(verbose=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with torch_profile(activities=activities, with_stack=True, experimental_config=config) as prof:
            for _ in range(steps):
                work.step(inputs)
            synchronize(device)
    finally:
        work.execution = execution
    return attribute_by_source(prof.events(), steps, device=gpu)


def markdown(r: Dict[str, Any]) -> str:
    lines = [f"BLIP_Pretrain step, batch {r['batch']}, {r['execution']}, bf16"
             f"{', activation checkpointing' if r['activation_checkpointing'] else ''} on {r['device']}: "
             f"{r['step_ms']:.1f} ms, {r['img_s']:.1f} img/s, {r['tflops']:.3g} TFLOP/s = {100 * r['mfu']:.1f}% of "
             f"the measured {r['matmul_tflops']:.3g} TFLOP/s bf16 matmul rate; peak memory "
             + ("n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB")
             + f"; copy bandwidth {r['copy_gb_s']:.0f} GB/s"]
    if "categories_ms" in r:
        lines += ["", f"kernels busy {r['busy_ms']:.1f} ms of a {r['profiled_step_ms']:.1f} ms profiled step", "",
                  "| category | ms per step | % of busy |", "|---|---:|---:|"]
        for cat, ms in r["categories_ms"].items():
            lines.append(f"| {cat} | {ms:.2f} | {100 * ms / max(r['busy_ms'], 1e-9):.1f}% |")
        if "gemm_tflops" in r:
            lines.append(f"\nGEMMs: {r['gemm_tflops']:.0f} TFLOP/s on the matmul work the fast path runs "
                         f"({100 * r['gemm_tflops'] / r['matmul_tflops']:.0f}% of the square-matmul rate)")
        if "attention_tflops" in r:
            lines.append(f"attention kernels: {r['attention_tflops']:.0f} TFLOP/s")
        lines += ["", "| top kernels | ms per step |", "|---|---:|"]
        lines += [f"| `{name[:110]}` | {ms:.2f} |" for name, ms in r["top_kernels_ms"][:15]]
    if r.get("by_source"):
        lines += ["", "Eager step, kernel time by the line that launched it:", "",
                  "| category | source | ms per step | kernels per step |", "|---|---|---:|---:|"]
        lines += [f"| {cat} | `{src}` | {ms:.2f} | {n} |" for cat, src, ms, n in r["by_source"][:40]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
