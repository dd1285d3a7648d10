"""blip_fast: BLIP (Li et al., 2022) as a fast, kernel-backed, drop-in PyTorch library.

Models keep the original module names and load the original checkpoints unchanged; every hot op
goes through :mod:`blip_fast.ops`, whose backend is chosen with :func:`use_backend`,
:func:`set_backend` or the ``BLIP_FAST_BACKEND`` environment variable.
"""
__version__ = "0.1.0"

from .ops import (  # noqa: E402
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)

__all__ = ["__version__", "use_backend", "set_backend", "get_backend", "available_backends",
           "BackendUnavailableError"]
