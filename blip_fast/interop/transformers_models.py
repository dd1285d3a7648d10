"""Whole models between transformers' BLIP classes and blip_fast: configs, weights, both ways.

=================================  ============================  ================================
transformers class                 blip_fast class               modules (original names)
=================================  ============================  ================================
``BlipForImageTextRetrieval``      ``BLIP_ITM``                  visual_encoder, text_encoder,
                                                                 vision_proj, text_proj, itm_head
``BlipForConditionalGeneration``   ``BLIP_Decoder``              visual_encoder, text_decoder
``BlipForQuestionAnswering``       ``BLIP_VQA``                  visual_encoder, text_encoder,
                                                                 text_decoder
``BlipModel``                      ``VisionTextDualEncoder``     vision_model, text_model,
                                                                 visual_projection,
                                                                 text_projection, logit_scale
=================================  ============================  ================================

Key mappings: :mod:`.transformers_blip` (the first three) and :mod:`.transformers_blip_model`
(``BlipModel``). :func:`from_transformers` builds the blip_fast model from a transformers model,
folder or hub name (its ``BlipConfig`` gives the sizes) and loads the weights;
:func:`load_transformers_blip` loads transformers-layout weights into an existing blip_fast model;
:func:`to_transformers` / :func:`save_transformers` export a blip_fast model (any BLIP model holding
the modules of the target class, e.g. ``BLIP_Pretrain`` to ``BlipForImageTextRetrieval`` or
``BlipForConditionalGeneration``).

The ViT LayerNorm eps: transformers' BLIP configs say 1e-5 where the original BLIP ViT uses 1e-6;
blip_fast's ViT always uses the original's 1e-6, and exports write 1e-6.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import models as blip_models
from ..checkpoint import CheckpointError, LoadReport, apply_state_dict
from ..models.dual_encoder import VisionTextDualEncoder
from ..models.vit import VIT_SIZES, VisionTransformer, interpolate_pos_embed
from ..weight_sources import WeightsSource, read_state_dict, resolve_folder
from .transformers_blip import from_transformers_blip, to_transformers_blip
from .transformers_blip_model import from_transformers_blip_model, to_transformers_blip_model

logger = logging.getLogger("blip_fast.interop")
Tensor = torch.Tensor

#: transformers class -> blip_fast class name.
TRANSFORMERS_TO_BLIP_FAST = {
    "BlipForImageTextRetrieval": "BLIP_ITM",
    "BlipForConditionalGeneration": "BLIP_Decoder",
    "BlipForQuestionAnswering": "BLIP_VQA",
    "BlipModel": "VisionTextDualEncoder",
}
#: The top-level modules (original names) each transformers class holds.
TRANSFORMERS_PARTS = {
    "BlipForImageTextRetrieval": ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"),
    "BlipForConditionalGeneration": ("visual_encoder", "text_decoder"),
    "BlipForQuestionAnswering": ("visual_encoder", "text_encoder", "text_decoder"),
    "BlipModel": ("vision_model", "text_model", "visual_projection", "text_projection", "logit_scale"),
}
#: ``VisionTextDualEncoder`` arguments that reproduce ``BlipModel``.
BLIP_MODEL_DUAL_ENCODER = dict(vision_pooler="cls_post_norm", text_pooler="pooler", projection_bias=False)
_ORIGINAL_VIT_EPS = 1e-6


# -- configs ---------------------------------------------------------------------------------------
def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def blip_kwargs_from_transformers_config(config: Any) -> Dict[str, Any]:
    """``vit``, ``image_size``, ``med_config`` (and the head widths) of a transformers ``BlipConfig``."""
    vision, text = _get(config, "vision_config"), _get(config, "text_config")
    if vision is None or text is None:
        raise CheckpointError("not a BLIP config: no vision_config / text_config")
    if _get(vision, "hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"vision hidden_act {_get(vision, 'hidden_act')!r}: BLIP's ViT uses erf GELU ('gelu')")
    eps = _get(vision, "layer_norm_eps", _ORIGINAL_VIT_EPS)
    if eps != _ORIGINAL_VIT_EPS:
        logger.info("the transformers config's ViT layer_norm_eps is %g; blip_fast uses the original BLIP's 1e-6", eps)
    width, depth, heads = _get(vision, "hidden_size"), _get(vision, "num_hidden_layers"), _get(vision, "num_attention_heads")
    vit: Union[str, Dict[str, Any]] = {"embed_dim": width, "depth": depth, "num_heads": heads,
                                       "mlp_ratio": _get(vision, "intermediate_size") / width,
                                       "patch_size": _get(vision, "patch_size")}
    for name, size in VIT_SIZES.items():
        if dict(size, mlp_ratio=4.0, patch_size=16) == vit and name == "base":
            vit = name  # 'large' forces drop path 0.1 in training, so large stays a dict
    image_size = _get(vision, "image_size")
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise CheckpointError(f"BLIP's ViT takes square images, the config says {image_size}")
        image_size = image_size[0]
    med = {"architectures": ["BertModel"], "model_type": "bert", "type_vocab_size": 2, "add_cross_attention": True}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                 "initializer_range", "layer_norm_eps", "pad_token_id"):
        med[name] = _get(text, name)
    med["encoder_width"] = _get(text, "encoder_hidden_size", width)
    return {"vit": vit, "image_size": int(image_size), "med_config": med}


def _visual(model: nn.Module) -> VisionTransformer:
    for name in ("visual_encoder", "vision_model"):
        if isinstance(getattr(model, name, None), VisionTransformer):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__} has no BLIP image encoder (visual_encoder / vision_model)")


def _text_config(model: nn.Module) -> Any:
    for name in ("text_encoder", "text_model", "text_decoder"):
        module = getattr(model, name, None)
        if module is not None and hasattr(module, "config"):
            return module.config
    raise TypeError(f"{type(model).__name__} has no BLIP text tower")


def transformers_config_for(model: nn.Module, architecture: str) -> Any:
    """The transformers ``BlipConfig`` describing ``model`` as ``architecture``."""
    from transformers import BlipConfig
    visual, text = _visual(model), _text_config(model)
    block = visual.blocks[0]
    vision_config = dict(hidden_size=visual.embed_dim, intermediate_size=block.mlp.fc1.out_features,
                         num_hidden_layers=len(visual.blocks), num_attention_heads=block.attn.num_heads,
                         image_size=visual.patch_embed.img_size[0], patch_size=visual.patch_embed.patch_size[0],
                         layer_norm_eps=visual.norm.eps, hidden_act="gelu", attention_dropout=block.attn.attn_drop.p)
    text_config = dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                       encoder_hidden_size=getattr(text, "encoder_width", visual.embed_dim),
                       intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                       num_attention_heads=text.num_attention_heads,
                       max_position_embeddings=text.max_position_embeddings, hidden_act=text.hidden_act,
                       layer_norm_eps=text.layer_norm_eps, hidden_dropout_prob=text.hidden_dropout_prob,
                       attention_probs_dropout_prob=text.attention_probs_dropout_prob,
                       initializer_range=text.initializer_range, pad_token_id=text.pad_token_id,
                       label_smoothing=0.1)  # the original decoder's LM loss
    extra: Dict[str, Any] = {}
    if architecture == "BlipModel":
        extra = dict(projection_dim=model.visual_projection.out_features,
                     logit_scale_init_value=float(model.logit_scale.detach()))
    elif hasattr(model, "vision_proj"):
        extra = dict(image_text_hidden_size=model.vision_proj.out_features)
    config = BlipConfig(vision_config=vision_config, text_config=text_config, **extra)
    config.architectures = [architecture]
    return config


# -- transformers -> blip_fast ---------------------------------------------------------------------
def _blip_fast_class(architecture: str) -> type:
    if architecture not in TRANSFORMERS_TO_BLIP_FAST:
        raise CheckpointError(f"transformers class {architecture!r} has no blip_fast counterpart (known: "
                              f"{sorted(TRANSFORMERS_TO_BLIP_FAST)})")
    name = TRANSFORMERS_TO_BLIP_FAST[architecture]
    cls = getattr(blip_models, name, None)
    if cls is None:
        raise CheckpointError(f"{architecture} maps to blip_fast's {name}, which this version of blip_fast lacks")
    return cls


def _default_kwargs(architecture: str, config: Any) -> Dict[str, Any]:
    kwargs = blip_kwargs_from_transformers_config(config)
    if architecture == "BlipForImageTextRetrieval":
        kwargs["embed_dim"] = _get(config, "image_text_hidden_size")
    elif architecture == "BlipModel":
        kwargs.update(BLIP_MODEL_DUAL_ENCODER, text_cross_attention=True, projection_dim=_get(config, "projection_dim"),
                      logit_scale_init_value=_get(config, "logit_scale_init_value"))
    return kwargs


def load_transformers_blip(model: nn.Module, source: WeightsSource, strict: bool = True,
                           **hub_kwargs: Any) -> LoadReport:
    """Load transformers-layout BLIP weights into a blip_fast ``model``; returns a :class:`LoadReport`.

    ``source``: a transformers BLIP model, its state dict, a file, a folder or a hub name. A
    ``BlipModel`` layout (``text_model.*``) loads into a :class:`VisionTransformer`-based
    :class:`VisionTextDualEncoder`, the other layouts into the BLIP models holding their modules.
    The position embedding is resized to the model's image size. With ``strict`` (default),
    missing or unexpected keys (other than ones the model does not have by design: the dual
    encoder's cross-attention or pooler when it was built without them) raise.
    """
    state = read_state_dict(source, **hub_kwargs)
    report = LoadReport()
    is_blip_model_layout = any(k.startswith("text_model.") for k in state)
    if isinstance(model, VisionTextDualEncoder) != is_blip_model_layout:
        raise CheckpointError(
            "transformers' BlipModel weights (text_model.*) load into blip_fast.models.VisionTextDualEncoder, and "
            "the other BLIP layouts (text_encoder.* / text_decoder.*) into BLIP_ITM / BLIP_Decoder / ...: got "
            f"{'BlipModel' if is_blip_model_layout else 'a BLIP task model'}'s weights for a {type(model).__name__}")
    mapped = from_transformers_blip_model(state) if is_blip_model_layout else from_transformers_blip(state)
    own = model.state_dict()
    for key in [k for k in mapped if k.endswith("embeddings.position_ids")]:
        if key in own:
            mapped[key] = own[key]  # a constant arange at the model's length
        else:
            del mapped[key]
    if isinstance(model, VisionTextDualEncoder):
        for key in [k for k in mapped if k not in own and (".crossattention." in k or ".pooler." in k)]:
            del mapped[key]
            report.dropped[key] = "not in this dual encoder (built without cross-attention / BERT pooler)"
    for prefix in ("visual_encoder", "vision_model"):
        key = f"{prefix}.pos_embed"
        if key in mapped and isinstance(getattr(model, prefix, None), VisionTransformer):
            before = mapped[key].shape[1]
            mapped[key] = interpolate_pos_embed(mapped[key], getattr(model, prefix))
            if mapped[key].shape[1] != before:
                report.interpolated[key] = (before, mapped[key].shape[1])
    apply_state_dict(model, mapped, report, drop_mismatched=not strict)
    if strict and (report.missing_keys or report.unexpected_keys):
        raise CheckpointError(f"the transformers BLIP weights do not fit {type(model).__name__} (pass strict=False "
                              f"to load what fits, e.g. into BLIP_Pretrain):\n{report}")
    logger.info("loaded transformers BLIP weights into %s\n%s", type(model).__name__, report)
    return report


def from_transformers(source: Union[str, os.PathLike, nn.Module], model_class: Optional[type] = None,
                      strict: bool = True, return_report: bool = False, revision: Optional[str] = None,
                      cache_dir: Optional[str] = None, local_files_only: bool = False, **kwargs: Any) -> Union[nn.Module, Tuple[nn.Module, LoadReport]]:
    """A blip_fast model from a transformers BLIP model, a folder saved by transformers, or a hub
    name (e.g. ``'Salesforce/blip-itm-base-coco'``).

    The blip_fast class follows the transformers class (table above) unless ``model_class`` is
    given (``strict=False`` to load what fits into a model holding more, e.g. ``BLIP_Pretrain``);
    sizes come from the ``BlipConfig``; ``kwargs`` override constructor arguments (e.g.
    ``image_size``: the position embedding is resized). Returns the model in eval mode (and the
    :class:`LoadReport` with ``return_report``).
    """
    from transformers import BlipConfig, PreTrainedModel
    if isinstance(source, PreTrainedModel):
        config, architecture, state = source.config, type(source).__name__, source.state_dict()
    else:
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        folder = resolve_folder(source, **hub)
        config = BlipConfig.from_pretrained(folder)
        architectures = getattr(config, "architectures", None) or []
        if not architectures:
            raise CheckpointError(f"{folder}/config.json names no architecture; pass model_class=...")
        architecture, state = architectures[0], read_state_dict(source, **hub)
    cls = model_class or _blip_fast_class(architecture)
    model = cls(**dict(_default_kwargs(architecture, config), **kwargs))
    report = load_transformers_blip(model, state, strict=strict)
    model.eval()
    return (model, report) if return_report else model


# -- blip_fast -> transformers ---------------------------------------------------------------------
def default_architecture(model: nn.Module) -> str:
    """The transformers class a blip_fast model exports to by default."""
    if isinstance(model, VisionTextDualEncoder):
        return "BlipModel"
    names = {name for name, _ in model.named_children()}
    if "itm_head" in names:
        return "BlipForImageTextRetrieval"
    if {"text_encoder", "text_decoder"} <= names:
        return "BlipForQuestionAnswering"
    if "text_decoder" in names:
        return "BlipForConditionalGeneration"
    raise TypeError(f"{type(model).__name__} has no transformers BLIP counterpart")


def to_transformers(model: nn.Module, architecture: Optional[str] = None,
                    return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, LoadReport]]:
    """A transformers BLIP model holding ``model``'s weights (eval mode).

    ``architecture``: a key of :data:`TRANSFORMERS_PARTS` (default :func:`default_architecture`).
    ``model``'s modules outside the target class (momentum encoders, queues, ...) are left out and
    listed in ``report.dropped``. A :class:`VisionTextDualEncoder` exports to ``BlipModel`` only when
    it pools as ``BlipModel`` does (:data:`BLIP_MODEL_DUAL_ENCODER`); cross-attention it lacks is
    left at transformers' initialisation (BlipModel never uses it) and listed in
    ``report.initialized_keys``.
    """
    import transformers
    architecture = architecture or default_architecture(model)
    if architecture not in TRANSFORMERS_PARTS:
        raise ValueError(f"architecture must be one of {sorted(TRANSFORMERS_PARTS)}, got {architecture!r}")
    state = model.state_dict()
    report = LoadReport()
    if architecture == "BlipModel":
        if not isinstance(model, VisionTextDualEncoder):
            raise TypeError("only a VisionTextDualEncoder exports to BlipModel")
        built = {k: getattr(model, k) for k in BLIP_MODEL_DUAL_ENCODER}
        if built != BLIP_MODEL_DUAL_ENCODER:
            raise ValueError(f"BlipModel pools and projects as {BLIP_MODEL_DUAL_ENCODER}; this dual encoder was built "
                             f"with {built}, which BlipModel cannot express")
        mapped = to_transformers_blip_model(state)
    else:
        parts = TRANSFORMERS_PARTS[architecture]
        absent = [p for p in parts if not any(k.startswith(p + ".") for k in state)]
        if absent:
            raise TypeError(f"{type(model).__name__} lacks {absent}, which {architecture} needs")
        for key in state:
            if key.split(".")[0] not in parts:
                report.dropped[key] = f"not part of {architecture}"
        mapped = to_transformers_blip({k: v for k, v in state.items() if k.split(".")[0] in parts})
    config = transformers_config_for(model, architecture)
    hf_model = getattr(transformers, architecture)(config)
    hf_state = hf_model.state_dict()
    for key in [k for k in mapped if k not in hf_state]:
        if not key.endswith("position_ids"):
            report.unexpected_keys.append(key)
        del mapped[key]
    missing = [k for k in hf_state if k not in mapped]
    report.initialized_keys = [k for k in missing if architecture == "BlipModel" and ".crossattention." in k]
    report.missing_keys = [k for k in missing if k not in report.initialized_keys]
    if report.missing_keys or report.unexpected_keys:
        raise CheckpointError(f"could not export {type(model).__name__} as {architecture}:\n{report}")
    mismatched = {k: (tuple(v.shape), tuple(hf_state[k].shape)) for k, v in mapped.items()
                  if tuple(v.shape) != tuple(hf_state[k].shape)}
    if mismatched:
        raise CheckpointError(f"shape mismatch exporting to {architecture}: {mismatched}")
    hf_model.load_state_dict(mapped, strict=False)
    hf_model.eval()
    return (hf_model, report) if return_report else hf_model


def save_transformers(model: nn.Module, save_directory: Union[str, os.PathLike],
                      architecture: Optional[str] = None) -> str:
    """Write ``model`` as a transformers BLIP folder (``config.json`` + ``model.safetensors``) that
    ``transformers.<architecture>.from_pretrained(save_directory)`` loads; returns the folder."""
    hf_model = to_transformers(model, architecture)
    hf_model.save_pretrained(os.fspath(save_directory))
    return os.fspath(save_directory)
