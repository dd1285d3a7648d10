"""Key mapping between transformers' ``BlipModel`` and blip_fast's :class:`VisionTextDualEncoder`.

``BlipModel`` is BLIP's two towers with bias-free projections and a logit scale, i.e. a dual
encoder that pools the image with ``post_layernorm`` applied once more to the class token and the
text with BERT's dense + tanh pooler (``VisionTextDualEncoder(vision_pooler='cls_post_norm',
text_pooler='pooler', projection_bias=False)``):

==========================================  =========================================
transformers (``BlipModel``)                blip_fast (``VisionTextDualEncoder``)
==========================================  =========================================
``vision_model.*``                          ``vision_model.*`` in the original ViT names
                                            (the table in :mod:`.transformers_blip`)
``text_model.*`` (incl. ``pooler.dense``)   ``text_model.*``
``visual_projection.weight``                same
``text_projection.weight``                  same
``logit_scale``                             same
==========================================  =========================================
"""
from __future__ import annotations

from typing import Dict

import torch

from .transformers_blip import _VISION_RULES, _VISION_RULES_INV, _map

Tensor = torch.Tensor


def from_transformers_blip_model(state_dict: Dict[str, Tensor], max_position_embeddings: int = 512) -> Dict[str, Tensor]:
    """A transformers ``BlipModel`` state dict in :class:`VisionTextDualEncoder`'s names."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vision_model."):
            out["vision_model." + _map(key[len("vision_model."):], _VISION_RULES)] = value
        elif key.endswith("embeddings.position_ids"):
            continue  # a constant arange, rebuilt below at the model's length
        else:
            out[key] = value
    if any(k.startswith("text_model.embeddings.") for k in out):
        out["text_model.embeddings.position_ids"] = torch.arange(max_position_embeddings).unsqueeze(0)
    return out


def to_transformers_blip_model(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A :class:`VisionTextDualEncoder` state dict in transformers' ``BlipModel`` names."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vision_model."):
            out["vision_model." + _map(key[len("vision_model."):], _VISION_RULES_INV)] = value
        else:
            out[key] = value
    return out
