"""MED: BLIP's multimodal mixture of encoder-decoder, a BERT with cross-attention in every layer.

Module names and behaviour follow the original ``models/med.py`` (and the twin cross-attention
of ``models/nlvr_encoder.py``, enabled by ``config.twin_cross_attention``), so state dicts load
key for key:

* ``BertModel(mode='text')``: unimodal text encoder (cross-attention skipped);
* ``BertModel(mode='multimodal')``: image-grounded encoder, cross-attending to image tokens;
* ``BertLMHeadModel``: image-grounded decoder (causal + padding self-attention, LM loss with
  label smoothing 0.1, ``past_key_values`` for generation).

Post-LayerNorm blocks (eps ``config.layer_norm_eps``), dropout on probabilities and hidden
states, erf GELU. Attention, LayerNorm(+residual+dropout), GELU and the LM loss go through
:mod:`blip_fast.ops`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
)

from .. import ops
from ._backend import BackendSelectable
from .kv_cache import DecoderKVCache, LayerKVCache
from .layers import AttentionMapCapture, LayerNorm

Tensor = torch.Tensor
ImageStates = Union[Tensor, Sequence[Tensor]]
#: Per layer, the cross-attention keys and values of the image tokens, each ``(B_img, H, N, D)``.
EncoderKV = Sequence[Tuple[Tensor, Tensor]]
PastKeyValues = Union[Sequence[Tuple[Tensor, Tensor]], DecoderKVCache]

__all__ = ["BertConfig", "load_med_config", "BertModel", "BertLMHeadModel", "BertEmbeddings",
           "BertSelfAttention", "BertLayer", "BertEncoder", "DecoderKVCache"]


#: BERT activations by config name (transformers' ACT2FN names; its module costs seconds to import).
_ACTIVATIONS = {
    "gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}


def _activation(name_or_fn: Any) -> Any:
    if not isinstance(name_or_fn, str):
        return name_or_fn
    if name_or_fn not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {name_or_fn!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name_or_fn]()


def load_med_config(med_config: Union[str, os.PathLike, Dict[str, Any], BertConfig, None] = None,
                    **overrides: Any) -> BertConfig:
    """A :class:`BertConfig` from a JSON path, a dict, a BertConfig (copied) or None.

    ``None`` and the names ``'med_config.json'`` / ``'bert_config.json'`` (or the original
    ``'configs/med_config.json'``) resolve to the copies shipped in ``blip_fast/configs``.
    ``overrides`` are set on the result (e.g. ``encoder_width``).
    """
    if med_config is None:
        med_config = "med_config.json"
    if isinstance(med_config, BertConfig):
        config = BertConfig.from_dict(med_config.to_dict())
    elif isinstance(med_config, dict):
        config = BertConfig.from_dict(dict(med_config))
    elif isinstance(med_config, (str, os.PathLike)):
        path = os.fspath(med_config)
        if not os.path.isfile(path):
            shipped = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", os.path.basename(path))
            if not os.path.isfile(shipped):
                raise FileNotFoundError(f"med_config {path!r} not found (and no shipped config of that name)")
            path = shipped
        with open(path, encoding="utf-8") as f:
            config = BertConfig.from_dict(json.load(f))
    else:
        raise TypeError(f"med_config must be a path, a dict or a BertConfig, got {type(med_config).__name__}")
    for key, value in overrides.items():
        setattr(config, key, value)
    if not hasattr(config, "encoder_width"):
        config.encoder_width = config.hidden_size
    return config


def _keep_mask(mask: Optional[Tensor], what: str) -> Optional[Tensor]:
    """A 0/1 (or bool) ``(B, L)`` mask as the boolean keep mask the ops take."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(
            f"{what} must be a (batch, length) padding mask of 0/1 values, got shape {tuple(mask.shape)}; "
            "blip_fast expresses decoder masks as causal + padding and takes no 3-D masks"
        )
    return mask if mask.dtype == torch.bool else mask != 0


