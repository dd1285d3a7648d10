"""The ``blip-fast`` command. ``blip-fast bench [options]`` runs the benchmark suite
(``benchmarks/``; ``blip-fast bench --help`` lists its options); ``blip-fast pretrain`` runs the
pretraining job and ``blip-fast eval`` the retrieval evaluation (``--help`` on each)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional


def _benchmarks():
    """The benchmarks package: installed as ``blip_fast._benchmarks``, else from a source checkout."""
    try:
        return importlib.import_module("blip_fast._benchmarks")
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isfile(os.path.join(root, "benchmarks", "__init__.py")) and root not in sys.path:
            sys.path.insert(0, root)
        return importlib.import_module("benchmarks")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="blip-fast", description="blip_fast command-line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", add_help=False, help="run the benchmark suite (blip-fast bench --help)")
    sub.add_parser("pretrain", add_help=False, help="BLIP pretraining job from a YAML config (--help)")
    sub.add_parser("eval", add_help=False, help="zero-shot image-text retrieval recall (--help)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _benchmarks().main(rest, prog="blip-fast bench")
    if args.command == "pretrain":
        from .train.commands import pretrain_main
        return pretrain_main(rest)
    if args.command == "eval":
        from .train.commands import eval_main
        return eval_main(rest)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
