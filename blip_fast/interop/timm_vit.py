"""timm / DeiT ViT weights into BLIP's image encoder (:class:`~blip_fast.models.VisionTransformer`).

BLIP's ViT is timm 0.4's ``VisionTransformer`` without the classifier, so timm state dicts
(``timm.create_model('vit_base_patch16_224')``, ``'deit_base_patch16_224'``, the DeiT release
``deit_base_patch16_224-b5f2ef4d.pth`` that the original BLIP_Pretrain starts from, ``timm/...``
hub repositories) load name for name:

==========================================  =============================================
timm key                                    blip_fast
==========================================  =============================================
``cls_token`` ``(1, 1, D)``                 same
``pos_embed`` ``(1, 1 + g*g, D)``           same; bicubic-resized to the model's grid
``patch_embed.proj.{weight,bias}``          same
``blocks.{i}.norm1/norm2.{weight,bias}``    same
``blocks.{i}.attn.qkv.{weight,bias}``       same
``blocks.{i}.attn.proj.{weight,bias}``      same
``blocks.{i}.mlp.fc1/fc2.{weight,bias}``    same
``norm.{weight,bias}``                      same
``head.*``, ``head_dist.*``, ``pre_logits`` dropped (classifier), reported
``dist_token`` (DeiT distilled)             dropped with its ``pos_embed`` row 1, reported
==========================================  =============================================

Architectures BLIP's ViT cannot represent (layer scale ``ls1/ls2``, register tokens, ``norm_pre``,
q/k norm, attention pooling, ``fc_norm`` instead of ``norm``, no class token) raise a
:class:`~blip_fast.CheckpointError` naming the feature. JAX ``.npz`` files (Google's ViT / AugReg
releases, which the original BLIP uses for ViT-L) go through
:func:`blip_fast.models.vit.load_npz_weights`.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from ..checkpoint import CheckpointError, LoadReport, apply_state_dict, is_url
from ..models.vit import VisionTransformer, interpolate_pos_embed, load_npz_weights
from ..weight_sources import WeightsSource, cached_download, read_state_dict

logger = logging.getLogger("blip_fast.interop")
Tensor = torch.Tensor

#: Checkpoint keys that are not part of the image encoder: the classifier heads.
_HEAD_KEYS = re.compile(r"^(head|head_dist|pre_logits|fc_norm_head)(\.|$)")
#: timm features with no counterpart in BLIP's ViT: (pattern, what it is).
_UNSUPPORTED: List[Tuple[str, str]] = [
    (r"^blocks\.\d+\.ls[12]\.", "layer scale (ls1/ls2)"),
    (r"^reg_token$", "register tokens"),
    (r"^norm_pre\.", "a pre-transformer LayerNorm (norm_pre, CLIP-style)"),
    (r"^blocks\.\d+\.attn\.(q_norm|k_norm|norm)\.", "q/k normalisation in attention"),
    (r"^blocks\.\d+\.mlp\.(norm|fc1_g|fc1_x)\.", "a gated or normalised MLP"),
    (r"^attn_pool\.", "attention pooling (MAP head)"),
    (r"^fc_norm\.", "fc_norm (global-average-pool models have no final norm over the tokens)"),
    (r"^patch_embed\.norm\.", "a normalised patch embedding"),
    (r"^blocks\.\d+\.attn\.[qv]_bias$", "separate q/v biases (BEiT style)"),
]
_TRANSFORMERS_LAYOUT = re.compile(r"(^|\.)embeddings\.patch_embeddings\.|layernorm_before")


def _strip_prefix(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    for prefix in ("module.", "model.", "visual_encoder."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def timm_vit_state_dict(state_dict: Dict[str, Tensor], visual_encoder: VisionTransformer,
                        report: LoadReport) -> Dict[str, Tensor]:
    """A timm / DeiT ViT state dict in blip_fast's names, fitted to ``visual_encoder``.

    Drops classifier heads and DeiT's ``dist_token`` (with its position row), resizes
    ``pos_embed`` to the model's grid, and records all of it in ``report``.
    """
    state = _strip_prefix(dict(state_dict))
    if any(_TRANSFORMERS_LAYOUT.search(k) for k in state):
        raise CheckpointError(
            "these are transformers' ViTModel/DeiTModel weights (embeddings.patch_embeddings..., layernorm_before); "
            "load timm's copy instead (e.g. the hub repository 'timm/deit_base_patch16_224.fb_in1k' or DeiT's "
            "released .pth)")
    for pattern, what in _UNSUPPORTED:
        hits = [k for k in state if re.search(pattern, k)]
        if hits:
            raise CheckpointError(f"this ViT uses {what} ({hits[0]}, ...), which BLIP's ViT does not have: "
                                  f"it is not a plain timm/DeiT ViT and cannot be loaded into the image encoder")
    if "cls_token" not in state or "pos_embed" not in state:
        raise CheckpointError(f"not a timm ViT state dict with a class token: 'cls_token' / 'pos_embed' missing "
                              f"(keys start with {sorted(state)[:5]})")
    for key in [k for k in state if _HEAD_KEYS.match(k)]:
        del state[key]
        report.dropped[key] = "classifier head (not part of the image encoder)"
    pos_embed = state["pos_embed"]
    if "dist_token" in state:
        del state["dist_token"]
        report.dropped["dist_token"] = "DeiT distillation token (BLIP's ViT has only the class token)"
        state["pos_embed"] = pos_embed = torch.cat([pos_embed[:, :1], pos_embed[:, 2:]], dim=1)
        report.dropped["pos_embed[:, 1]"] = "the distillation token's position embedding"
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, 1 + grid*grid, width)")
    before = pos_embed.shape[1]
    state["pos_embed"] = interpolate_pos_embed(pos_embed, visual_encoder)
    if state["pos_embed"].shape[1] != before:
        report.interpolated["pos_embed"] = (before, state["pos_embed"].shape[1])
    return state


def _load_npz(visual_encoder: VisionTransformer, path: str, report: LoadReport) -> LoadReport:
    with np.load(path) as w:
        prefix = "opt/target/" if "opt/target/embedding/kernel" in w else ""
        rows = w[f"{prefix}Transformer/posembed_input/pos_embedding"].shape[-2]
        heads = sorted(k for k in w.files if k.startswith((f"{prefix}head/", f"{prefix}pre_logits/")))
    load_npz_weights(visual_encoder, path)
    if rows != visual_encoder.pos_embed.shape[1]:
        report.interpolated["pos_embed"] = (rows, visual_encoder.pos_embed.shape[1])
    for key in heads:
        report.dropped[key] = "classifier head (not part of the image encoder)"
    return report


def load_timm_vit(visual_encoder: VisionTransformer, source: WeightsSource, strict: bool = True,
                  **hub_kwargs: Any) -> LoadReport:
    """Load timm / DeiT ViT weights into ``visual_encoder``; returns a :class:`LoadReport`.

    ``source``: a timm state dict or model, a ``.pth`` / ``.safetensors`` file (DeiT's release
    holds ``{'model': ...}``), a JAX ``.npz`` (file or URL), a folder, a URL, or a hub id such as
    ``'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'`` (``hub_kwargs`` as
    :func:`~blip_fast.weight_sources.read_state_dict`). ``pos_embed`` is resized bicubically to
    the model's image size, as the original BLIP loader does. With ``strict`` (default) every
    encoder weight must come from the checkpoint and shapes must match (patch size, width, depth);
    the report lists what was dropped or resized.
    """
    report = LoadReport()
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".npz"):
        path = os.fspath(source)
        return _load_npz(visual_encoder, cached_download(path) if is_url(path) else path, report)
    state = timm_vit_state_dict(read_state_dict(source, **hub_kwargs), visual_encoder, report)
    apply_state_dict(visual_encoder, state, report, drop_mismatched=not strict)
    if strict and (report.missing_keys or report.unexpected_keys):
        raise CheckpointError(f"the ViT checkpoint does not fit the image encoder (depth, qkv bias?):\n{report}")
    logger.info("loaded timm ViT weights\n%s", report)
    return report