class BertEmbeddings(nn.Module):
    """Word and absolute position embeddings (BLIP has no token-type embeddings)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=True)
        self.position_embedding_type = getattr(config, "position_embedding_type", "absolute")
        self.config = config

    def forward(self, input_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, past_key_values_length: int = 0) -> Tensor:
        seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if seq_length + past_key_values_length > self.config.max_position_embeddings:
            raise ValueError(
                f"text of {seq_length + past_key_values_length} tokens exceeds the "
                f"{self.config.max_position_embeddings} position embeddings: truncate the captions "
                f"(tokenizer(..., truncation=True, max_length=...))"
            )
        if position_ids is None:
            position_ids = self.position_ids[:, past_key_values_length: seq_length + past_key_values_length]
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds
        if self.position_embedding_type == "absolute":
            embeddings = embeddings + self.position_embeddings(position_ids)
        embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)


class BertSelfAttention(AttentionMapCapture, nn.Module):
    """Multi-head attention; as cross-attention its keys/values come from the image width."""

    def __init__(self, config: BertConfig, is_cross_attention: bool):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.key = nn.Linear(kv_width, self.all_head_size)
        self.value = nn.Linear(kv_width, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.position_embedding_type = getattr(config, "position_embedding_type", "absolute")
        if self.position_embedding_type != "absolute":
            raise ValueError("blip_fast's BERT supports absolute position embeddings only")
        self.save_attention = False
        self.attn_gradients: Optional[Tensor] = None
        self.attention_map: Optional[Tensor] = None
        self.is_cross_attention = is_cross_attention
        #: optional ``(weight (3*H*D, width), bias)`` of query, key and value stacked: one projection
        #: instead of three (set on the decoding copy of a decoder, never part of the state dict)
        self.fused_qkv: Optional[Tuple[Tensor, Tensor]] = None

    def transpose_for_scores(self, x: Tensor) -> Tensor:
        """(B, L, H*D) -> (B, H, L, D) as a strided view."""
        return x.view(x.shape[:-1] + (self.num_attention_heads, self.attention_head_size)).permute(0, 2, 1, 3)

    def project_kv(self, states: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values of ``states`` ``(B, N, width)``, each ``(B, H, N, D)`` (strided views).

        For a cross-attention these depend only on the image tokens: generation computes them once
        and passes them back as ``encoder_kv``.
        """
        return self.transpose_for_scores(self.key(states)), self.transpose_for_scores(self.value(states))

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        head_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        past_key_value: Optional[Union[Tuple[Tensor, Tensor], LayerKVCache]] = None,
        output_attentions: bool = False,
        causal: bool = False,
        encoder_kv: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tuple[Any, ...]:
        """Masks are boolean keep masks ``(B, Lk)``; returns ``(context, [probs,] (k, v))``.

        ``encoder_kv``: precomputed cross-attention keys/values ``(B_img, H, N, D)`` used instead
        of projecting ``encoder_hidden_states``. The query batch may be a multiple ``g * B_img``
        (``g`` consecutive rows per image, as beam search lays them out): the ``g`` rows' queries
        are folded into one query block per image, so keys and values are never repeated.
        ``past_key_value``: a ``(k, v)`` tuple of earlier positions (concatenated), or a
        :class:`~blip_fast.models.kv_cache.LayerKVCache` that stores them in place.
        """
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported by blip_fast (BLIP never uses it)")
        is_cross_attention = encoder_hidden_states is not None or encoder_kv is not None
        if is_cross_attention:
            query_layer = self.transpose_for_scores(self.query(hidden_states))
            if encoder_kv is not None:
                key_layer, value_layer = encoder_kv
            else:
                key_layer, value_layer = self.project_kv(encoder_hidden_states)
            key_padding_mask, causal = encoder_attention_mask, False
        else:
            if self.fused_qkv is not None:
                qkv = F.linear(hidden_states, *self.fused_qkv).split(self.all_head_size, dim=-1)
                query_layer, key_layer, value_layer = (self.transpose_for_scores(x) for x in qkv)
            else:
                query_layer = self.transpose_for_scores(self.query(hidden_states))
                key_layer, value_layer = self.project_kv(hidden_states)
            key_padding_mask = attention_mask
            if isinstance(past_key_value, LayerKVCache):
                key_layer, value_layer, key_padding_mask, causal = past_key_value.append(
                    key_layer, value_layer, key_padding_mask, causal)
            elif past_key_value is not None:
                key_layer = torch.cat([past_key_value[0], key_layer], dim=2)
                value_layer = torch.cat([past_key_value[1], value_layer], dim=2)
        if not isinstance(past_key_value, LayerKVCache):
            past_key_value = (key_layer, value_layer)

        groups = 1
        if is_cross_attention and query_layer.shape[0] != key_layer.shape[0]:
            groups = query_layer.shape[0] // key_layer.shape[0]
            if groups * key_layer.shape[0] != query_layer.shape[0]:
                raise ValueError(f"{query_layer.shape[0]} text rows cannot attend to {key_layer.shape[0]} images: "
                                 "the text batch must be a multiple of the image batch (g rows per image)")
            query_layer = _fold_groups(query_layer, groups)

        save_map = is_cross_attention and self.save_attention
        dropout_p = self.dropout.p if self.training else 0.0
        scale = self.attention_head_size ** -0.5
        if output_attentions or save_map:
            context, probs = ops.attention(query_layer, key_layer, value_layer, key_padding_mask=key_padding_mask,
                                           causal=causal, dropout_p=dropout_p, scale=scale, need_weights=True)
            if groups > 1:
                probs = _unfold_groups(probs, groups)
            if save_map:
                self.save_attention_map(probs)
                if probs.requires_grad:
                    probs.register_hook(self.save_attn_gradients)
        else:
            context = ops.attention(query_layer, key_layer, value_layer, key_padding_mask=key_padding_mask,
                                    causal=causal, dropout_p=dropout_p, scale=scale)
            probs = None
        if groups > 1:  # (B, H, g*L, D) -> (g*B, L, H*D) in one copy
            b, h, gl, d = context.shape
            context = context.view(b, h, groups, gl // groups, d).permute(0, 2, 3, 1, 4).reshape(
                b * groups, gl // groups, h * d)
        else:
            context = context.permute(0, 2, 1, 3).reshape(context.shape[0], context.shape[2], self.all_head_size)
        outputs = (context, probs) if output_attentions else (context,)
        return outputs + (past_key_value,)


def _fold_groups(x: Tensor, groups: int) -> Tensor:
    """(g*B, H, L, D) with g consecutive rows per image -> (B, H, g*L, D)."""
    gb, h, length, d = x.shape
    return x.reshape(gb // groups, groups, h, length, d).transpose(1, 2).reshape(gb // groups, h, groups * length, d)


def _unfold_groups(x: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`_fold_groups` (any trailing size)."""
    b, h, gl, last = x.shape
    return x.reshape(b, h, groups, gl // groups, last).transpose(1, 2).reshape(b * groups, h, gl // groups, last)


class BertSelfOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + input)``; the twin form merges two cross-attentions.

    Twin (NLVR): ``dense0`` / ``dense1`` for the two images, averaged, or from layer
    ``merge_layer_start`` on concatenated and projected by ``merge_layer`` (no activation).
    """

    def __init__(self, config: BertConfig, twin: bool = False, merge: bool = False):
        super().__init__()
        # Registration order decides the state-dict order: med.py registers dense first,
        # nlvr_encoder.py (every layer of the twin model) LayerNorm first.
        nlvr_layout = getattr(config, "twin_cross_attention", False)
        if not nlvr_layout:
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if twin:
            self.dense0 = nn.Linear(config.hidden_size, config.hidden_size)
            self.dense1 = nn.Linear(config.hidden_size, config.hidden_size)
        elif nlvr_layout:
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.merge = merge
        if merge:
            self.merge_layer = nn.Linear(config.hidden_size * 2, config.hidden_size)

    def forward(self, hidden_states: Union[Tensor, Sequence[Tensor]], input_tensor: Tensor) -> Tensor:
        if isinstance(hidden_states, (list, tuple)):
            h0 = self.dense0(hidden_states[0])
            h1 = self.dense1(hidden_states[1])
            hidden_states = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge else (h0 + h1) / 2
        else:
            hidden_states = self.dense(hidden_states)
        dropout_p = self.dropout.p if self.training else 0.0
        return ops.layer_norm(hidden_states, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                              residual=input_tensor, dropout_p=dropout_p)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, is_cross_attention: bool = False, layer_num: int = -1):
        super().__init__()
        self.twin = is_cross_attention and getattr(config, "twin_cross_attention", False)
        if self.twin:
            self.self0 = BertSelfAttention(config, is_cross_attention)
            self.self1 = BertSelfAttention(config, is_cross_attention)
            merge = layer_num >= getattr(config, "merge_layer_start", 6)
            self.output = BertSelfOutput(config, twin=True, merge=merge)
        else:
            self.self = BertSelfAttention(config, is_cross_attention)
            self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                head_mask: Optional[Tensor] = None, encoder_hidden_states: Optional[ImageStates] = None,
                encoder_attention_mask: Optional[Union[Tensor, Sequence[Optional[Tensor]]]] = None,
                past_key_value: Optional[Union[Tuple[Tensor, Tensor], LayerKVCache]] = None,
                output_attentions: bool = False, causal: bool = False,
                encoder_kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Any, ...]:
        if isinstance(encoder_hidden_states, (list, tuple)):
            if not self.twin:
                raise ValueError("a list of image states needs the twin cross-attention (BLIP_NLVR)")
            if encoder_kv is not None:
                raise ValueError("precomputed encoder_kv is not supported by the twin cross-attention (BLIP_NLVR)")
            masks = encoder_attention_mask if encoder_attention_mask is not None else (None, None)
            out0 = self.self0(hidden_states, attention_mask, head_mask, encoder_hidden_states[0], masks[0],
                              past_key_value, output_attentions)
            out1 = self.self1(hidden_states, attention_mask, head_mask, encoder_hidden_states[1], masks[1],
                              past_key_value, output_attentions)
            attention_output = self.output([out0[0], out1[0]], hidden_states)
            return (attention_output,) + out0[1:]
        if self.twin:
            raise ValueError("the twin cross-attention (BLIP_NLVR) needs a list of two image states")
        self_outputs = self.self(hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                 encoder_attention_mask, past_key_value, output_attentions, causal, encoder_kv)
        attention_output = self.output(self_outputs[0], hidden_states)
        return (attention_output,) + self_outputs[1:]


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.hidden_act == "gelu":
            return ops.linear_gelu(hidden_states, self.dense.weight, self.dense.bias)
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        dropout_p = self.dropout.p if self.training else 0.0
        return ops.layer_norm(self.dense(hidden_states), self.LayerNorm.weight, self.LayerNorm.bias,
                              self.LayerNorm.eps, residual=input_tensor, dropout_p=dropout_p)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, layer_num: int):
        super().__init__()
        self.config = config
        self.attention = BertAttention(config)
        self.layer_num = layer_num
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True, layer_num=layer_num)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                head_mask: Optional[Tensor] = None, encoder_hidden_states: Optional[ImageStates] = None,
                encoder_attention_mask: Optional[Any] = None,
                past_key_value: Optional[Union[Tuple[Tensor, Tensor], LayerKVCache]] = None,
                output_attentions: bool = False, mode: Optional[str] = None, causal: bool = False,
                encoder_kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Any, ...]:
        if isinstance(past_key_value, LayerKVCache):
            self_attn_past = past_key_value
        else:
            self_attn_past = past_key_value[:2] if past_key_value is not None else None
        self_outputs = self.attention(hidden_states, attention_mask, head_mask, output_attentions=output_attentions,
                                      past_key_value=self_attn_past, causal=causal)
        attention_output = self_outputs[0]
        outputs = self_outputs[1:-1]
        present_key_value = self_outputs[-1]
        cross_outputs: Tuple[Any, ...] = ()
        if mode == "multimodal":
            if encoder_hidden_states is None and encoder_kv is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states (the image embeddings)")
            if not self.config.add_cross_attention:
                raise ValueError("this BERT was built without cross-attention (config.add_cross_attention=False)")
            cross = self.crossattention(attention_output, attention_mask, head_mask, encoder_hidden_states,
                                        encoder_attention_mask, output_attentions=output_attentions,
                                        encoder_kv=encoder_kv)
            attention_output = cross[0]
            cross_outputs = cross[1:-1]
        intermediate_output = self.intermediate(attention_output)
        layer_output = self.output(intermediate_output, attention_output)
        return (layer_output,) + outputs + cross_outputs + (present_key_value,)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                head_mask: Optional[Sequence[Optional[Tensor]]] = None,
                encoder_hidden_states: Optional[ImageStates] = None, encoder_attention_mask: Optional[Any] = None,
                past_key_values: Optional[PastKeyValues] = None, use_cache: Optional[bool] = None,
                output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True,
                mode: str = "multimodal", causal: bool = False, encoder_kv: Optional[EncoderKV] = None):
        all_hidden_states = () if output_hidden_states else None
        all_self_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and mode == "multimodal" else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing:
            use_cache = False
        cache = past_key_values if isinstance(past_key_values, DecoderKVCache) else None
        if encoder_kv is not None and len(encoder_kv) != len(self.layer):
            raise ValueError(f"encoder_kv has {len(encoder_kv)} layers, the model {len(self.layer)}")
        next_decoder_cache = () if use_cache and cache is None else None
        for i, layer_module in enumerate(self.layer):
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            layer_head_mask = head_mask[i] if head_mask is not None else None
            if cache is not None:
                past_key_value = cache.layer(i)
            else:
                past_key_value = past_key_values[i] if past_key_values is not None else None
            layer_kv = encoder_kv[i] if encoder_kv is not None else None
            if checkpointing:
                layer_outputs = checkpoint(layer_module, hidden_states, attention_mask, layer_head_mask,
                                           encoder_hidden_states, encoder_attention_mask, None, output_attentions,
                                           mode, causal, layer_kv, use_reentrant=False)
            else:
                layer_outputs = layer_module(hidden_states, attention_mask, layer_head_mask, encoder_hidden_states,
                                             encoder_attention_mask, past_key_value, output_attentions, mode, causal,
                                             layer_kv)
            hidden_states = layer_outputs[0]
            if next_decoder_cache is not None:
                next_decoder_cache += (layer_outputs[-1],)
            if output_attentions:
                all_self_attentions = all_self_attentions + (layer_outputs[1],)
                if all_cross_attentions is not None:
                    all_cross_attentions = all_cross_attentions + (layer_outputs[2],)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if use_cache and cache is not None:
            next_decoder_cache = cache
        if not return_dict:
            return tuple(v for v in (hidden_states, next_decoder_cache, all_hidden_states, all_self_attentions,
                                     all_cross_attentions) if v is not None)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, past_key_values=next_decoder_cache, hidden_states=all_hidden_states,
            attentions=all_self_attentions, cross_attentions=all_cross_attentions)


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


