"""BLIP_Pretrain: image-text contrastive (with momentum encoders and queues), matching with hard
negatives, and image-grounded captioning, as in the original ``models/blip_pretrain.py``."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import all_gather_with_grad, concat_all_gather, get_rank, get_world_size
from ..tokenizer import BLIP_VOCAB_SIZE, TextInput
from .base import BlipBase
from .blip import load_checkpoint, tie_encoder_decoder_weights
from .med import BertConfig, BertLMHeadModel, BertModel, load_med_config
from .momentum import MomentumEncoders, enqueue_
from .vit import create_vit

Tensor = torch.Tensor
HardNegatives = Tuple[Tensor, Tensor]


class BLIP_Pretrain(MomentumEncoders, BlipBase):
    """BLIP pretraining model; ``forward(image, caption, alpha) -> (loss_ita, loss_itm, loss_lm)``.

    Args (as the original): ``med_config`` (JSON path, dict or BertConfig; default the shipped
    ``bert_config.json``), ``image_size``, ``vit`` ('base', 'large' or a dict of ViT arguments),
    ``vit_grad_ckpt``, ``vit_ckpt_layer``, ``embed_dim``, ``queue_size``, ``momentum``;
    ``tokenizer`` (object, vocab path or None).

    The queues accept any global batch size up to ``queue_size`` (the pointer wraps around), and
    the queue update needs no host synchronisation. Without an initialised process group the
    all-gather is the identity.

    ``negative_all_rank`` (default False, the original pretraining): under data parallelism the
    in-batch contrastive keys and the hard negatives come from this rank's batch only. With True
    they come from the global batch, as BLIP's retrieval fine-tuning does: the momentum features of
    every rank join the ITC keys (they carry no gradient, so a plain all-gather suffices) and the
    ITM negatives are drawn from every rank, with the image embeddings gathered *with* gradient
    (:func:`blip_fast.distributed.all_gather_with_grad`) so a negative's gradient reaches the rank
    that encoded it. On one process both settings are the same computation; with N ranks of batch
    B, ``negative_all_rank=True`` computes exactly what one process does on the N*B batch.
    """

    caption_max_length = 30

    def __init__(self, med_config: Union[str, Dict[str, Any], BertConfig, None] = "configs/bert_config.json",
                 image_size: int = 224, vit: Union[str, Dict[str, Any]] = "base", vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, embed_dim: int = 256, queue_size: int = 57600, momentum: float = 0.995,
                 tokenizer: Optional[Any] = None, negative_all_rank: bool = False):
        super().__init__(tokenizer)
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer, 0)

        encoder_config = load_med_config(med_config, encoder_width=vision_width)
        # The original loads bert-base-uncased (30522 rows) and resizes to the tokenizer's 30524.
        encoder_config.vocab_size = max(encoder_config.vocab_size, BLIP_VOCAB_SIZE)
        self.text_encoder = BertModel(config=encoder_config, add_pooling_layer=False)
        text_width = encoder_config.hidden_size

        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m, vision_width = create_vit(vit, image_size)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(config=encoder_config, add_pooling_layer=False)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m],
                            [self.vision_proj, self.vision_proj_m],
                            [self.text_encoder, self.text_encoder_m],
                            [self.text_proj, self.text_proj_m]]
        self.copy_params()

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.queue_size = queue_size
        self.momentum = momentum
        self.negative_all_rank = negative_all_rank
        self.temp = nn.Parameter(0.07 * torch.ones([]))

        decoder_config = load_med_config(encoder_config)
        self.text_decoder = BertLMHeadModel(config=decoder_config)
        tie_encoder_decoder_weights(self.text_encoder, self.text_decoder.bert, "", "/attention")

    def _decoder_shares_cross_attention(self) -> bool:
        """Whether the decoder's cross-attention keys/values are the encoder's (tied at construction;
        a wrapper that re-creates parameters could untie them, and then the decoder projects its own)."""
        for enc, dec in zip(self.text_encoder.encoder.layer, self.text_decoder.bert.encoder.layer):
            a, b = enc.crossattention.self, dec.crossattention.self
            if a.key.weight is not b.key.weight or a.value.weight is not b.value.weight \
                    or a.key.bias is not b.key.bias or a.value.bias is not b.value.bias:
                return False
        return True

    # -- queues ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: Tensor, text_feat: Tensor) -> None:
        """Write the gathered momentum features at the queue pointer (wrapping around)."""
        self._enqueue_gathered(*_gather_pair(image_feat, text_feat))

    @torch.no_grad()
    def _enqueue_gathered(self, image_feats: Tensor, text_feats: Tensor) -> None:
        """Write features already gathered from every rank ``(world * B, D)`` at the pointer."""
        enqueue_(self.queue_ptr, self.queue_size, [(self.image_queue, image_feats), (self.text_queue, text_feats)])

    # -- forward ---------------------------------------------------------------------------------
    @staticmethod
    def sample_hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, batch_size: int, offset: int = 0) -> HardNegatives:
        """One negative image per text and one negative text per image, drawn in one call each from
        ``softmax(sim[:, :batch_size]) + 1e-4`` with each row's positive (column ``offset + i``)
        zeroed (no host synchronisation). ``batch_size``: the number of candidate columns (the
        local batch, or the global one with ``negative_all_rank``); ``offset``: where this rank's
        rows start among them.

        Returns ``(neg_image_idx, neg_text_idx)``, each ``(B,)`` int64 indices into the candidates.
        """
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i[:, :batch_size].float(), dim=1) + 1e-4
            weights_i2t = F.softmax(sim_i2t[:, :batch_size].float(), dim=1) + 1e-4
            if offset == 0:
                weights_t2i.fill_diagonal_(0)
                weights_i2t.fill_diagonal_(0)
            else:
                positives = _positives(weights_t2i, offset)
                weights_t2i.masked_fill_(positives, 0)
                weights_i2t.masked_fill_(positives, 0)
            neg_image_idx = torch.multinomial(weights_t2i, 1).squeeze(1)
            neg_text_idx = torch.multinomial(weights_i2t, 1).squeeze(1)
        return neg_image_idx, neg_text_idx

    def forward(self, image: Tensor, caption: TextInput, alpha: float,
                hard_negatives: Optional[HardNegatives] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Pretraining losses for images ``(B, 3, S, S)`` and their captions.

        ``caption``: B strings (tokenised here with padding to 30) or tokenised text.
        ``hard_negatives``: optional fixed ``(neg_image_idx, neg_text_idx)`` instead of sampling
        (indices into the global batch, rank-major, with ``negative_all_rank``).
        Returns ``(loss_ita, loss_itm, loss_lm)``, float32 scalars.
        """
        with self.backend_context():
            return self._forward(image, caption, alpha, hard_negatives)

    def _forward(self, image: Tensor, caption: TextInput, alpha: float,
                 hard_negatives: Optional[HardNegatives]) -> Tuple[Tensor, Tensor, Tensor]:
        if self.param_updates_in_forward:  # else done before the forward (FSDP)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        bs = image.shape[0]
        # With negative_all_rank the in-batch keys / negative candidates are the global batch and
        # this rank's samples sit at [offset, offset + bs).
        offset = get_rank() * bs if self.negative_all_rank else 0
        text = self.tokens(caption, image.device, padding="max_length", max_length=self.caption_max_length)
        if text.input_ids.shape[0] != bs:
            raise ValueError(f"{bs} images but {text.input_ids.shape[0]} captions")

        image_embeds = self.visual_encoder(image)
        image_feat = _unit(self.vision_proj(image_embeds[:, 0, :]))
        text_output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                        mode="text")
        text_feat = _unit(self.text_proj(text_output.last_hidden_state[:, 0, :]))

        # ============== Image-text contrastive ==============
        # Features, queues, temperature, similarities and losses stay float32 under autocast.
        with torch.no_grad():
            if self.param_updates_in_forward:
                self._momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = _unit(self.vision_proj_m(image_embeds_m[:, 0, :]))
            text_output_m = self.text_encoder_m(text.input_ids, attention_mask=text.attention_mask,
                                                return_dict=True, mode="text")
            text_feat_m = _unit(self.text_proj_m(text_output_m.last_hidden_state[:, 0, :]))
            image_keys, text_keys = image_feat_m, text_feat_m
            if self.negative_all_rank:
                image_keys, text_keys = _gather_pair(image_feat_m, text_feat_m)
            n_keys = image_keys.shape[0]
            image_feat_all = torch.cat([image_keys.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_keys.t(), self.text_queue.clone().detach()], dim=1)

            sim_i2t_m = _similarity(image_feat_m, text_feat_all, self.temp)
            sim_t2i_m = _similarity(text_feat_m, image_feat_all, self.temp)
            if offset == 0:
                sim_targets = torch.zeros(sim_i2t_m.size(), device=image.device)
                sim_targets.fill_diagonal_(1)
            else:
                sim_targets = _positives(sim_i2t_m, offset).float()
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets

        sim_i2t = _similarity(image_feat, text_feat_all, self.temp)
        sim_t2i = _similarity(text_feat, image_feat_all, self.temp)
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2
        if self.negative_all_rank:
            self._enqueue_gathered(image_keys, text_keys)
        else:
            self._dequeue_and_enqueue(image_feat_m, text_feat_m)

        # ============== Image-text matching ==============
        encoder_input_ids = text.input_ids.clone()
        encoder_input_ids[:, 0] = self.enc_token_id
        if hard_negatives is None:
            neg_image_idx, neg_text_idx = self.sample_hard_negatives(sim_i2t, sim_t2i, n_keys, offset)
        else:
            neg_image_idx, neg_text_idx = (t.to(image.device) for t in hard_negatives)
        # The cross-attention keys/values depend only on the image tokens and the weights, which
        # the ITM positives, both kinds of negatives and the decoder share (tied): project them once
        # per layer for the B images and gather rows, instead of re-projecting 4B image batches.
        image_kv = self.text_encoder.precompute_cross_kv(image_embeds)
        # Positives and both kinds of negatives go through the encoder as ONE batch of 3B (the
        # original makes a B call and a 2B call: the same function per sample, half the launches).
        # Rows: (text_i, image_i), (text_i, image_neg(i)), (text_neg(i), image_i).
        if self.negative_all_rank:
            # Negatives from the global batch (indices into it): the chosen images' embeddings are
            # gathered with gradient (a negative's gradient reaches the rank that encoded it) and
            # projected here; the positives reuse this rank's keys/values.
            neg_kv = self.text_encoder.precompute_cross_kv(all_gather_with_grad(image_embeds)[neg_image_idx])
            itm_kv = [(torch.cat([k, k_neg, k]), torch.cat([v, v_neg, v]))
                      for (k, v), (k_neg, v_neg) in zip(image_kv, neg_kv)]
            all_ids, all_atts = _gather_pair(encoder_input_ids, text.attention_mask)
            itm_ids = torch.cat([encoder_input_ids, encoder_input_ids, all_ids[neg_text_idx]])
            itm_atts = torch.cat([text.attention_mask, text.attention_mask, all_atts[neg_text_idx]])
        else:
            arange = torch.arange(bs, device=image.device)
            image_idx = torch.cat([arange, neg_image_idx, arange])
            text_idx = torch.cat([arange, arange, neg_text_idx])
            itm_kv = [(k[image_idx], v[image_idx]) for k, v in image_kv]
            itm_ids, itm_atts = encoder_input_ids[text_idx], text.attention_mask[text_idx]
        output_itm = self.text_encoder(itm_ids, attention_mask=itm_atts, encoder_kv=itm_kv, return_dict=True)
        vl_embeddings = output_itm.last_hidden_state[:, 0, :]
        vl_output = self.itm_head(vl_embeddings)
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long, device=image.device),
                                torch.zeros(2 * bs, dtype=torch.long, device=image.device)])
        loss_itm = F.cross_entropy(vl_output.float(), itm_labels)

        # ============== Language modelling ==============
        decoder_input_ids = text.input_ids.clone()
        decoder_input_ids[:, 0] = self.bos_token_id
        decoder_targets = decoder_input_ids.masked_fill(decoder_input_ids == self.pad_token_id, -100)
        decoder_kv = image_kv if self._decoder_shares_cross_attention() else None
        decoder_output = self.text_decoder(decoder_input_ids, attention_mask=text.attention_mask,
                                           encoder_hidden_states=None if decoder_kv is not None else image_embeds,
                                           encoder_kv=decoder_kv, labels=decoder_targets, return_dict=True)
        loss_lm = decoder_output.loss
        return loss_ita.float(), loss_itm, loss_lm.float()


