"""blip_fast benchmarks: model-level throughput runs (``python -m benchmarks`` or ``blip-fast bench``),
kernel micro-benchmarks (``python -m benchmarks --kernels``, see ``benchmarks/kernels.py``) and
op-level pytest-benchmark micro-benchmarks (``pytest benchmarks/ --benchmark-only``).

See ``benchmarks/RESULTS.md`` for measured numbers and ``benchmarks/flops.py`` for the FLOP count.
"""


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--kernels" in argv:  # the kernel micro-benchmarks (benchmarks/kernels.py)
        from .kernels import main as _kernels_main

        argv.remove("--kernels")
        return _kernels_main(argv)
    from .runner import main as _main

    return _main(argv, prog=prog)
