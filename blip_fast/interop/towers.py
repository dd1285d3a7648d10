"""Start a BLIP model's towers from the weights the original BLIP starts from.

The original ``BLIP_Pretrain.__init__`` downloads DeiT-B (``vit='base'``) or ViT-L/16 in21k
(``vit='large'``, a JAX ``.npz``) into the image encoder and ``bert-base-uncased`` into the text
encoder and decoder. blip_fast never downloads at construction; :func:`load_pretrained_towers`
does it on request, from these sources or any other of the same layouts.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch.nn as nn

from ..checkpoint import LoadReport
from ..models.med import BertLMHeadModel, BertModel
from ..models.vit import VisionTransformer
from ..weight_sources import WeightsSource, read_state_dict
from .bert import load_bert_weights
from .timm_vit import load_timm_vit

logger = logging.getLogger("blip_fast.interop")

#: The DeiT-B/16 224 release the original BLIP_Pretrain (vit='base') starts from.
DEIT_BASE_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"
#: timm 0.4.12's ``vit_large_patch16_224_in21k`` weights (vit='large' in the original).
VIT_LARGE_IN21K_URL = ("https://storage.googleapis.com/vit_models/augreg/"
                       "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz")
BERT_BASE_UNCASED = "bert-base-uncased"


def load_pretrained_towers(model: nn.Module, vit: Optional[WeightsSource] = None, bert: Optional[WeightsSource] = None,
                           fold_token_type_embeddings: bool = False, **hub_kwargs: Any) -> Dict[str, LoadReport]:
    """Load ``vit`` (timm / DeiT / ``.npz``) into the image encoder and ``bert`` (bert-base-uncased
    layout) into every BERT tower of ``model`` (``text_encoder``, ``text_decoder``, the dual
    encoder's ``text_model``), then re-copy the momentum encoders (``copy_params``) if the model has
    them. Returns ``{module name: LoadReport}``.

    Example, as the original ``blip_pretrain(vit='base')`` would start::

        load_pretrained_towers(model, vit=DEIT_BASE_URL, bert=BERT_BASE_UNCASED)
    """
    reports: Dict[str, LoadReport] = {}
    if vit is not None:
        for name in ("visual_encoder", "vision_model"):
            if isinstance(getattr(model, name, None), VisionTransformer):
                reports[name] = load_timm_vit(getattr(model, name), vit, **hub_kwargs)
        if not reports:
            raise TypeError(f"{type(model).__name__} has no BLIP image encoder")
    if bert is not None:
        state = read_state_dict(bert, **hub_kwargs)
        found = False
        for name in ("text_encoder", "text_model", "text_decoder"):
            module = getattr(model, name, None)
            if isinstance(module, (BertModel, BertLMHeadModel)):
                reports[name] = load_bert_weights(module, state, fold_token_type_embeddings=fold_token_type_embeddings)
                found = True
        if not found:
            raise TypeError(f"{type(model).__name__} has no BERT tower")
    if hasattr(model, "copy_params"):
        model.copy_params()  # momentum encoders start as copies of the online ones
    return reports
