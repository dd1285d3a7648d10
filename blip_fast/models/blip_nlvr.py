"""BLIP_NLVR: a sentence against two images through the twin cross-attention (NLVR2)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import LoadReport, apply_state_dict, extract_state_dict, read_checkpoint
from ..tokenizer import TextInput
from .base import BlipBase
from .med import BertConfig, BertModel, load_med_config
from .vit import create_vit, interpolate_pos_embed

Tensor = torch.Tensor
logger = logging.getLogger("blip_fast.models")


class BLIP_NLVR(BlipBase):
    """``forward(image, text, targets, train=True)``.

    ``image`` is ``(2B, 3, S, S)``: the B first images, then the B second images (split by
    ``targets.size(0)``, so ``targets`` ``(B,)`` is needed in eval too). Train: cross-entropy loss;
    eval: ``(B, 2)`` logits. Sentences start with ``[ENC]`` and are padded to the longest.
    """

    def __init__(self, med_config: Union[str, Dict[str, Any], BertConfig, None] = "configs/med_config.json",
                 image_size: int = 480, vit: Union[str, Dict[str, Any]] = "base", vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, tokenizer: Any = None):
        super().__init__(tokenizer)
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer,
                                                       drop_path_rate=0.1)
        config = load_med_config(med_config, encoder_width=vision_width, twin_cross_attention=True)
        self.text_encoder = BertModel(config=config, add_pooling_layer=False)
        hidden = config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, image: Tensor, text: TextInput, targets: Tensor, train: bool = True) -> Tensor:
        n = targets.size(0)
        if image.shape[0] != 2 * n:
            raise ValueError(f"BLIP_NLVR takes 2 images per sentence stacked as (first images; second "
                             f"images): got {image.shape[0]} images for {n} targets")
        with self.backend_context():
            image_embeds = self.visual_encoder(image)
            image0_embeds, image1_embeds = torch.split(image_embeds, n)
            tokens = self.tokens(text, image.device, padding="longest", max_length=None, truncation=False)
            input_ids = tokens.input_ids.clone()
            input_ids[:, 0] = self.enc_token_id
            output = self.text_encoder(input_ids, attention_mask=tokens.attention_mask,
                                       encoder_hidden_states=[image0_embeds, image1_embeds], return_dict=True)
            prediction = self.cls_head(output.last_hidden_state[:, 0, :])
        if train:
            return F.cross_entropy(prediction.float(), targets)
        return prediction


def duplicate_cross_attention_keys(state_dict: Dict[str, Tensor]) -> Dict[str, str]:
    """Copy single-image cross-attention keys to the twin names (``self0``/``self1``,
    ``dense0``/``dense1``), in place, as the original NLVR loader does; returns new -> old."""
    added = {}
    for key in list(state_dict.keys()):
        if "crossattention.self." in key:
            pairs = [(key.replace("self", "self0"), key), (key.replace("self", "self1"), key)]
        elif "crossattention.output.dense." in key:
            pairs = [(key.replace("dense", "dense0"), key), (key.replace("dense", "dense1"), key)]
        else:
            continue
        for new_key, old_key in pairs:
            state_dict[new_key] = state_dict[old_key]
            added[new_key] = old_key
    return added


def load_checkpoint(model: BLIP_NLVR, url_or_filename: str) -> Tuple[BLIP_NLVR, LoadReport]:
    """Load a single-image BLIP checkpoint (or an NLVR one) into :class:`BLIP_NLVR`.

    Interpolates ``visual_encoder.pos_embed``, duplicates the cross-attention weights for both
    images, loads with ``strict=False`` (unlike the original it also works for local paths).
    """
    state_dict = extract_state_dict(read_checkpoint(url_or_filename))
    report = LoadReport()
    key = "visual_encoder.pos_embed"
    if key in state_dict:
        before = state_dict[key].shape[-2]
        state_dict[key] = interpolate_pos_embed(state_dict[key], model.visual_encoder)
        if state_dict[key].shape[-2] != before:
            report.interpolated[key] = (before, state_dict[key].shape[-2])
    report.duplicated_from = duplicate_cross_attention_keys(state_dict)
    apply_state_dict(model, state_dict, report, drop_mismatched=False)
    return model, report


def blip_nlvr(pretrained: str = "", **kwargs: Any) -> BLIP_NLVR:
    """Build :class:`BLIP_NLVR`; with ``pretrained`` (path or URL) load it and log what loaded."""
    model = BLIP_NLVR(**kwargs)
    if pretrained:
        model, report = load_checkpoint(model, pretrained)
        logger.info("BLIP_NLVR checkpoint %s loaded:\n%s", pretrained, report)
    return model
