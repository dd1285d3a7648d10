"""Compile the LayerNorm, bias+GELU and cross-entropy kernels for an H100 (sm_90) without a GPU.

The CPU interpreter runs kernels as Python and so misses errors only the compiler sees (a
non-constexpr global, an unsupported construct). This script compiles the launch
configurations the wrappers use, down to a cubin, and prints each kernel's registers and spills
when ``ptxas`` is at hand. Run it without ``TRITON_INTERPRET``::

    python tests/compile_check_norm_gelu_ce.py

Exit status: 0 all compiled, 1 a kernel failed, 2 no CUDA compiler backend in this triton.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # pragma: no cover - depends on the triton build
    print(f"no CUDA compile path in this triton: {exc!r}")
    sys.exit(2)

from blip_fast._kernels.triton import bias_gelu as gelu_mod
from blip_fast._kernels.triton import common
from blip_fast._kernels.triton import cross_entropy as ce_mod
from blip_fast._kernels.triton import layer_norm as ln_mod

TARGET = GPUTarget("cuda", 90, 32)
PTXAS_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_info(ptx: str) -> str:
    """``Used N registers, S bytes spill stores`` from a bundled ptxas, or '' without one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w", encoding="utf-8") as f:
            f.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):  # the PTX may be newer than the plain one
            exe = os.path.join(PTXAS_DIR, name)
            if not os.path.exists(exe):
                continue
            run = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                return ", ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores",
                                            run.stdout + run.stderr))
    return ""


def compile_kernel(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3) -> str:
    """Compile ``kernel`` for sm_90; ``types`` maps each runtime argument to a triton type."""
    names = inspect.signature(kernel.fn).parameters
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    return _ptxas_info(compiled.asm["ptx"])


def configurations():
    """(name, kernel, types, constexprs, num_warps) as the wrappers launch them."""
    i32, f32 = "i32", "fp32"
    for dt in ("bf16", "fp32"):  # float32: LayerNorm at BLIP's width only
        p = "*" + dt
        for n in ((48, 768) if dt == "bf16" else (768,)):
            block = triton.next_power_of_2(n)
            rows = ln_mod._rows_per_block(block, ln_mod.FWD_ROW_ELEMENTS)
            types = dict(X=p, R=p, W=p, B=p, SEED="*i64", Y=p, MEAN="*fp32", RSTD="*fp32", S=p,
                         stride_x=i32, stride_r=i32, stride_y=i32, stride_s=i32, M=i32, N=i32, eps=f32,
                         p=f32, keep_scale=f32)
            for drop, store_sum in ((False, False), (True, False), (False, True)):  # the last: pre-LN add
                yield (f"layer_norm fwd {dt} N={n} dropout={drop} store_sum={store_sum}", ln_mod._ln_fwd_kernel,
                       types, dict(HAS_R=True, HAS_W=True, HAS_B=True, HAS_DROPOUT=drop, STORE_S=store_sum,
                                   ROWS=rows, BLOCK_N=block), ln_mod.row_warps(block * rows))
            rows = ln_mod._rows_per_block(block, ln_mod.BWD_ROW_ELEMENTS)
            types = dict(X=p, R=p, W=p, SEED="*i64", DY=p, DX=p, DR=p, DW_PART="*fp32",
                         DB_PART="*fp32", MEAN="*fp32", RSTD="*fp32", DS=p, stride_x=i32, stride_r=i32,
                         stride_dy=i32, stride_dx=i32, stride_dr=i32, stride_ds=i32, M=i32, N=i32,
                         blocks_per_program=i32, p=f32, keep_scale=f32)
            for drop, has_ds in ((False, False), (True, False), (False, True)):
                yield (f"layer_norm bwd {dt} N={n} dropout={drop} sum_grad={has_ds}", ln_mod._ln_bwd_kernel,
                       types, dict(HAS_R=True, HAS_W=True, HAS_DROPOUT=drop, STORE_DR=drop or has_ds,
                                   COMPUTE_DW=True, COMPUTE_DB=True, HAS_DS=has_ds, ROWS=rows, BLOCK_N=block),
                       ln_mod.row_warps(block * rows))
        if dt != "bf16":
            continue
        block_n = gelu_mod._block_n(3072)
        yield (f"bias_gelu fwd {dt}", gelu_mod._gelu_fwd_kernel,
               dict(X=p, BIAS=p, Y=p, M=i32, N=i32, stride_x=i32, stride_y=i32),
               dict(HAS_BIAS=True, BLOCK_M=gelu_mod._BLOCK_M, BLOCK_N=block_n), 4)
        yield (f"bias_gelu bwd {dt}", gelu_mod._gelu_bwd_kernel,
               dict(X=p, BIAS=p, DY=p, DX=p, DB_PART="*fp32", M=i32, N=i32,
                    tiles_per_program=i32, stride_x=i32, stride_dy=i32, stride_dx=i32),
               dict(HAS_BIAS=True, COMPUTE_DB=True, BLOCK_M=gelu_mod._BLOCK_M, BLOCK_N=block_n), 4)
        block_v = min(triton.next_power_of_2(30524), ce_mod._MAX_BLOCK_V)
        for grad in (False, True):
            yield (f"cross_entropy {dt} grad={grad}", ce_mod._ce_loss_grad_kernel,
                   dict(LOGITS=p, LABELS="*i64", LOSS="*fp32", SCALE="*fp32", stride_logits=i32,
                        stride_scale=i32, V=i32, ignore_index=i32, confidence=f32,
                        smooth_per_class=f32, smoothing=f32),
                   dict(COMPUTE_GRAD=grad, HAS_SMOOTHING=True, BLOCK_V=block_v),
                   ce_mod._ce_warps(block_v))
    yield ("dropout mask", ln_mod._dropout_mask_kernel, dict(OUT="*i8", SEED="*i64", N="i32", p="fp32"),
           dict(BLOCK_N=1024), 4)
    plan = common.sum_partials_plan(768, True, True)
    yield ("parameter-gradient partial sums", common._sum_partials_kernel,
           dict(PART1="*fp32", PART2="*fp32", OUT1="*bf16", OUT2="*bf16", P="i32", N="i32"),
           plan.constexprs, plan.options["num_warps"])


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler")
        return 2
    failed = 0
    for name, kernel, types, constexprs, num_warps in configurations():
        try:
            info = compile_kernel(kernel, types, constexprs, num_warps)
        except Exception as exc:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            continue
        print(f"ok   {name} (num_warps={num_warps}) {info}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