def _unit(x: Tensor) -> Tensor:
    """L2-normalised float32 features ``(N, D)`` (whatever the autocast dtype of ``x``)."""
    return F.normalize(x.float(), dim=-1)


def _similarity(feat: Tensor, feat_all: Tensor, temp: Tensor) -> Tensor:
    """``feat @ feat_all / temp`` in float32: ``(N, D) x (D, M) -> (N, M)``, autocast off."""
    with torch.autocast(device_type=feat.device.type, enabled=False):
        return feat.float() @ feat_all.float() / temp.float()


def _positives(scores: Tensor, offset: int) -> Tensor:
    """Boolean ``(B, N)`` mask, True at row ``i``'s positive column ``offset + i``."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return torch.arange(scores.shape[1], device=scores.device)[None, :] == (rows + offset)[:, None]


def _gather_pair(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``concat_all_gather`` of two ``(B, *)`` tensors in one collective (in their common dtype)."""
    if get_world_size() == 1:
        return a, b
    joined = concat_all_gather(torch.cat([a.flatten(1), b.flatten(1)], dim=1))
    first, second = joined.split([a[0].numel(), b[0].numel()], dim=1)
    return first.reshape((-1,) + a.shape[1:]).to(a.dtype), second.reshape((-1,) + b.shape[1:]).to(b.dtype)


def blip_pretrain(pretrained: str = "", **kwargs: Any) -> BLIP_Pretrain:
    """Build :class:`BLIP_Pretrain` (``kwargs`` as its constructor); ``pretrained``: a checkpoint
    path or URL to load (pos-embed interpolation, load report logged)."""
    model = BLIP_Pretrain(**kwargs)
    if pretrained:
        model, _ = load_checkpoint(model, pretrained)
    return model
