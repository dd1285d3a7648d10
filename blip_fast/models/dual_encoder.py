"""A vision-text dual encoder (CLIP-style) on blip_fast towers.

Two towers (BLIP's :class:`VisionTransformer` and the MED :class:`BertModel` run as a unimodal
text encoder), linear projections to a shared space, and a learnable logit scale; the API follows
transformers' ``VisionTextDualEncoderModel`` / ``CLIPModel``: ``get_image_features``,
``get_text_features`` and ``forward(..., return_loss=True)`` returning a
:class:`DualEncoderOutput` with the fields of ``CLIPOutput``. The towers run on the op backends of
:mod:`blip_fast.ops` like every blip_fast model.

Loss: the symmetric InfoNCE of CLIP. Under ``torch.distributed`` the features of every rank are
gathered with their gradient and each rank computes the loss of its own rows against all
columns (open_clip's ``local_loss=True, gather_with_grad=True``); with gradients averaged by DDP
this is exactly the loss (and gradient) of one process holding the global batch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from ..checkpoint import LoadReport, apply_state_dict
from ..distributed import all_gather_with_grad, get_rank, get_world_size
from ..tokenizer import TextInput
from .base import BlipBase
from .med import BertConfig, BertModel, load_med_config
from .vit import VIT_SIZES, create_vit, interpolate_pos_embed

logger = logging.getLogger("blip_fast.models")
Tensor = torch.Tensor

VISION_POOLERS = ("cls", "cls_post_norm")
TEXT_POOLERS = ("cls", "pooler")


@dataclass
class DualEncoderOutput(ModelOutput):
    """The fields of transformers' ``CLIPOutput``.

    ``loss``: scalar float32 (with ``return_loss``); ``logits_per_image`` ``(B_img, B_txt)`` and
    ``logits_per_text`` ``(B_txt, B_img)``: scaled cosine similarities of this process's batch,
    float32; ``image_embeds`` / ``text_embeds``: normalised projections ``(B, projection_dim)``;
    ``vision_model_output`` / ``text_model_output``: ``BaseModelOutputWithPooling`` of the towers
    (``pooler_output`` is what the projection takes).
    """

    loss: Optional[Tensor] = None
    logits_per_image: Optional[Tensor] = None
    logits_per_text: Optional[Tensor] = None
    text_embeds: Optional[Tensor] = None
    image_embeds: Optional[Tensor] = None
    text_model_output: Optional[BaseModelOutputWithPooling] = None
    vision_model_output: Optional[BaseModelOutputWithPooling] = None

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
                     for k in self.keys())


def clip_loss_local(image_embeds: Tensor, text_embeds: Tensor, all_image_embeds: Tensor, all_text_embeds: Tensor,
                    logit_scale: Tensor, rank: int = 0) -> Tensor:
    """Symmetric InfoNCE of this rank's rows against all columns.

    ``image_embeds`` / ``text_embeds``: this rank's normalised embeddings ``(B, D)``;
    ``all_*``: every rank's, ``(W * B, D)``, rank-major; ``logit_scale``: the multiplier (already
    exponentiated). Row ``i`` of this rank matches column ``rank * B + i``. Logits and loss in
    float32. Returns ``(CE(image->text) + CE(text->image)) / 2``.
    """
    batch = image_embeds.shape[0]
    if text_embeds.shape[0] != batch:
        raise ValueError(f"the contrastive loss pairs images with texts: {batch} images but "
                         f"{text_embeds.shape[0]} texts")
    scale = logit_scale.float()
    logits_per_image = scale * image_embeds.float() @ all_text_embeds.float().t()
    logits_per_text = scale * text_embeds.float() @ all_image_embeds.float().t()
    labels = torch.arange(batch, device=image_embeds.device) + rank * batch
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, gather: bool = True) -> Tensor:
    """CLIP's symmetric loss; across ranks (every rank must hold the same batch size) when
    ``torch.distributed`` is initialised and ``gather``, with gradients through the all-gather."""
    if gather and get_world_size() > 1:
        return clip_loss_local(image_embeds, text_embeds, all_gather_with_grad(image_embeds),
                               all_gather_with_grad(text_embeds), logit_scale, get_rank())
    return clip_loss_local(image_embeds, text_embeds, image_embeds, text_embeds, logit_scale, 0)


class VisionTextDualEncoder(BlipBase):
    """Image and text towers with projections and a learnable temperature (CLIP-style).

    Args:
        vit: ``'base'``, ``'large'`` or a dict of :class:`VisionTransformer` arguments.
        image_size: input resolution.
        med_config: the text tower's BERT config (path, dict or ``BertConfig``; default the
            shipped ``med_config.json``, vocabulary 30524 as BLIP's tokenizer).
        projection_dim: width of the shared embedding space.
        projection_bias: biased projections (BLIP's ``vision_proj`` / ``text_proj``) or not (CLIP,
            transformers).
        vision_pooler: ``'cls'`` (the class token of the final tokens, as BLIP) or
            ``'cls_post_norm'`` (the final LayerNorm applied once more to it, as transformers'
            ``BlipModel``).
        text_pooler: ``'cls'`` (the ``[CLS]`` hidden state, as BLIP) or ``'pooler'`` (BERT's
            dense + tanh pooler, as ``BlipModel`` / ``VisionTextDualEncoderModel``).
        text_cross_attention: keep the (unused) cross-attention weights in the text tower, so that
            checkpoints holding them round-trip; off by default.
        logit_scale_init_value: initial ``log`` of the logit multiplier (CLIP: ``log(1 / 0.07)``).
        max_logit_scale: in training the multiplier is clamped to ``[1, max_logit_scale]`` at
            each forward (CLIP's 100); None to leave it free.
        vit_grad_ckpt, vit_ckpt_layer, drop_path_rate: as BLIP's ViT.
        gather_with_grad: under ``torch.distributed``, contrast against every rank's batch.
        tokenizer: as the BLIP models (used only when captions are given as strings).
    """

    caption_max_length = 35

    def __init__(self, vit: Union[str, Dict[str, Any]] = "base", image_size: int = 224,
                 med_config: Union[str, Dict[str, Any], BertConfig, None] = "med_config.json",
                 projection_dim: int = 256, projection_bias: bool = False, vision_pooler: str = "cls",
                 text_pooler: str = "cls", text_cross_attention: bool = False,
                 logit_scale_init_value: float = math.log(1 / 0.07), max_logit_scale: Optional[float] = 100.0,
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0, drop_path_rate: float = 0.0,
                 gather_with_grad: bool = True, tokenizer: Any = None):
        super().__init__(tokenizer)
        if vision_pooler not in VISION_POOLERS:
            raise ValueError(f"vision_pooler must be one of {VISION_POOLERS}, got {vision_pooler!r}")
        if text_pooler not in TEXT_POOLERS:
            raise ValueError(f"text_pooler must be one of {TEXT_POOLERS}, got {text_pooler!r}")
        if max_logit_scale is not None and max_logit_scale <= 1:
            raise ValueError(f"max_logit_scale must exceed 1 (or be None), got {max_logit_scale}")
        self.vision_model, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer, drop_path_rate)
        config = load_med_config(med_config, encoder_width=vision_width, add_cross_attention=text_cross_attention)
        self.text_model = BertModel(config, add_pooling_layer=text_pooler == "pooler")
        self.visual_projection = nn.Linear(vision_width, projection_dim, bias=projection_bias)
        self.text_projection = nn.Linear(config.hidden_size, projection_dim, bias=projection_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init_value)))
        self.vision_pooler = vision_pooler
        self.text_pooler = text_pooler
        self.max_logit_scale = max_logit_scale
        self.gather_with_grad = gather_with_grad
        self.projection_dim = projection_dim
        self.projection_bias = projection_bias

    # -- towers ----------------------------------------------------------------------------------
    def vision_outputs(self, pixel_values: Tensor) -> BaseModelOutputWithPooling:
        """The image tower: ``last_hidden_state`` ``(B, 1 + P, W)``, ``pooler_output`` ``(B, W)``."""
        hidden = self.vision_model(pixel_values)
        pooled = hidden[:, 0]
        if self.vision_pooler == "cls_post_norm":
            pooled = self.vision_model.norm(pooled)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)

    def text_outputs(self, input_ids: Union[Tensor, TextInput],
                     attention_mask: Optional[Tensor] = None) -> BaseModelOutputWithPooling:
        """The text tower (``mode='text'``): ``last_hidden_state`` ``(B, L, H)``, ``pooler_output`` ``(B, H)``."""
        if not isinstance(input_ids, Tensor):
            device = self.logit_scale.device
            tokens = self.tokens(input_ids, device, padding="longest", max_length=self.caption_max_length)
            input_ids, attention_mask = tokens.input_ids, tokens.attention_mask
        out = self.text_model(input_ids, attention_mask=attention_mask, mode="text", return_dict=True)
        pooled = out.pooler_output if self.text_pooler == "pooler" else out.last_hidden_state[:, 0]
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=pooled)

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected (not normalised) image features ``(B, projection_dim)``, as transformers."""
        with self.backend_context():
            return self.visual_projection(self.vision_outputs(pixel_values).pooler_output)

    def get_text_features(self, input_ids: Union[Tensor, TextInput], attention_mask: Optional[Tensor] = None) -> Tensor:
        """Projected (not normalised) text features ``(B, projection_dim)``; ``input_ids`` may also
        be captions (strings, tokenised with the model's tokenizer) or tokenised text."""
        with self.backend_context():
            return self.text_projection(self.text_outputs(input_ids, attention_mask).pooler_output)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, pixel_values: Tensor, input_ids: Union[Tensor, TextInput],
                attention_mask: Optional[Tensor] = None, return_loss: bool = False,
                return_dict: bool = True) -> Union[DualEncoderOutput, Tuple[Any, ...]]:
        """Images ``(B_img, 3, S, S)`` and texts ``(B_txt, L)`` (ids + 0/1 mask, or captions).

        Returns a :class:`DualEncoderOutput`; ``loss`` (needs ``B_img == B_txt``, pairs on the
        diagonal) with ``return_loss``.
        """
        if self.training and self.max_logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))
        with self.backend_context():
            vision = self.vision_outputs(pixel_values)
            text = self.text_outputs(input_ids, attention_mask)
            image_embeds = F.normalize(self.visual_projection(vision.pooler_output), dim=-1)
            text_embeds = F.normalize(self.text_projection(text.pooler_output), dim=-1)
        scale = self.logit_scale.exp()
        logits_per_text = scale.float() * text_embeds.float() @ image_embeds.float().t()
        loss = clip_loss(image_embeds, text_embeds, scale, gather=self.gather_with_grad) if return_loss else None
        output = DualEncoderOutput(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                                   text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text,
                                   vision_model_output=vision)
        return output if return_dict else output.to_tuple()

    # -- from a BLIP model -----------------------------------------------------------------------
    @classmethod
    def from_blip(cls, blip: Union[nn.Module, Dict[str, Tensor], str], return_report: bool = False,
                  **kwargs: Any) -> Union["VisionTextDualEncoder", Tuple["VisionTextDualEncoder", LoadReport]]:
        """A dual encoder on the towers of a BLIP model or checkpoint (original layout).

        ``blip``: a blip_fast BLIP model, an original-layout state dict, or a checkpoint path / URL.
        Takes ``visual_encoder``, ``text_encoder`` (its cross-attention dropped), ``vision_proj`` /
        ``text_proj`` (BLIP's ITC head, so ``projection_bias=True``) and ``temp`` when present
        (``logit_scale = log(1 / temp)``; in training clamped to BLIP's range, ``max_logit_scale=1000``). Architecture: from the model; from a state dict the
        widths, depths and patch size are read off the shapes, and 768 / 1024-wide towers get
        BLIP's base / large head counts (pass ``vit=`` / ``med_config=`` for anything else).
        ``kwargs`` override constructor arguments (e.g. ``image_size``: the position embedding is
        then resized). The features equal BLIP's ITC features (``match_head='itc'``).
        """
        from ..weight_sources import read_state_dict
        if isinstance(blip, nn.Module):
            defaults = _blip_module_architecture(blip)
            state = blip.state_dict()
        else:
            state = read_state_dict(blip)
            defaults = _blip_state_architecture(state, kwargs)
        for name in ("visual_encoder.cls_token", "text_encoder.embeddings.word_embeddings.weight", "vision_proj.weight"):
            if name not in state:
                raise ValueError(f"not a BLIP model / checkpoint with an image-text contrastive head: {name} missing")
        defaults.update(projection_dim=state["vision_proj.weight"].shape[0], projection_bias=True,
                        vision_pooler="cls", text_pooler="cls", max_logit_scale=1000.0)  # BLIP: temp >= 0.001
        if "temp" in state:
            defaults["logit_scale_init_value"] = math.log(1.0 / float(state["temp"]))
        model = cls(**dict(defaults, **kwargs))
        report = LoadReport()
        mapped: Dict[str, Tensor] = {}
        renames = {"visual_encoder.": "vision_model.", "text_encoder.": "text_model.",
                   "vision_proj.": "visual_projection.", "text_proj.": "text_projection."}
        for key, value in state.items():
            for old, new in renames.items():
                if key.startswith(old):
                    mapped[new + key[len(old):]] = value
                    break
        pos_key = "vision_model.pos_embed"
        before = mapped[pos_key].shape[1]
        mapped[pos_key] = interpolate_pos_embed(mapped[pos_key], model.vision_model)
        if mapped[pos_key].shape[1] != before:
            report.interpolated[pos_key] = (before, mapped[pos_key].shape[1])
        own = model.state_dict()
        for key in [k for k in mapped if k not in own and ".crossattention." in k]:
            del mapped[key]
            report.dropped[key] = "cross-attention (the dual encoder's text tower is unimodal)"
        apply_state_dict(model, mapped, report, drop_mismatched=False)
        missing = [k for k in report.missing_keys if k != "logit_scale"]
        if missing or report.unexpected_keys:
            raise ValueError(f"the BLIP towers do not fit the dual encoder:\n{report}")
        report.initialized_keys = ["logit_scale"] if "temp" not in state else []
        logger.info("dual encoder from BLIP towers\n%s", report)
        return (model, report) if return_report else model


