"""A decoder whose linear layers hold low-precision copies of the weights, for autocast decoding.

Under ``torch.autocast`` every linear layer casts its float32 weight to bfloat16 / float16 at every
call; autocast's cast cache lives only as long as one autocast region, and a CUDA graph cannot
point at it across calls. :func:`low_precision_copy` returns the same module tree with each
``nn.Linear``'s weight and bias cast once (exactly the values autocast would produce) and every
other tensor (embeddings, LayerNorm) shared with the original, so the decode step runs autocast's
numerics without per-step weight casts. The copies follow the original: in-place updates
(optimizer steps, ``load_state_dict``) are copied over on the next call, new tensors (``.to()``,
reassigned parameters) rebuild the copy.
"""
from __future__ import annotations

import copy
import weakref
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

Tensor = torch.Tensor

__all__ = ["low_precision_copy", "tensor_signature"]


def tensor_signature(module: nn.Module) -> Tuple:
    """Identity, storage, dtype, device and shape of every parameter and buffer of ``module``:
    changes when tensors are replaced or moved (not when they are updated in place)."""
    return tuple((name, id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                 for name, t in list(module.named_parameters(remove_duplicate=False))
                 + list(module.named_buffers(remove_duplicate=False)))


class _LowPrecisionCopy:
    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.signature = tensor_signature(module)
        self.pairs: List[Tuple[Tensor, Tensor, int]] = []  # (source, copy, source version at copy)
        with torch.inference_mode(False), torch.no_grad():
            self.module = self._clone(module, dtype, {})

    def _clone(self, module: nn.Module, dtype: torch.dtype, memo: Dict[int, nn.Module]) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = copy.copy(module)
        memo[id(module)] = new
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = {name: (None if child is None else self._clone(child, dtype, memo))
                        for name, child in module._modules.items()}
        if isinstance(module, nn.Linear):
            for name in ("weight", "bias"):
                source = module._parameters.get(name)
                if source is not None and source.is_floating_point():
                    low = nn.Parameter(source.detach().to(dtype), requires_grad=False)
                    new._parameters[name] = low
                    self.pairs.append((source, low, source._version))
        return new

    def sync(self) -> None:
        """Copy the sources updated in place since the last copy."""
        stale = [i for i, (source, _, version) in enumerate(self.pairs) if source._version != version]
        if stale:
            with torch.inference_mode(False), torch.no_grad():
                for i in stale:
                    source, low, _ = self.pairs[i]
                    low.copy_(source.detach())
                    self.pairs[i] = (source, low, source._version)


_COPIES: "weakref.WeakKeyDictionary[nn.Module, Dict[torch.dtype, _LowPrecisionCopy]]" = weakref.WeakKeyDictionary()


def low_precision_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with its linear layers' weights and biases held in ``dtype`` (cached, kept in
    sync with ``module``; the returned object changes only when ``module``'s tensors are replaced)."""
    per_dtype = _COPIES.setdefault(module, {})
    entry = per_dtype.get(dtype)
    if entry is None or entry.signature != tensor_signature(module):
        entry = per_dtype[dtype] = _LowPrecisionCopy(module, dtype)
    else:
        entry.sync()
    return entry.module


def release(module: nn.Module) -> None:
    """Drop the low-precision copies of ``module``."""
    _COPIES.pop(module, None)
