"""Preallocated self-attention key/value cache of the MED decoder, for generation.

The decoder's self-attention keys and values of every generated position are written once into
one buffer ``(batch, layers, 2, heads, capacity, head_dim)`` instead of concatenating growing
tensors at every step (what ``past_key_values`` tuples do); beam search reorders every layer's
keys and values with one gather. Two modes:

* dynamic (``static=False``): the host knows the cached length; a step writes its positions at
  ``[length, length + L)`` and attends over the first ``length + L`` keys (causal when ``L > 1``).
* static (``static=True``): every tensor shape is fixed so that a decode step can be captured in a
  CUDA graph; the write position is a device tensor, one token is written per step and the
  attention runs over the whole buffer with a key mask ``position <= current``. The prompt
  (several tokens, once per generation) is written the dynamic way.

The cross-attention keys/values of the image tokens do not depend on the generated tokens: they
are computed once per generation with :meth:`blip_fast.models.med.BertModel.precompute_cross_kv`
and passed as ``encoder_kv``; they are not part of this cache.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["DecoderKVCache", "LayerKVCache"]


class DecoderKVCache:
    """Self-attention keys/values of every decoder layer, preallocated to ``capacity`` positions.

    Args:
        num_layers, batch_size, num_heads, head_dim, capacity: buffer sizes.
        device, dtype: of the buffer (the dtype the attention runs in: under autocast, the
            autocast dtype).
        static: fixed-shape decode steps (see the module docstring).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype, static: bool = False):
        self.storage = torch.zeros(batch_size, num_layers, 2, num_heads, capacity, head_dim, device=device, dtype=dtype)
        #: per layer ``(batch, heads, capacity, head_dim)`` views of the storage
        self.keys = [self.storage[:, i, 0] for i in range(num_layers)]
        self.values = [self.storage[:, i, 1] for i in range(num_layers)]
        self.capacity = capacity
        self.static = static
        #: positions cached so far, as the host knows it (prompt writes and dynamic steps)
        self.length = 0
        #: static mode: the position the next single-token step writes, on the device
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._arange = torch.arange(capacity, device=device)
        self._step_mask: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.storage.shape[0]

    def reset(self) -> None:
        """Forget every cached position (the buffer is reused)."""
        self.length = 0
        self.position.zero_()

    def layer(self, index: int) -> "LayerKVCache":
        return LayerKVCache(self, index)

    def _static_step(self, num_new: int) -> bool:
        return self.static and num_new == 1 and self.length > 0

    # -- the model's forward calls these around its layers -----------------------------------------
    def begin(self, num_new: int) -> None:
        """Before the layers run on ``num_new`` new positions."""
        if self._static_step(num_new):
            # (B, capacity) keep mask of the positions written so far plus this step's
            self._step_mask = (self._arange <= self.position).unsqueeze(0).expand(self.batch_size, -1)
        else:
            if self.length + num_new > self.capacity:
                raise ValueError(f"the cache holds {self.capacity} positions; {self.length} are used and "
                                 f"{num_new} more were given: build it with a larger capacity (max_length)")
            self._step_mask = None

    def end(self, num_new: int) -> None:
        """After the layers ran: advance the write position."""
        if self._step_mask is not None:
            self.position.add_(1)
        else:
            self.length += num_new
            self.position.fill_(self.length)

    def position_ids(self, num_new: int) -> Optional[Tensor]:
        """Position ids for the embeddings in a static single-token step, else None (the host
        length gives them)."""
        return self.position.view(1, 1) if self._static_step(num_new) else None

    @torch.no_grad()
    def reorder(self, index: Tensor) -> None:
        """Rows ``index`` (``(batch,)`` int64) become the new rows, as beam search reorders beams."""
        if self.static:
            self.storage.copy_(self.storage.index_select(0, index))
        else:
            used = self.storage[..., :self.length, :]
            used.copy_(used.index_select(0, index))


class LayerKVCache:
    """One layer's view of a :class:`DecoderKVCache`, handed to its self-attention."""

    def __init__(self, cache: DecoderKVCache, index: int):
        self.cache = cache
        self.index = index

    def append(self, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
               causal: bool) -> Tuple[Tensor, Tensor, Optional[Tensor], bool]:
        """Store the new positions' ``key``/``value`` ``(B, H, L, D)``.

        Returns the keys and values to attend to, their keep mask and whether the attention is
        causal. ``key_padding_mask`` (dynamic mode only): ``(B, cached + L)`` boolean, or None.
        """
        cache = self.cache
        k_buf, v_buf = cache.keys[self.index], cache.values[self.index]
        if cache._step_mask is not None:  # static single-token step (capturable)
            if key_padding_mask is not None:
                raise ValueError("a static cache takes no attention_mask (generation never pads)")
            k_buf.index_copy_(2, cache.position, key.to(k_buf.dtype))
            v_buf.index_copy_(2, cache.position, value.to(v_buf.dtype))
            return k_buf, v_buf, cache._step_mask, False
        start, num_new = cache.length, key.shape[2]
        end = start + num_new
        k_buf[:, :, start:end] = key
        v_buf[:, :, start:end] = value
        return k_buf[:, :, :end], v_buf[:, :, :end], key_padding_mask, causal and num_new > 1
