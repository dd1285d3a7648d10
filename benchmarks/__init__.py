"""blip_fast benchmarks: model-level throughput runs (``python -m benchmarks`` or ``blip-fast bench``)
and op-level pytest-benchmark micro-benchmarks (``pytest benchmarks/ --benchmark-only``).

See ``benchmarks/RESULTS.md`` for measured numbers and ``benchmarks/flops.py`` for the FLOP count.
"""


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    from .runner import main as _main

    return _main(argv, prog=prog)
