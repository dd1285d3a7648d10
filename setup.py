"""Install blip_fast: ``pip install .`` (or ``pip install -e .`` for development).

The kernel sources in ``kernels/`` install as the subpackage ``blip_fast._kernels``, and the
benchmark suite in ``benchmarks/`` as ``blip_fast._benchmarks`` (so ``blip-fast bench`` works
from any install).

``BLIP_FAST_BUILD_CUDA=1 pip install --no-build-isolation .`` also builds the optional native
CUDA extension (CMakeLists.txt; needs nvcc, cmake and the torch it is built against) into
``blip_fast/_native``. Without the variable the install is pure Python and needs no compiler.
"""
import importlib.util
import os
import re

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "blip_fast", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def native_build_requested() -> bool:
    """Whether to build the native CUDA extension (opt-in: BLIP_FAST_BUILD_CUDA=1)."""
    return os.environ.get("BLIP_FAST_BUILD_CUDA", "0").strip() == "1"


def _native_module():
    """blip_fast/native.py loaded on its own (blip_fast itself is not importable yet)."""
    spec = importlib.util.spec_from_file_location("_blip_fast_native_build", os.path.join(HERE, "blip_fast", "native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithNative(build_py):
    """build_py, then (with BLIP_FAST_BUILD_CUDA=1) CMake builds the extension into the package."""

    def run(self):
        super().run()
        if not native_build_requested():
            return
        native = _native_module()
        package = os.path.join(HERE, "blip_fast") if getattr(self, "editable_mode", False) else \
            os.path.join(self.build_lib, "blip_fast")
        try:
            path = native.build(source_dir=HERE, output_dir=os.path.join(package, "_native"), log=print)
        except native.NativeBuildError as exc:
            raise SystemExit(f"BLIP_FAST_BUILD_CUDA=1: building the native CUDA extension failed: {exc}")
        print(f"built the native CUDA extension: {path}")


class NativeDistribution(Distribution):
    """A wheel that carries the native library is platform-specific."""

    def has_ext_modules(self):
        return native_build_requested()


setup(
    name="blip_fast",
    version=read_version(),
    description="BLIP (ViT + BERT vision-language model) as a fast, kernel-backed, drop-in library",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=[
        "blip_fast",
        "blip_fast.ops",
        "blip_fast.models",
        "blip_fast.configs",
        "blip_fast.parallel",
        "blip_fast.generation",
        "blip_fast.interop",
        "blip_fast._kernels",
        "blip_fast._kernels.triton",
        "blip_fast._benchmarks",
        "blip_fast.data",
        "blip_fast.train",
        "blip_fast.evaluation",
    ],
    package_dir={"blip_fast._kernels": "kernels", "blip_fast._benchmarks": "benchmarks"},
    package_data={"blip_fast.configs": ["*.json", "*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.40",
        "numpy",
        "pyyaml",
        "safetensors",
        "pillow",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "matplotlib", "safetensors"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "timm"],
        "flash": ["flash-attn>=2.5"],
        "xformers": ["xformers"],
        "hub": ["huggingface_hub"],
    },
    entry_points={"console_scripts": ["blip-fast=blip_fast.cli:main"]},
    cmdclass={"build_py": BuildPyWithNative},
    distclass=NativeDistribution,
)
