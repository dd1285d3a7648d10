"""Kernel sources of blip_fast (installed as ``blip_fast._kernels``).

``triton/`` holds the Triton kernels, ``cuda/`` the CUDA C++ sources of the optional native
extension. Kernels are pure functions over tensors; they are reached only through
``blip_fast.ops``.
"""
