"""The decoding copy of a decoder: weights prepared once for many decode steps.

:func:`decoding_copy` returns the same module tree (the same classes and ``forward``) where

* every ``nn.Linear``'s weight and bias are in the compute dtype: under ``torch.autocast`` each
  linear layer would cast its float32 weight at every call (autocast's cast cache lives for one
  autocast region only, and a CUDA graph cannot point at it across calls); cast once, they give
  exactly the values autocast computes. In the weights' own dtype they are shared, not copied;
* every self-attention gets its query, key and value weights stacked (``fused_qkv``): one
  projection per layer and step instead of three;
* every other tensor (embeddings, LayerNorm) is the original's.

The copy follows the original: in-place updates (optimizer steps, ``load_state_dict``) are copied
over on the next call, replaced or moved tensors (``.to()``, reassigned parameters) rebuild it.
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.med import BertSelfAttention

Tensor = torch.Tensor

__all__ = ["decoding_copy", "tensor_signature", "release"]


def tensor_signature(module: nn.Module) -> Tuple:
    """Identity, storage, dtype, device and shape of every parameter and buffer of ``module``:
    changes when tensors are replaced or moved (not when they are updated in place)."""
    return tuple((name, id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                 for name, t in list(module.named_parameters(remove_duplicate=False))
                 + list(module.named_buffers(remove_duplicate=False)))


class _DecodingCopy:
    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.signature = tensor_signature(module)
        # (sources, derived tensor, how to compute it, source versions when last computed)
        self.derived: List[Tuple[Sequence[Tensor], Tensor, Callable[[], Tensor], Tuple[int, ...]]] = []
        with torch.inference_mode(False), torch.no_grad():
            self.module = self._clone(module, dtype, {})

    def _derive(self, sources: Sequence[Tensor], fn: Callable[[], Tensor]) -> Tensor:
        out = fn()
        self.derived.append((sources, out, fn, tuple(s._version for s in sources)))
        return out

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
                if source is not None and source.is_floating_point() and source.dtype != dtype:
                    new._parameters[name] = nn.Parameter(
                        self._derive([source], lambda s=source: s.detach().to(dtype)), requires_grad=False)
        if isinstance(module, BertSelfAttention) and not module.is_cross_attention:
            linears = (module.query, module.key, module.value)
            weights = [m.weight for m in linears]
            biases = [m.bias for m in linears]
            new.fused_qkv = (self._derive(weights, lambda: torch.cat([w.detach() for w in weights]).to(dtype)),
                             self._derive(biases, lambda: torch.cat([b.detach() for b in biases]).to(dtype)))
        return new

    def sync(self) -> None:
        """Recompute the tensors whose sources were updated in place since."""
        for i, (sources, out, fn, versions) in enumerate(self.derived):
            now = tuple(s._version for s in sources)
            if now != versions:
                with torch.inference_mode(False), torch.no_grad():
                    out.copy_(fn())
                self.derived[i] = (sources, out, fn, now)


_COPIES: "weakref.WeakKeyDictionary[nn.Module, Dict[torch.dtype, _DecodingCopy]]" = weakref.WeakKeyDictionary()


def decoding_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` prepared for decoding in ``dtype`` (cached and kept in sync with ``module``; the
    returned object changes only when ``module``'s tensors are replaced or moved)."""
    per_dtype = _COPIES.setdefault(module, {})
    entry = per_dtype.get(dtype)
    if entry is None or entry.signature != tensor_signature(module):
        entry = per_dtype[dtype] = _DecodingCopy(module, dtype)
    else:
        entry.sync()
    return entry.module


def release(module: nn.Module) -> None:
    """Drop the decoding copies of ``module``."""
    _COPIES.pop(module, None)
