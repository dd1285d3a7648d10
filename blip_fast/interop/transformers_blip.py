"""Key mapping between transformers' BLIP layout (``BlipForImageTextRetrieval``, ``BlipModel``,
``BlipForConditionalGeneration``) and the original BLIP layout that blip_fast uses.

Vision tower (transformers -> original):

=============================================================  ====================================
``vision_model.embeddings.class_embedding``                    ``visual_encoder.cls_token``
``vision_model.embeddings.position_embedding``                 ``visual_encoder.pos_embed``
``vision_model.embeddings.patch_embedding.{weight,bias}``      ``visual_encoder.patch_embed.proj.*``
``vision_model.encoder.layers.{i}.self_attn.qkv.*``            ``visual_encoder.blocks.{i}.attn.qkv.*``
``vision_model.encoder.layers.{i}.self_attn.projection.*``     ``visual_encoder.blocks.{i}.attn.proj.*``
``vision_model.encoder.layers.{i}.layer_norm{1,2}.*``          ``visual_encoder.blocks.{i}.norm{1,2}.*``
``vision_model.encoder.layers.{i}.mlp.fc{1,2}.*``              ``visual_encoder.blocks.{i}.mlp.fc{1,2}.*``
``vision_model.post_layernorm.*``                              ``visual_encoder.norm.*``
=============================================================  ====================================

The text towers keep their names (``text_encoder.*``, ``text_decoder.bert.*``,
``text_decoder.cls.*``), as do ``vision_proj``, ``text_proj`` and ``itm_head``. transformers'
text embeddings may lack the ``position_ids`` buffer or hold it at another length; it is rebuilt
as ``arange(max_position_embeddings)``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

Tensor = torch.Tensor

# (transformers pattern, original pattern); applied to the part after the prefix.
_VISION_RULES: List[Tuple[str, str]] = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^post_layernorm\.(weight|bias)$", r"norm.\1"),
]


def _map(key: str, rules: List[Tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(key)


def _invert(rules: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Rules from original names back to transformers names (the capture groups reused)."""
    inverted = []
    for pattern, repl in rules:
        groups = iter(re.findall(r"\([^)]*\)", pattern))
        src = re.escape(re.sub(r"\\(\d)", "\0", repl)).replace("\\\0", "\0").replace("\0", "{}")
        src = "^" + src.format(*groups) + "$"
        counter = iter(range(1, 10))
        dst = re.sub(r"\([^)]*\)", lambda _: "\\" + str(next(counter)), pattern.strip("^$")).replace("\\.", ".")
        inverted.append((src, dst))
    return inverted


_VISION_RULES_INV = _invert(_VISION_RULES)


def from_transformers_blip(state_dict: Dict[str, Tensor], max_position_embeddings: int = 512) -> Dict[str, Tensor]:
    """A transformers BLIP state dict in the original (blip_fast) layout."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vision_model."):
            out["visual_encoder." + _map(key[len("vision_model."):], _VISION_RULES)] = value
        elif key.endswith("embeddings.position_ids"):
            continue  # a constant arange, rebuilt below at the model's length
        else:
            out[key] = value
    for prefix in ("text_encoder.", "text_decoder.bert."):
        has_tower = any(k.startswith(prefix + "embeddings.") for k in out)
        if has_tower:
            out[prefix + "embeddings.position_ids"] = torch.arange(max_position_embeddings).unsqueeze(0)
    return out


def to_transformers_blip(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """An original-layout (blip_fast) state dict in transformers' BLIP layout."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("visual_encoder."):
            out["vision_model." + _map(key[len("visual_encoder."):], _VISION_RULES_INV)] = value
        else:
            out[key] = value
    return out
