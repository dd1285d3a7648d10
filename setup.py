"""Install blip_fast: ``pip install .`` (or ``pip install -e .`` for development).

The kernel sources in ``kernels/`` install as the subpackage ``blip_fast._kernels``, and the
benchmark suite in ``benchmarks/`` as ``blip_fast._benchmarks`` (so ``blip-fast bench`` works
from any install).
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "blip_fast", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


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
)
