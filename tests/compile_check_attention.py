"""Compile the attention kernels for an H100 (sm_90) without a GPU, as the wrappers launch them.

Companion of ``compile_check_norm_gelu_ce.py`` (same method, same exit codes): catches errors
only the compiler sees and prints registers and spills per configuration. Run without
``TRITON_INTERPRET``::

    python tests/compile_check_attention.py           # the built-in configurations
    python tests/compile_check_attention.py --all     # every autotuning candidate too
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compile_check_norm_gelu_ce import compile_kernel  # noqa: E402

from blip_fast._kernels.triton import attention as attn  # noqa: E402

_STRIDES = ("b", "h", "m", "d")


def _strides(prefix: str, names=_STRIDES) -> dict:
    return {f"stride_{prefix}{n}": "i32" for n in names}


def _types(dtype: str, kernel: str) -> dict:
    p = "*" + dtype
    common = dict(KPM="*i1", SEED="*i64", stride_mb="i32", stride_mn="i32", H="i32", Lq="i32",
                  Lk="i32", dropout_p="fp32")
    if kernel == "fwd":
        return dict(Q=p, K=p, V=p, Out=p, LSE="*fp32", **common, qk_scale="fp32",
                    **_strides("q"), **_strides("k", "bhnd"), **_strides("v", "bhnd"), **_strides("o"))
    grads = dict(DQ=p, DK=p, DV=p, **_strides("dq"), **_strides("dk", "bhnd"), **_strides("dv", "bhnd"))
    types = dict(Q=p, K=p, V=p, Out=p, DO=p, LSE="*fp32", **common, sm_scale="fp32",
                 qk_scale="fp32", **_strides("q"), **_strides("k", "bhnd"), **_strides("v", "bhnd"),
                 **_strides("o"), **_strides("g"), **grads)
    if kernel == "bwd":
        types["Delta"] = "*fp32"
    return types


def configurations(everything: bool = False):
    """(name, kernel, types, constexprs, num_warps, num_stages) for bf16 and fp32, D = 32/64/128."""
    for dtype, tdt in (("bf16", attn.torch.bfloat16), ("fp32", attn.torch.float32)):
        for d in ((32, 64, 128) if dtype == "bf16" else (64,)):
            base = dict(HEAD_DIM=d, BLOCK_D=attn._block_d(d), RNG64=False,
                        DOT_PRECISION=attn._dot_precision(tdt))
            lengths = ((30, 30), (197, 197), (577, 577), (901, 901), (30, 577))
            fwd_cfgs = {attn._fwd_config(d, lq, lk, tdt) for lq, lk in lengths}
            if everything and dtype == "bf16":
                fwd_cfgs |= set(attn._FWD_CANDIDATES)
            for cfg in sorted(fwd_cfgs):
                for kpm, causal, drop in ((False, False, False), (True, True, True)):
                    yield (f"attn fwd {dtype} D={d} {cfg} kpm={kpm} causal={causal} dropout={drop}",
                           attn._attn_fwd_kernel, _types(dtype, "fwd"),
                           dict(base, HAS_KPM=kpm, CAUSAL=causal, DROPOUT=drop,
                                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg.num_warps, cfg.num_stages)
            bwd_cfgs = {attn._bwd_config(d, 577, 577, tdt)}
            if everything and dtype == "bf16":
                bwd_cfgs |= set(attn._BWD_CANDIDATES)
            for cfg in sorted(bwd_cfgs):
                for kpm, causal, drop in ((False, False, False), (True, True, True)):
                    for inline in (True, False):
                        yield (f"attn bwd {dtype} D={d} {cfg} kpm={kpm} causal={causal} dropout={drop} "
                               f"inline_delta={inline}", attn._attn_bwd_kernel, _types(dtype, "bwd"),
                               dict(base, HAS_KPM=kpm, CAUSAL=causal, DROPOUT=drop, INLINE_DELTA=inline,
                                    BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1,
                                    BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2),
                               cfg.num_warps, cfg.num_stages)
            for lq, lk in ((30, 30), (35, 197), (64, 577)):
                if not attn._short_backward(attn.torch.empty(1, 1, lq, 1, dtype=tdt)):
                    continue
                cfg = attn._short_bwd_config(d, lq, lk, tdt)
                for kpm, causal, drop in ((True, False, False), (True, True, True)):
                    yield (f"attn bwd short {dtype} D={d} Lq={lq} {cfg} kpm={kpm} causal={causal} "
                           f"dropout={drop}", attn._attn_bwd_short_kernel, _types(dtype, "short"),
                           dict(base, HAS_KPM=kpm, CAUSAL=causal, DROPOUT=drop,
                                BLOCK_M=attn._bucket(lq), BLOCK_N=cfg.block_n), cfg.num_warps, cfg.num_stages)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler")
        return 2
    failed = 0
    for name, kernel, types, constexprs, num_warps, num_stages in configurations("--all" in argv):
        try:
            info = compile_kernel(kernel, types, constexprs, num_warps, num_stages)
        except Exception as exc:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            continue
        print(f"ok   {name} (num_warps={num_warps}) {info}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
