"""Keep the op micro-benchmarks out of ordinary test runs.

``benchmarks/test_ops_bench.py`` is collected only when asked for: a path inside ``benchmarks/``
on the command line (``pytest benchmarks/ --benchmark-only``), ``--benchmark-only`` /
``--benchmark-enable``, or ``BLIP_FAST_OPS_BENCH=1``. ``pytest tests`` never looks here, and a
bare ``pytest`` from the repository root skips them.
"""
from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _asked_for(config) -> bool:
    if os.environ.get("BLIP_FAST_OPS_BENCH") == "1":
        return True
    for opt in ("benchmark_only", "benchmark_enable"):
        try:
            if config.getoption(opt):
                return True
        except ValueError:  # pytest-benchmark not installed
            pass
    for arg in config.invocation_params.args:
        path = Path(str(arg).split("::")[0])
        if not path.is_absolute():
            path = Path(config.invocation_params.dir) / path
        try:
            path = path.resolve()
        except OSError:
            continue
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and collection_path.suffix == ".py" and not _asked_for(config):
        return True
    return None