def init_bert_weights(module: nn.Module, initializer_range: float) -> None:
    """BERT's initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=initializer_range)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class BertModel(BackendSelectable, nn.Module):
    """The MED encoder (no pooler unless ``add_pooling_layer``).

    Forward: ``input_ids`` ``(B, L)`` int64, ``attention_mask`` ``(B, L)`` 0/1,
    ``encoder_hidden_states`` ``(B, N, encoder_width)`` image embeddings (or a list of two for
    the NLVR twin), ``mode`` ``'text'`` or ``'multimodal'``, ``is_decoder`` for causal masking.
    Returns ``last_hidden_state`` ``(B, L, hidden)`` in a transformers ``ModelOutput``.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        ops.load_backends()  # no first-use imports inside code traced by torch.compile
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    @property
    def base_model(self) -> "BertModel":
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Grow or shrink the vocabulary; new rows initialised like BERT's."""
        old = self.embeddings.word_embeddings
        if new_num_tokens == old.num_embeddings:
            return old
        new = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=old.padding_idx).to(old.weight)
        init_bert_weights(new, self.config.initializer_range)
        n = min(new_num_tokens, old.num_embeddings)
        new.weight.data[:n] = old.weight.data[:n]
        self.embeddings.word_embeddings = new
        self.config.vocab_size = new_num_tokens
        return new

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in backward (dropout masks are replayed exactly)."""
        self.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = False

    def precompute_cross_kv(self, encoder_hidden_states: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """Every layer's cross-attention keys and values of ``encoder_hidden_states``
        ``(B, N, encoder_width)``: a list of ``(k, v)``, each ``(B, H, N, D)``, to pass as
        ``encoder_kv`` (they depend on the image tokens only, so a generation computes them once)."""
        if not self.config.add_cross_attention:
            raise ValueError("this BERT was built without cross-attention (config.add_cross_attention=False)")
        with self.backend_context():
            return [layer.crossattention.self.project_kv(encoder_hidden_states) for layer in self.encoder.layer]

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        head_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        encoder_embeds: Optional[Tensor] = None,
        encoder_hidden_states: Optional[ImageStates] = None,
        encoder_attention_mask: Optional[Any] = None,
        past_key_values: Optional[PastKeyValues] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        is_decoder: bool = False,
        mode: str = "multimodal",
        encoder_kv: Optional[EncoderKV] = None,
    ):
        """``encoder_kv``: per layer precomputed cross-attention keys/values (see
        :meth:`precompute_cross_kv`), used instead of ``encoder_hidden_states``; the text batch may
        be ``g`` times the image batch (``g`` consecutive rows per image, e.g. beams).
        ``past_key_values``: ``(k, v)`` tuples per layer (the original's format, returned when
        ``use_cache``) or a :class:`~blip_fast.models.kv_cache.DecoderKVCache` updated in place."""
        if mode not in ("text", "multimodal"):
            raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
        if head_mask is not None:
            raise NotImplementedError("head_mask is not supported by blip_fast (BLIP never uses it)")
        output_attentions = bool(output_attentions)
        output_hidden_states = bool(output_hidden_states)
        return_dict = True if return_dict is None else return_dict
        use_cache = (self.config.use_cache if use_cache is None else use_cache) if is_decoder else False

        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        if input_ids is not None:
            batch_size, seq_length = input_ids.shape
            device = input_ids.device
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
        elif inputs_embeds is not None:
            batch_size, seq_length = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        elif encoder_embeds is not None:
            batch_size, seq_length = encoder_embeds.shape[:2]
            device = encoder_embeds.device
        else:
            raise ValueError("pass input_ids, inputs_embeds or encoder_embeds")

        cache = past_key_values if isinstance(past_key_values, DecoderKVCache) else None
        if cache is not None:
            if not is_decoder:
                raise ValueError("a DecoderKVCache is for the causal decoder (is_decoder=True)")
            if cache.batch_size != batch_size:
                raise ValueError(f"the cache holds {cache.batch_size} rows but the input has {batch_size}")
            past_len = cache.length
            use_cache = True
        else:
            past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            # a cache attends over its own positions: no all-ones mask to build
            key_padding_mask = None if cache is not None else torch.ones(
                (batch_size, seq_length + past_len), dtype=torch.bool, device=device)
        else:
            key_padding_mask = _keep_mask(attention_mask, "attention_mask")
            if key_padding_mask.shape != (batch_size, seq_length + past_len):
                raise ValueError(f"attention_mask has shape {tuple(key_padding_mask.shape)}, expected "
                                 f"{(batch_size, seq_length + past_len)} (batch, past + current length)")

        if encoder_kv is not None and (mode != "multimodal" or isinstance(encoder_hidden_states, (list, tuple))):
            raise ValueError("encoder_kv is for mode='multimodal' with a single image batch")
        encoder_keep = None
        if (encoder_hidden_states is not None or encoder_kv is not None) and mode == "multimodal":
            if isinstance(encoder_hidden_states, (list, tuple)):
                masks = encoder_attention_mask if encoder_attention_mask is not None else [None] * len(encoder_hidden_states)
                encoder_keep = [_keep_mask(m, "encoder_attention_mask") for m in masks]
            else:
                encoder_keep = _keep_mask(encoder_attention_mask, "encoder_attention_mask")

        with self.backend_context():
            if cache is not None:
                cache.begin(seq_length)
                if position_ids is None:
                    position_ids = cache.position_ids(seq_length)
            if encoder_embeds is None:
                embedding_output = self.embeddings(input_ids=input_ids, position_ids=position_ids,
                                                   inputs_embeds=inputs_embeds, past_key_values_length=past_len)
            else:
                embedding_output = encoder_embeds
            encoder_outputs = self.encoder(
                embedding_output, attention_mask=key_padding_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_keep, past_key_values=past_key_values, use_cache=use_cache,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=True, mode=mode, causal=is_decoder, encoder_kv=encoder_kv)
            if cache is not None:
                cache.end(seq_length)
            sequence_output = encoder_outputs.last_hidden_state
            pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        if not return_dict:
            return (sequence_output, pooled_output) + tuple(
                v for v in (encoder_outputs.past_key_values, encoder_outputs.hidden_states,
                            encoder_outputs.attentions, encoder_outputs.cross_attentions) if v is not None)
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output, pooler_output=pooled_output,
            past_key_values=encoder_outputs.past_key_values, hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions, cross_attentions=encoder_outputs.cross_attentions)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.hidden_act = config.hidden_act
        self.transform_act_fn = _activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.hidden_act == "gelu":
            hidden_states = ops.linear_gelu(hidden_states, self.dense.weight, self.dense.bias)
        else:
            hidden_states = self.transform_act_fn(self.dense(hidden_states))
        return self.LayerNorm(hidden_states)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one tensor under two names, as in the original

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output: Tensor) -> Tensor:
        return self.predictions(sequence_output)


class BertLMHeadModel(BackendSelectable, nn.Module):
    """The image-grounded text decoder: :class:`BertModel` (causal) + tied LM head.

    With ``labels`` ``(B, L)`` (``-100`` = ignored) the loss is the label-smoothed (0.1)
    cross-entropy of each position's prediction of the next token, computed by
    ``ops.linear_cross_entropy`` (fast backends never build the ``B x L x vocab`` float32 logits).
    ``reduction='none'`` returns the per-sequence sum ``(B,)``. When ``labels`` are given, the
    logits are only materialised if ``output_logits=True``; ``logits_to_keep=n`` computes them for
    the last ``n`` positions only (generation needs the last one). ``encoder_kv`` and a
    :class:`~blip_fast.models.kv_cache.DecoderKVCache` as ``past_key_values``: see
    :meth:`BertModel.forward`.
    """

    label_smoothing = 0.1

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.cls.apply(lambda m: init_bert_weights(m, config.initializer_range))
        self.tie_weights()

    def tie_weights(self) -> None:
        """The LM head's output weight is the input word embedding (one tensor)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @property
    def base_model(self) -> BertModel:
        return self.bert

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def resize_token_embeddings(self, new_num_tokens: int) -> None:
        self.bert.resize_token_embeddings(new_num_tokens)
        pred = self.cls.predictions
        old_bias = pred.bias.data
        pred.bias = nn.Parameter(old_bias.new_zeros(new_num_tokens))
        n = min(new_num_tokens, old_bias.numel())
        pred.bias.data[:n] = old_bias[:n]
        pred.decoder = nn.Linear(self.config.hidden_size, new_num_tokens, bias=False).to(old_bias.device)
        pred.decoder.bias = pred.bias
        self.tie_weights()

    def gradient_checkpointing_enable(self) -> None:
        self.bert.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.bert.gradient_checkpointing_disable()

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        head_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        encoder_hidden_states: Optional[ImageStates] = None,
        encoder_attention_mask: Optional[Any] = None,
        labels: Optional[Tensor] = None,
        past_key_values: Optional[PastKeyValues] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        return_logits: bool = False,
        is_decoder: bool = True,
        reduction: str = "mean",
        mode: str = "multimodal",
        output_logits: bool = False,
        encoder_kv: Optional[EncoderKV] = None,
        logits_to_keep: int = 0,
    ):
        if labels is not None and not isinstance(past_key_values, DecoderKVCache):
            use_cache = False
        with self.backend_context():
            outputs = self.bert(
                input_ids, attention_mask=attention_mask, position_ids=position_ids, head_mask=head_mask,
                inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values, use_cache=use_cache,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
                is_decoder=is_decoder, mode=mode, encoder_kv=encoder_kv)
            sequence_output = outputs.last_hidden_state
            pred = self.cls.predictions
            if return_logits:
                return pred(sequence_output)[:, :-1, :].contiguous()
            lm_loss = None
            logits = None
            if labels is not None:
                hidden = pred.transform(sequence_output[:, :-1, :])
                lm_loss = ops.linear_cross_entropy(hidden, pred.decoder.weight, pred.bias, labels[:, 1:],
                                                   label_smoothing=self.label_smoothing, reduction=reduction)
                if reduction == "none":
                    lm_loss = lm_loss.view(labels.shape[0], -1).sum(1)
            if labels is None or output_logits:
                logits = pred(sequence_output[:, -logits_to_keep:] if logits_to_keep else sequence_output)
        if return_dict is False:
            return tuple(v for v in (lm_loss, logits, outputs.past_key_values) if v is not None)
        return CausalLMOutputWithCrossAttentions(
            loss=lm_loss, logits=logits, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past: Optional[Any] = None,
                                      attention_mask: Optional[Tensor] = None, **model_kwargs: Any) -> Dict[str, Any]:
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        if past is not None:
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past,
            "encoder_hidden_states": model_kwargs.get("encoder_hidden_states"),
            "encoder_attention_mask": model_kwargs.get("encoder_attention_mask"), "is_decoder": True,
        }

    @staticmethod
    def _reorder_cache(past: Sequence[Tuple[Tensor, ...]], beam_idx: Tensor) -> Tuple[Tuple[Tensor, ...], ...]:
        return tuple(tuple(state.index_select(0, beam_idx) for state in layer_past) for layer_past in past)
