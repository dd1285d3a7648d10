"""Small layers shared by the ViT and the BERT, routed through :mod:`blip_fast.ops`."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with the same parameters and state dict, computed by ``ops.layer_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)
