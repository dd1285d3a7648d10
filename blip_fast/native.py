"""The optional native CUDA extension: build it, find it, load it.

The extension is one shared library (``libblip_fast_cuda.so``) of torch custom ops built with
CMake from ``kernels/cuda/`` (see ``CMakeLists.txt``); ``blip_fast.ops`` uses it as the ``cuda``
backend. Three ways to get it::

    python -m blip_fast.native build          # a source checkout: builds into blip_fast/_native/
    BLIP_FAST_BUILD_CUDA=1 pip install --no-build-isolation .   # builds during the install
    BLIP_FAST_CUDA_LIB=/path/to/libblip_fast_cuda.so            # a library built elsewhere

``python -m blip_fast.native info`` says which library would be loaded and whether it loads.

This module imports only the standard library at import time (setup.py loads it by path to
build the extension before blip_fast is installed); torch is imported where it is needed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import Callable, List, Optional, Sequence

#: Environment variable naming a built library to load instead of the packaged one.
LIB_ENV = "BLIP_FAST_CUDA_LIB"
#: Environment variable that makes ``setup.py`` build the extension (``1``).
BUILD_ENV = "BLIP_FAST_BUILD_CUDA"
#: Environment variable with the CUDA architectures to build for (CMake syntax, e.g. ``80;90``).
ARCH_ENV = "BLIP_FAST_CUDA_ARCHITECTURES"
LIBRARY_NAME = "libblip_fast_cuda.so"
DEFAULT_ARCHITECTURES = "80;90"
#: The torch operator namespace the library registers (TORCH_LIBRARY in kernels/cuda/ops.cpp).
OP_NAMESPACE = "blip_fast_cuda"

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: Where a build puts the library (inside the package, so an install carries it).
NATIVE_DIR = os.path.join(PACKAGE_DIR, "_native")

BUILD_HINT = ("build it with `python -m blip_fast.native build` in a source checkout, or install with "
              f"`{BUILD_ENV}=1 pip install --no-build-isolation .` (needs nvcc and cmake), or point "
              f"{LIB_ENV} at a built {LIBRARY_NAME}")


class NativeBuildError(RuntimeError):
    """CMake could not configure or build the extension; the message ends with the log's tail."""


def source_root() -> Optional[str]:
    """The checkout holding ``CMakeLists.txt`` and ``kernels/cuda`` next to this package, if any."""
    root = os.path.dirname(PACKAGE_DIR)
    if os.path.isfile(os.path.join(root, "CMakeLists.txt")) and os.path.isdir(os.path.join(root, "kernels", "cuda")):
        return root
    return None


def find_library() -> Optional[str]:
    """The library to load: ``$BLIP_FAST_CUDA_LIB`` when set (even if missing, so that a wrong
    path is reported rather than silently replaced), else the built one in ``blip_fast/_native``."""
    env = os.environ.get(LIB_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    path = os.path.join(NATIVE_DIR, LIBRARY_NAME)
    return path if os.path.isfile(path) else None


def is_loaded() -> bool:
    """Whether the ``blip_fast_cuda`` operators are registered in this process."""
    import torch
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{OP_NAMESPACE}::layer_norm_fwd", "CUDA")
    except RuntimeError:  # not registered: the dispatcher raises for unknown operators
        return False


def load(path: Optional[str] = None) -> str:
    """Load the extension into this process (once); returns the path loaded. Raises FileNotFoundError when no library is built, OSError when it does not
    load (for instance built against another torch: rebuild it)."""
    import torch
    path = path or find_library()
    if path is None:
        raise FileNotFoundError(f"the native CUDA extension is not built; {BUILD_HINT}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{LIB_ENV}={path} does not exist; {BUILD_HINT}")
    if not is_loaded():
        try:
            torch.ops.load_library(path)
        except OSError as exc:
            raise OSError(f"{path} does not load into this torch {torch.__version__} ({exc}); rebuild it: "
                          f"{BUILD_HINT}") from exc
    return path


def _log_tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: Sequence[str], cwd: str, env: dict, log: Callable[[str], None]) -> str:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log(proc.stdout)
    if proc.returncode != 0:
        raise NativeBuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{_log_tail(proc.stdout)}")
    return proc.stdout


