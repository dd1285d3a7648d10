"""bert-base-uncased-layout BERT weights into BLIP's text encoder and decoder.

The original BLIP starts its text towers from ``bert-base-uncased``:
``BertModel.from_pretrained('bert-base-uncased', config=med_config, add_pooling_layer=False)`` for
the encoder and ``BertLMHeadModel.from_pretrained(...)`` for the decoder, then
``resize_token_embeddings(30524)`` for ``[DEC]`` / ``[ENC]``. :func:`load_bert_weights` does the
same from a transformers ``BertModel`` / ``BertForMaskedLM`` / ``BertForPreTraining`` /
``BertLMHeadModel`` state dict (or a file, folder or hub name holding one):

=================================================  =========================================
source key                                         blip_fast
=================================================  =========================================
``[bert.]embeddings.{word,position}_embeddings``   ``embeddings.*`` (encoder) / ``bert.embeddings.*``
``[bert.]encoder.layer.{i}.attention.*``           same, self-attention
``[bert.]encoder.layer.{i}.{intermediate,output}``  same
``cls.predictions.*`` (MLM head)                   decoder's ``cls.predictions.*``
``*.LayerNorm.gamma`` / ``.beta`` (old files)      ``*.LayerNorm.weight`` / ``.bias``
``[bert.]embeddings.token_type_embeddings``        dropped (BLIP's BERT has none; the original
                                                   drops it too), or folded into the position
                                                   embeddings (``fold_token_type_embeddings``)
``[bert.]pooler.*``                                 kept if the module has a pooler, else dropped
``cls.seq_relationship.*`` (NSP head)              dropped
=================================================  =========================================

Newly initialised, as the original's ``from_pretrained`` did (BERT init: normal(0,
``initializer_range``) weights, zero biases, unit LayerNorm): every ``crossattention`` weight, the
decoder's LM head when the source has none, and the vocabulary rows the source lacks (the
``[DEC]`` / ``[ENC]`` rows 30522 and 30523: normal(0, ``initializer_range``) embeddings, zero LM
bias, as ``resize_token_embeddings`` did in transformers 4.15, which the original ran; newer
transformers start new rows at the mean of the old ones). The report names each of them.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, LoadReport, apply_state_dict
from ..models.med import BertLMHeadModel, BertLMPredictionHead, BertModel, init_bert_weights
from ..models.pretrained import tied_weight_groups
from ..weight_sources import WeightsSource, read_state_dict

logger = logging.getLogger("blip_fast.interop")
Tensor = torch.Tensor

#: Tensors whose first dimension is the vocabulary (relative to the BertModel / the LM head model).
_VOCAB_KEYS = ("embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.weight",
               "cls.predictions.decoder.bias")


def _normalise_names(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = value
    return out


def _split_bert_and_head(state: Dict[str, Tensor], report: LoadReport):
    """``(bert_part, mlm_head_part)`` with the prefixes ``bert.`` / ``cls.`` removed."""
    if not any(k.startswith("bert.") for k in state):
        if not any(k.startswith("embeddings.word_embeddings") for k in state):
            raise CheckpointError(f"not a BERT state dict: no 'bert.embeddings...' or 'embeddings...' keys "
                                  f"(keys start with {sorted(state)[:5]})")
        return state, {}
    bert, head = {}, {}
    for key, value in state.items():
        if key.startswith("bert."):
            bert[key[len("bert."):]] = value
        elif key.startswith("cls.predictions."):
            head[key[len("cls."):]] = value
        else:
            report.dropped[key] = "not part of BERT or its MLM head (e.g. the NSP or a task head)"
    return bert, head


def bert_state_dict_for(module: nn.Module, state_dict: Dict[str, Tensor], report: LoadReport,
                        fold_token_type_embeddings: bool = False) -> Dict[str, Tensor]:
    """``state_dict`` (bert-base-uncased layout) in the names of ``module`` (a blip_fast
    :class:`BertModel` or :class:`BertLMHeadModel`), with the vocabulary fitted to the module's."""
    if not isinstance(module, (BertModel, BertLMHeadModel)):
        raise TypeError(f"BERT weights load into a blip_fast BertModel or BertLMHeadModel, got {type(module).__name__}")
    bert, head = _split_bert_and_head(_normalise_names(state_dict), report)
    is_lm = isinstance(module, BertLMHeadModel)
    base: BertModel = module.bert if is_lm else module
    for key in [k for k in bert if k in ("embeddings.position_ids", "embeddings.token_type_ids")]:
        del bert[key]  # constant buffers; the module keeps its own
    token_type = bert.pop("embeddings.token_type_embeddings.weight", None)
    if token_type is not None:
        key = "bert.embeddings.token_type_embeddings.weight" if is_lm else "embeddings.token_type_embeddings.weight"
        if fold_token_type_embeddings and "embeddings.position_embeddings.weight" in bert:
            bert["embeddings.position_embeddings.weight"] = bert["embeddings.position_embeddings.weight"] + token_type[0]
            report.dropped[key] = "folded into the position embeddings (token type 0, as BERT with no token_type_ids)"
        else:
            report.dropped[key] = ("BLIP's BERT has no token-type embeddings (the original drops them too; "
                                   "fold_token_type_embeddings=True adds row 0 to the position embeddings)")
    if base.pooler is None:
        for key in [k for k in bert if k.startswith("pooler.")]:
            del bert[key]
            report.dropped[key] = "pooler (the module has none: add_pooling_layer=False)"
    if is_lm:
        state = {"bert." + k: v for k, v in bert.items()}
        state.update({"cls." + k: v for k, v in head.items()})
    else:
        state = bert
        for key in head:
            report.dropped["cls." + key] = "MLM head (a text encoder has none)"
    _fit_vocabulary(module, state, report)
    return state


