"""Small layers shared by the ViT and the BERT, routed through :mod:`blip_fast.ops`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with the same parameters and state dict, computed by ``ops.layer_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class AttentionMapCapture:
    """Grad-CAM hooks of an attention layer: the saved probabilities and their gradient.

    The layer sets ``attention_map`` / ``attn_gradients`` to None in ``__init__`` and calls
    :meth:`save_attention_map` (and registers :meth:`save_attn_gradients` as a tensor hook) on the
    path that materialises the probabilities.
    """

    attention_map: Optional[torch.Tensor]
    attn_gradients: Optional[torch.Tensor]

    def save_attn_gradients(self, attn_gradients: torch.Tensor) -> None:
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self) -> Optional[torch.Tensor]:
        return self.attn_gradients

    def save_attention_map(self, attention_map: torch.Tensor) -> None:
        self.attention_map = attention_map

    def get_attention_map(self) -> Optional[torch.Tensor]:
        return self.attention_map
