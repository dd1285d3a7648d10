"""Locate the kernel sources as the ``blip_fast._kernels`` package.

An installed blip_fast carries them as ``blip_fast._kernels`` (setup.py maps ``kernels/`` there).
Run from a source checkout (``PYTHONPATH=.``, a git worktree, a copy sent to another machine),
the ``kernels/`` folder next to the package is the one that belongs to this code, so it is
registered under that name first; an editable install of another checkout can then not hand
out kernels that do not match the Python code.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_NAME = "blip_fast._kernels"


def register_source_kernels() -> None:
    if _NAME in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "kernels", "__init__.py")
    if not (os.path.isfile(init) and os.path.isfile(os.path.join(root, "setup.py"))):
        return  # an installed package: the regular import machinery finds blip_fast._kernels
    spec = importlib.util.spec_from_file_location(
        _NAME, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