@torch.no_grad()
def _fit_vocabulary(module: nn.Module, state: Dict[str, Tensor], report: LoadReport) -> None:
    """Copy the source's vocabulary rows into tensors of the module's size; the extra rows are
    initialised as ``resize_token_embeddings`` does (normal embeddings, zero LM bias)."""
    model_state = module.state_dict()
    init_range = module.config.initializer_range
    for key, value in list(state.items()):
        if not key.endswith(_VOCAB_KEYS) or key not in model_state:
            continue
        target = model_state[key]
        if value.shape == target.shape:
            continue
        if value.shape[1:] != target.shape[1:]:
            continue  # a width mismatch: reported by the strict shape check
        new = torch.empty_like(target)
        if key.endswith("weight"):
            new.normal_(0.0, init_range)
        else:
            new.zero_()
        n = min(value.shape[0], target.shape[0])
        new[:n] = value[:n].to(new)
        state[key] = new
        report.resized[key] = (tuple(value.shape), tuple(target.shape))


@torch.no_grad()
def _initialise(module: nn.Module, keys: set) -> None:
    """BERT-initialise every leaf module whose parameters are all in ``keys``."""
    for name, sub in module.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in sub.named_parameters(recurse=False)]
        if params and all(p in keys for p in params):
            init_bert_weights(sub, module.config.initializer_range)
            if isinstance(sub, BertLMPredictionHead):
                sub.bias.zero_()  # the LM bias starts at zero


def load_bert_weights(module: nn.Module, source: WeightsSource, *, fold_token_type_embeddings: bool = False,
                      strict: bool = True, **hub_kwargs: Any) -> LoadReport:
    """Load bert-base-uncased-layout weights into a blip_fast ``BertModel`` (text encoder) or
    ``BertLMHeadModel`` (decoder) as the original BLIP did; returns a :class:`LoadReport`.

    ``source``: a state dict / transformers model, a file, a folder or a hub id such as
    ``'bert-base-uncased'`` (``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``).
    What has no counterpart in the source (cross-attention, new vocabulary rows, an absent LM head)
    is freshly BERT-initialised and listed in ``report.initialized_keys`` / ``report.resized``.
    With ``strict`` (default) any other missing key, any unused source key not dropped on purpose,
    and any shape mismatch (width, depth, ``max_position_embeddings``) raise
    :class:`~blip_fast.CheckpointError`.
    """
    report = LoadReport()
    state = bert_state_dict_for(module, read_state_dict(source, **hub_kwargs), report, fold_token_type_embeddings)
    ties = tied_weight_groups(module.state_dict())
    for alias, key in ties.items():  # one tensor in the module: one value (the source may hold one name)
        if key in state:
            state[alias] = state[key]
        elif alias in state:
            state[key] = state[alias]
    buffers = {name for name, _ in module.named_buffers()}
    apply_state_dict(module, state, report, drop_mismatched=not strict)
    report.missing_keys = [k for k in report.missing_keys if k not in buffers]
    expected_new = [k for k in report.missing_keys
                    if ".crossattention." in k or (isinstance(module, BertLMHeadModel) and k.startswith("cls."))]
    _initialise(module, set(expected_new))
    report.initialized_keys = expected_new
    unexplained = [k for k in report.missing_keys if k not in expected_new]
    if strict and (unexplained or report.unexpected_keys):
        raise CheckpointError(f"the BERT weights do not fit {type(module).__name__} (another size or model?): "
                              f"missing {unexplained[:10]}, unexpected {report.unexpected_keys[:10]}\n{report}")
    logger.info("loaded BERT weights into %s\n%s", type(module).__name__, report)
    return report