def _find_nvcc() -> Optional[str]:
    """nvcc under $CUDA_HOME / $CUDA_PATH or /usr/local/cuda, when it is not on PATH."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def build(source_dir: Optional[str] = None, build_dir: Optional[str] = None, output_dir: Optional[str] = None,
          architectures: Optional[str] = None, jobs: Optional[int] = None, torch_cmake_config: Optional[bool] = None,
          python: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> str:
    """Configure and build the extension with CMake; returns the path of the built library.

    Args:
        source_dir: the checkout with ``CMakeLists.txt`` (default: the one this package is in).
        build_dir: CMake's build folder (default ``<source>/build/native``).
        output_dir: where the library goes (default ``blip_fast/_native`` of the source tree).
        architectures: CUDA architectures, CMake syntax (default ``$BLIP_FAST_CUDA_ARCHITECTURES``
            or ``80;90``).
        jobs: parallel compile jobs (default: every CPU).
        torch_cmake_config: True: find libtorch with ``find_package(Torch)``; False: from its
            Python package's folders; None: the first, then the second if configuring fails.
        python: the interpreter whose torch is built against (default this one).
        log: receives the commands and their output (default: discarded; errors carry the tail).
    """
    source_dir = os.path.abspath(source_dir or source_root() or "")
    if not os.path.isfile(os.path.join(source_dir, "CMakeLists.txt")):
        raise NativeBuildError("no CMakeLists.txt: building the extension needs a source checkout of blip_fast "
                               f"(or `{BUILD_ENV}=1 pip install --no-build-isolation .` from one)")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise NativeBuildError("cmake is not on PATH (pip install cmake, or the system package)")
    build_dir = os.path.abspath(build_dir or os.path.join(source_dir, "build", "native"))
    output_dir = os.path.abspath(output_dir or os.path.join(source_dir, "blip_fast", "_native"))
    architectures = architectures or os.environ.get(ARCH_ENV) or DEFAULT_ARCHITECTURES
    jobs = jobs or os.cpu_count() or 4
    log = log or (lambda _msg: None)
    env = dict(os.environ)
    if not env.get("CUDACXX") and shutil.which("nvcc") is None:
        nvcc = _find_nvcc()
        if nvcc is None:
            raise NativeBuildError("nvcc is not on PATH (set CUDACXX to its path, or CUDA_HOME to the toolkit)")
        env["CUDACXX"] = nvcc
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    modes: List[bool] = [True, False] if torch_cmake_config is None else [torch_cmake_config]
    errors = []
    for use_config in modes:
        mode_dir = build_dir if use_config else build_dir + "-paths"
        configure = [cmake, "-S", source_dir, "-B", mode_dir, *generator, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython_EXECUTABLE={python or sys.executable}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={architectures}",
                     f"-DBLIP_FAST_CUDA_ARCHITECTURES={architectures}",
                     f"-DBLIP_FAST_OUTPUT_DIR={output_dir}",
                     f"-DBLIP_FAST_TORCH_CMAKE_CONFIG={'ON' if use_config else 'OFF'}"]
        try:
            _run(configure, source_dir, env, log)
        except NativeBuildError as exc:
            errors.append(str(exc))
            log(f"configuring with BLIP_FAST_TORCH_CMAKE_CONFIG={'ON' if use_config else 'OFF'} failed")
            continue
        _run([cmake, "--build", mode_dir, "--parallel", str(jobs)], source_dir, env, log)
        path = os.path.join(output_dir, LIBRARY_NAME)
        if not os.path.isfile(path):
            raise NativeBuildError(f"the build finished but {path} is missing")
        if bundles_cxx_runtime(path):
            raise NativeBuildError(
                f"{path} carries its own copy of the C++ runtime (libstdc++ linked statically, e.g. by a compiler "
                f"wrapper adding -static-libstdc++): next to libtorch's shared one, the first error message the "
                f"library formats crashes the process. Fix: build with a compiler that links libstdc++.so "
                f"(CXX=/usr/bin/g++), or remove -static-libstdc++ from the toolchain's flags")
        return path
    raise NativeBuildError("\n\n".join(errors))


def bundles_cxx_runtime(path: str) -> bool:
    """Whether the library defines libstdc++'s own internals (``std::locale``), i.e. links a static
    copy of the C++ runtime. False when ``nm`` (binutils) is not available to look."""
    nm = shutil.which("nm")
    if nm is None:
        return False
    for table in ([], ["-D"]):  # the full symbol table (absent once stripped), then the dynamic one
        out = subprocess.run([nm, *table, "--defined-only", path], capture_output=True, text=True)
        if any(line.split()[-1].startswith("_ZNSt6locale5_Impl") for line in out.stdout.splitlines() if line.strip()):
            return True
    return False


def info() -> str:
    """Which library would be loaded, and whether it loads and what it registers."""
    lines = [f"library: {find_library() or 'not built'} ({LIB_ENV}={os.environ.get(LIB_ENV, '')!r})",
             f"source checkout: {source_root() or 'none (installed package)'}"]
    try:
        import torch
        lines.append(f"torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}")
        path = load()
        ops = [name for name in ("layer_norm", "layer_norm_fwd", "layer_norm_bwd", "momentum_update_")
               if hasattr(getattr(torch.ops, OP_NAMESPACE), name)]
        lines.append(f"loaded {path}: ops {ops}")
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        lines.append(f"not loaded: {exc}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip_fast.native", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the extension with CMake into blip_fast/_native")
    b.add_argument("--arch", default=None, help=f"CUDA architectures, CMake syntax (default {DEFAULT_ARCHITECTURES})")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    b.add_argument("--build-dir", default=None, help="CMake build folder (default build/native)")
    b.add_argument("--output-dir", default=None, help="where the library goes (default blip_fast/_native)")
    b.add_argument("--torch-cmake-config", choices=("auto", "on", "off"), default="auto",
                   help="find libtorch with find_package(Torch) (on), from its Python package (off), or "
                        "the first then the second (auto)")
    b.add_argument("--quiet", action="store_true", help="print only the result (errors keep the log's tail)")
    sub.add_parser("info", help="which library is found and whether it loads")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    mode = {"auto": None, "on": True, "off": False}[args.torch_cmake_config]
    try:
        path = build(build_dir=args.build_dir, output_dir=args.output_dir, architectures=args.arch, jobs=args.jobs,
                     torch_cmake_config=mode, log=None if args.quiet else print)
    except NativeBuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
