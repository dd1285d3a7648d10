"""BLIP_ITM: image-text matching ('itm' logits) and contrastive similarity ('itc')."""
from __future__ import annotations

from typing import Any, Dict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import require_complete
from ..tokenizer import TextInput
from .base import BlipBase
from .blip import load_checkpoint
from .med import BertConfig, BertModel, load_med_config
from .vit import create_vit

Tensor = torch.Tensor


class BLIP_ITM(BlipBase):
    """``forward(image, caption, match_head='itm')``.

    * ``'itm'``: ``(B, 2)`` logits of ``itm_head`` on the first token of the image-grounded encoder;
    * ``'itc'``: ``(B_img, B_txt)`` cosine similarities of the normalised projections (no
      temperature).

    As in the original, captions are padded/truncated to 35 tokens and keep ``[CLS]`` first for
    both heads.
    """

    caption_max_length = 35

    def __init__(self, med_config: Union[str, Dict[str, Any], BertConfig, None] = "configs/med_config.json",
                 image_size: int = 384, vit: Union[str, Dict[str, Any]] = "base", vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, embed_dim: int = 256, tokenizer: Any = None):
        super().__init__(tokenizer)
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        config = load_med_config(med_config, encoder_width=vision_width)
        self.text_encoder = BertModel(config=config, add_pooling_layer=False)
        text_width = config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

    def forward(self, image: Tensor, caption: TextInput, match_head: str = "itm") -> Tensor:
        if match_head not in ("itm", "itc"):
            raise ValueError(f"match_head must be 'itm' or 'itc', got {match_head!r}")
        with self.backend_context():
            image_embeds = self.visual_encoder(image)
            text = self.tokens(caption, image.device, padding="max_length", max_length=self.caption_max_length)
            if match_head == "itm":
                if text.input_ids.shape[0] != image.shape[0]:
                    raise ValueError(f"'itm' pairs images with captions: {image.shape[0]} images but "
                                     f"{text.input_ids.shape[0]} captions")
                output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                           encoder_hidden_states=image_embeds, return_dict=True)
                return self.itm_head(output.last_hidden_state[:, 0, :])
            text_output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                            mode="text")
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
            text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)
            return image_feat @ text_feat.t()


def blip_itm(pretrained: str = "", **kwargs: Any) -> BLIP_ITM:
    """Build :class:`BLIP_ITM`; with ``pretrained`` (path or URL) load it and require every key."""
    model = BLIP_ITM(**kwargs)
    if pretrained:
        model, report = load_checkpoint(model, pretrained)
        require_complete(report, "BLIP_ITM")
    return model
