"""BLIP_Retrieval: image-text retrieval fine-tuning (ITC with momentum encoders and idx-aware
queues, ITM with hard negatives, optionally drawn across ranks), as the original
``models/blip_retrieval.py``."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import all_gather_with_grad, concat_all_gather
from ..tokenizer import TextInput
from .base import BlipBase
from .blip import load_checkpoint
from .med import BertConfig, BertModel, load_med_config
from .momentum import MomentumEncoders, enqueue_
from .vit import create_vit

Tensor = torch.Tensor
HardNegatives = Tuple[Tensor, Tensor]


class BLIP_Retrieval(MomentumEncoders, BlipBase):
    """``forward(image, caption, alpha, idx) -> (loss_ita, loss_itm)``.

    Args (as the original): ``med_config``, ``image_size`` (384), ``vit``, ``vit_grad_ckpt``,
    ``vit_ckpt_layer``, ``embed_dim``, ``queue_size``, ``momentum``, ``negative_all_rank``;
    ``tokenizer``.

    ``idx`` ``(B,)`` int64 identifies the image of each pair: every pair (in the batch and in the
    queue) with the same ``idx`` is a positive in the contrastive targets, and is never drawn as a
    hard negative. With ``negative_all_rank`` the negatives come from the whole global batch
    (all-gathered; the image embeddings keep their gradient). The queues accept any global batch
    up to ``queue_size`` (the pointer wraps around); without a process group the gathers are the
    identity.
    """

    caption_max_length = 35

    def __init__(self, med_config: Union[str, Dict[str, Any], BertConfig, None] = "configs/med_config.json",
                 image_size: int = 384, vit: Union[str, Dict[str, Any]] = "base", vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, embed_dim: int = 256, queue_size: int = 57600, momentum: float = 0.995,
                 negative_all_rank: bool = False, tokenizer: Optional[Any] = None):
        super().__init__(tokenizer)
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        config = load_med_config(med_config, encoder_width=vision_width)
        self.text_encoder = BertModel(config=config, add_pooling_layer=False)
        text_width = config.hidden_size

        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m, vision_width = create_vit(vit, image_size)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(config=config, add_pooling_layer=False)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m],
                            [self.vision_proj, self.vision_proj_m],
                            [self.text_encoder, self.text_encoder_m],
                            [self.text_proj, self.text_proj_m]]
        self.copy_params()

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        self.queue_size = queue_size
        self.momentum = momentum
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.negative_all_rank = negative_all_rank

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: Tensor, text_feat: Tensor, idxs: Tensor) -> None:
        """Write the gathered momentum features and the (already gathered) ``idxs`` ``(N, 1)`` at
        the queue pointer, wrapping around."""
        enqueue_(self.ptr_queue, self.queue_size, [(self.image_queue, concat_all_gather(image_feat)),
                                                   (self.text_queue, concat_all_gather(text_feat)),
                                                   (self.idx_queue, idxs)])

    @staticmethod
    def sample_hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, same_idx: Tensor) -> HardNegatives:
        """One negative image per text and one negative text per image, drawn in one call each from
        ``softmax(sim)`` with the pairs of the same ``idx`` (``same_idx``, bool, shape of ``sim``)
        zeroed. Returns ``(neg_image_idx, neg_text_idx)``, each ``(B,)`` int64, indexing the
        columns of ``sim`` (the local or the global batch)."""
        with torch.no_grad():
            weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(same_idx, 0)
            weights_t2i = F.softmax(sim_t2i.float(), dim=1).masked_fill(same_idx, 0)
            if bool((weights_i2t.sum(1) == 0).any() | (weights_t2i.sum(1) == 0).any()):
                raise ValueError("a sample has no hard negative: every pair of the (global) batch shares its idx. "
                                 "Retrieval batches need pairs of at least two different images")
            neg_image_idx = torch.multinomial(weights_t2i, 1).squeeze(1)
            neg_text_idx = torch.multinomial(weights_i2t, 1).squeeze(1)
        return neg_image_idx, neg_text_idx

    def forward(self, image: Tensor, caption: TextInput, alpha: float, idx: Tensor,
                hard_negatives: Optional[HardNegatives] = None) -> Tuple[Tensor, Tensor]:
        """Losses for images ``(B, 3, S, S)``, their captions and image ids ``idx`` ``(B,)``.

        ``hard_negatives``: optional fixed ``(neg_image_idx, neg_text_idx)`` instead of sampling
        (indices into the global batch with ``negative_all_rank``). Returns ``(loss_ita,
        loss_itm)``, float32 scalars.
        """
        with self.backend_context():
            return self._forward(image, caption, alpha, idx, hard_negatives)

    def _forward(self, image: Tensor, caption: TextInput, alpha: float, idx: Tensor,
                 hard_negatives: Optional[HardNegatives]) -> Tuple[Tensor, Tensor]:
        if self.param_updates_in_forward:  # else done before the forward (FSDP)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        bs = image.shape[0]
        text = self.tokens(caption, image.device, padding="max_length", max_length=self.caption_max_length)
        if text.input_ids.shape[0] != bs or idx.numel() != bs:
            raise ValueError(f"{bs} images, {text.input_ids.shape[0]} captions and {idx.numel()} idx: "
                             "one caption and one image id per image")

        image_embeds = self.visual_encoder(image)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                        mode="text")
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)

        # ============== Image-text contrastive ==============
        idx = idx.to(image.device).view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)

        with torch.no_grad():
            if self.param_updates_in_forward:
                self._momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_output_m = self.text_encoder_m(text.input_ids, attention_mask=text.attention_mask,
                                                return_dict=True, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_output_m.last_hidden_state[:, 0, :]), dim=-1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)

            sim_i2t_m = image_feat_m @ text_feat_m_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_m_all / self.temp
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets

        sim_i2t = image_feat @ text_feat_m_all / self.temp
        sim_t2i = text_feat @ image_feat_m_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2

        idxs = concat_all_gather(idx)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idxs)

        # ============== Image-text matching ==============
        encoder_input_ids = text.input_ids.clone()
        encoder_input_ids[:, 0] = self.enc_token_id
        output_pos = self.text_encoder(encoder_input_ids, attention_mask=text.attention_mask,
                                       encoder_hidden_states=image_embeds, return_dict=True)

        if self.negative_all_rank:
            with torch.no_grad():
                same_idx = torch.eq(idx, idxs.t())
                sim_i2t_neg = image_feat @ concat_all_gather(text_feat).t() / self.temp
                sim_t2i_neg = text_feat @ concat_all_gather(image_feat).t() / self.temp
            image_embeds_pool = all_gather_with_grad(image_embeds)
            input_ids_pool = concat_all_gather(encoder_input_ids)
            att_mask_pool = concat_all_gather(text.attention_mask)
        else:
            with torch.no_grad():
                same_idx = torch.eq(idx, idx.t())
                sim_i2t_neg = image_feat @ text_feat.t() / self.temp
                sim_t2i_neg = text_feat @ image_feat.t() / self.temp
            image_embeds_pool, input_ids_pool, att_mask_pool = image_embeds, encoder_input_ids, text.attention_mask
        if hard_negatives is None:
            neg_image_idx, neg_text_idx = self.sample_hard_negatives(sim_i2t_neg, sim_t2i_neg, same_idx)
        else:
            neg_image_idx, neg_text_idx = (t.to(image.device) for t in hard_negatives)
        image_embeds_neg = image_embeds_pool[neg_image_idx]
        text_ids_neg = input_ids_pool[neg_text_idx]
        text_atts_neg = att_mask_pool[neg_text_idx]

        text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
        text_atts_all = torch.cat([text.attention_mask, text_atts_neg], dim=0)
        image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
        output_neg = self.text_encoder(text_ids_all, attention_mask=text_atts_all,
                                       encoder_hidden_states=image_embeds_all, return_dict=True)
        vl_embeddings = torch.cat([output_pos.last_hidden_state[:, 0, :], output_neg.last_hidden_state[:, 0, :]],
                                  dim=0)
        vl_output = self.itm_head(vl_embeddings)
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
        itm_labels = itm_labels.to(image.device)
        loss_itm = F.cross_entropy(vl_output.float(), itm_labels)
        return loss_ita.float(), loss_itm


def blip_retrieval(pretrained: str = "", **kwargs: Any) -> BLIP_Retrieval:
    """Build :class:`BLIP_Retrieval`; with ``pretrained`` (path or URL) load it (the original only
    prints the missing keys: from a pretraining checkpoint ``idx_queue`` and ``ptr_queue``)."""
    model = BLIP_Retrieval(**kwargs)
    if pretrained:
        model, _ = load_checkpoint(model, pretrained)
    return model
