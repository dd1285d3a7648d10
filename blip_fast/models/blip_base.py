"""BLIP_Base: the feature extractor (image, text or image-grounded text features), as the original
``models/blip.py`` BLIP_Base."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch

from ..checkpoint import require_complete
from ..tokenizer import TextInput
from .base import BlipBase
from .blip import load_checkpoint
from .med import BertConfig, BertModel, load_med_config
from .vit import create_vit

Tensor = torch.Tensor

MODES = ("image", "text", "multimodal")


class BLIP_Base(BlipBase):
    """``forward(image, caption, mode)``:

    * ``'image'``: ViT embeddings ``(B, 1 + P, vision_width)`` (``caption`` may be None);
    * ``'text'``: unimodal text encoder states ``(B, L, 768)``, ``[CLS]`` first;
    * ``'multimodal'``: image-grounded text encoder states ``(B, L, 768)``, ``[ENC]`` first.

    Captions are tokenised without truncation and padded to the longest (the original does not
    pad, which only works for one caption or equal lengths).
    """

    def __init__(self, med_config: Union[str, Dict[str, Any], BertConfig, None] = "configs/med_config.json",
                 image_size: int = 224, vit: Union[str, Dict[str, Any]] = "base", vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, tokenizer: Optional[Any] = None):
        super().__init__(tokenizer)
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        config = load_med_config(med_config, encoder_width=vision_width)
        self.text_encoder = BertModel(config=config, add_pooling_layer=False)

    def forward(self, image: Optional[Tensor], caption: Optional[TextInput], mode: str) -> Tensor:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self.backend_context():
            if mode == "image":
                if image is None:
                    raise ValueError("mode='image' needs images")
                return self.visual_encoder(image)
            if caption is None:
                raise ValueError(f"mode={mode!r} needs captions")
            device = image.device if image is not None else self.text_encoder.device
            text = self.tokens(caption, device, padding="longest", max_length=None, truncation=False)
            if mode == "text":
                return self.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                         mode="text").last_hidden_state
            if image is None:
                raise ValueError("mode='multimodal' needs images")
            image_embeds = self.visual_encoder(image)
            if text.input_ids.shape[0] != image.shape[0]:
                raise ValueError(f"{image.shape[0]} images but {text.input_ids.shape[0]} captions")
            input_ids = text.input_ids.clone()
            input_ids[:, 0] = self.enc_token_id
            return self.text_encoder(input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                     return_dict=True).last_hidden_state


def blip_feature_extractor(pretrained: str = "", **kwargs: Any) -> BLIP_Base:
    """Build :class:`BLIP_Base`; with ``pretrained`` (path or URL) load it and require every key."""
    model = BLIP_Base(**kwargs)
    if pretrained:
        model, report = load_checkpoint(model, pretrained)
        require_complete(report, "BLIP_Base")
    return model