def _blip_module_architecture(blip: nn.Module) -> Dict[str, Any]:
    visual = getattr(blip, "visual_encoder", None)
    text = getattr(blip, "text_encoder", None)
    if visual is None or text is None:
        raise ValueError(f"{type(blip).__name__} has no visual_encoder / text_encoder")
    block = visual.blocks[0]
    vit = {"embed_dim": visual.embed_dim, "depth": len(visual.blocks), "num_heads": block.attn.num_heads,
           "mlp_ratio": block.mlp.fc1.out_features / visual.embed_dim,
           "patch_size": visual.patch_embed.patch_size[0], "qkv_bias": block.attn.qkv.bias is not None}
    return {"vit": vit, "image_size": visual.patch_embed.img_size[0], "med_config": text.config.to_dict()}


def _blip_state_architecture(state: Dict[str, Tensor], overrides: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if "vit" not in overrides:
        width = state["visual_encoder.cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks."))
        named = [n for n, v in VIT_SIZES.items() if v["embed_dim"] == width and v["depth"] == depth]
        if not named:
            raise ValueError(f"a {width}-wide, {depth}-block ViT is neither BLIP's base nor large: pass vit={{...}} "
                             f"with its num_heads")
        out["vit"] = named[0]
    if "image_size" not in overrides:
        grid = int(round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
        out["image_size"] = grid * state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    if "med_config" not in overrides:
        width = state["text_encoder.embeddings.word_embeddings.weight"].shape[1]
        if width != 768:
            raise ValueError(f"a {width}-wide text encoder is not BLIP's BERT-base: pass med_config=...")
        config = load_med_config("med_config.json")
        config.vocab_size = state["text_encoder.embeddings.word_embeddings.weight"].shape[0]
        config.num_hidden_layers = 1 + max(int(k.split(".")[3]) for k in state
                                           if k.startswith("text_encoder.encoder.layer."))
        out["med_config"] = config.to_dict()
    return out
