"""Pieces shared by the BLIP models (mirrors the original ``models/blip.py``).

The original file also defines the captioning and feature-extractor models; they live in
``blip_decoder.py`` and ``blip_base.py`` and are importable from here too
(``from blip_fast.models.blip import blip_decoder``), as the original's users import them.
"""
from __future__ import annotations

import logging
from typing import List

import torch.nn as nn

from ..checkpoint import is_url, load_checkpoint
from ..tokenizer import init_tokenizer
from .vit import create_vit, interpolate_pos_embed

logger = logging.getLogger("blip_fast.models")

__all__ = ["create_vit", "init_tokenizer", "load_checkpoint", "is_url", "interpolate_pos_embed",
           "tie_encoder_decoder_weights", "BLIP_Decoder", "blip_decoder", "BLIP_Base", "blip_feature_extractor"]

_MOVED = {"BLIP_Decoder": "blip_decoder", "blip_decoder": "blip_decoder", "BLIP_Base": "blip_base",
          "blip_feature_extractor": "blip_base"}


def __getattr__(name: str):
    # The models import this module, so the original's names are resolved lazily.
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tie_encoder_decoder_weights(encoder: nn.Module, decoder: nn.Module, base_model_prefix: str,
                                skip_key: str) -> List[str]:
    """Make ``encoder``'s modules use ``decoder``'s parameters (one storage), as BLIP does.

    Walks the two module trees in parallel; at every module that has a ``weight`` and whose
    path (``/``-separated, starting from ``base_model_prefix``) does not contain ``skip_key``,
    the encoder module's ``weight`` and ``bias`` become the decoder's, and the walk stops there.
    With ``skip_key='/attention'`` every layer shares everything but its self-attention block.
    Returns the encoder sub-module paths that have no counterpart in the decoder.
    """
    uninitialized: List[str] = []

    def tie(decoder_module: nn.Module, encoder_module: nn.Module, path: str, depth: int) -> None:
        if depth > 500:
            raise ValueError("module trees nested too deeply (a circular module reference?)")
        if hasattr(decoder_module, "weight") and skip_key not in path:
            if not hasattr(encoder_module, "weight"):
                raise ValueError(f"{path}: the decoder module has a weight, the encoder module does not")
            encoder_module.weight = decoder_module.weight
            if hasattr(decoder_module, "bias"):
                encoder_module.bias = decoder_module.bias
            return
        encoder_children = encoder_module._modules
        decoder_children = decoder_module._modules
        if not decoder_children:
            return
        unmatched = {f"{path}/{name}" for name in encoder_children}
        for name, child in decoder_children.items():
            if name not in encoder_children:
                continue
            tie(child, encoder_children[name], f"{path}/{name}", depth + 1)
            unmatched.discard(f"{path}/{name}")
        uninitialized.extend(sorted(unmatched))

    if type(encoder) is not type(decoder):
        logger.info("%s and %s differ: make sure every encoder weight is initialised",
                    type(decoder).__name__, type(encoder).__name__)
    tie(decoder, encoder, base_model_prefix, 0)
    return uninitialized
