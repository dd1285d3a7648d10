"""Peers measured in the same run, where installed: what a user would pick instead of blip_fast.

* ``timm``: ``vit_base_patch16_224`` (fused SDPA attention, random weights, ``pretrained=False``)
  forward and forward+backward of the features, against BLIP's ViT. Skipped cleanly when
  ``import timm`` fails (timm needs torchvision, which is not always installable).
* ``transformers``: ``BlipForImageTextRetrieval`` built from a ``BlipConfig`` matching BLIP base
  (random weights) for ITM / ITC inference; it refuses SDPA (transformers' Blip has no SDPA path),
  so it runs with the first ``attn_implementation`` it accepts, recorded in the row. Also
  transformers' ``BertModel`` with SDPA for the text encoder alone.
* ``torch-sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` pinned to one kernel with
  ``torch.nn.attention.sdpa_kernel`` (flash, memory-efficient, cuDNN, math) for the attention
  micro-benchmarks; a kernel that cannot take the call is recorded as unsupported.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from .workloads import AttentionOp, CaptionGenerate, Context, ItmInference, TextOnly, VitOnly


def _attn_impl_model(cls, config, preferred=("sdpa", "eager")):
    """Build a transformers model with the first attention implementation it accepts."""
    refused = []
    for impl in preferred:
        try:
            return cls._from_config(config, attn_implementation=impl), impl, refused
        except (ValueError, ImportError, TypeError) as exc:
            refused.append(f"{impl}: {str(exc).splitlines()[0][:160]}")
    return cls(config), "default", refused


# -- timm ------------------------------------------------------------------------------------------
class TimmVit(VitOnly):
    impl = "timm"
    model_key = "timm_vit"
    uses_backends = False

    def build_model(self):
        import timm  # noqa: F401  (ImportError -> the peer is skipped)
        from timm.models.vision_transformer import VisionTransformer

        s = self.ctx.sizes
        if s.vit_base == "base" and s.vit_image == 224:
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
            name = "vit_base_patch16_224"
        else:
            d = s.vit_base_dims
            model = VisionTransformer(img_size=s.vit_image, patch_size=d.patch, embed_dim=d.width, depth=d.depth,
                                      num_heads=s.vit_base_heads, num_classes=0)
            name = f"VisionTransformer({d.width}x{d.depth})"
        return model.to(self.ctx.device), name

    def setup(self) -> None:
        self.model, name = self.ctx.shared("timm_vit", self.build_model)
        fused = getattr(self.model.blocks[0].attn, "fused_attn", None)
        self.detail = f"{name}, fused_attn={fused}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net("forward_features")(x)


# -- transformers ----------------------------------------------------------------------------------
def blip_config(ctx: Context, image_size: Optional[int] = None):
    from transformers import BlipConfig

    s = ctx.sizes
    t, v = s.text_dims, s.vit_base_dims
    text = dict(vocab_size=30524, hidden_size=t.width, num_hidden_layers=t.layers, num_attention_heads=s.text_heads,
                intermediate_size=t.intermediate, max_position_embeddings=512, encoder_hidden_size=v.width)
    vision = dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
                  num_attention_heads=s.vit_base_heads, image_size=image_size or s.itm_image, patch_size=v.patch)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=256, image_text_hidden_size=256)


class HfBlipItm(ItmInference):
    impl = "transformers"
    model_key = "hf_blip_itm"
    uses_backends = False

    def setup(self) -> None:
        from transformers import BlipForImageTextRetrieval

        def build():
            model, impl, refused = _attn_impl_model(BlipForImageTextRetrieval, blip_config(self.ctx))
            return model.to(self.ctx.device).eval(), impl, refused

        self.model, impl, refused = self.ctx.shared("hf_blip_itm", build)
        self.detail = f"BlipForImageTextRetrieval, attn={impl}"
        self.refused = refused

    def step(self, inputs: Any) -> None:
        image, text = inputs
        with torch.inference_mode(), self.autocast():
            self.net()(input_ids=text.input_ids, pixel_values=image, attention_mask=text.attention_mask,
                       use_itm_head=self.head == "itm")


class HfBlipCaption(CaptionGenerate):
    """transformers' ``BlipForConditionalGeneration`` (random weights from a config matching BLIP base
    at the caption size) with its own ``generate``: the same prompt ('[DEC] a picture of'), 3 beams,
    max/min length, end token; its cache keeps the cross-attention keys/values per beam row and
    reorders them with the beams."""

    impl = "transformers"
    model_key = "hf_blip_caption"
    uses_backends = False

    def setup(self) -> None:
        from transformers import BlipForConditionalGeneration

        def build():
            with torch.device(self.ctx.device):
                model, impl, refused = _attn_impl_model(BlipForConditionalGeneration,
                                                        blip_config(self.ctx, self.ctx.sizes.caption_image))
            return model.to(self.ctx.device).eval(), impl, refused

        self.model, impl, self.refused = self.ctx.shared("hf_blip_caption", build)
        self.detail = f"BlipForConditionalGeneration.generate, attn={impl}"
        self.prompt = torch.tensor([[101, 1037, 3861, 1997, 102]], device=self.ctx.device)  # [SEP] is dropped

    def generate(self, images: torch.Tensor) -> torch.Tensor:
        s = self.ctx.sizes
        return self.model.generate(pixel_values=images, input_ids=self.prompt.expand(images.shape[0], -1).clone(),
                                   num_beams=s.caption_beams, max_length=s.caption_max_length,
                                   min_length=s.caption_min_length, do_sample=False)


class HfBertText(TextOnly):
    impl = "transformers"
    model_key = "hf_bert"
    uses_backends = False

    def setup(self) -> None:
        from transformers import BertConfig, BertModel

        s = self.ctx.sizes
        t = s.text_dims

        def build():
            config = BertConfig(vocab_size=30524, hidden_size=t.width, num_hidden_layers=t.layers,
                                num_attention_heads=s.text_heads, intermediate_size=t.intermediate,
                                max_position_embeddings=512, hidden_act="gelu")
            config.add_pooling_layer = False
            try:
                model = BertModel._from_config(config, add_pooling_layer=False, attn_implementation="sdpa")
                impl = "sdpa"
            except (ValueError, ImportError, TypeError):
                model, impl, _ = _attn_impl_model(BertModel, config, ("eager",))
            return model.to(self.ctx.device), impl

        self.model, impl = self.ctx.shared("hf_bert", build)
        self.detail = f"BertModel, attn={impl}"

    def forward(self, text: Any) -> torch.Tensor:
        return self.net()(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state


# -- torch SDPA kernels ----------------------------------------------------------------------------
def sdpa_kernels(device_type: str = "cuda") -> Dict[str, Any]:
    """Name -> ``SDPBackend`` member, for the kernels this torch has for ``device_type``
    (on the CPU only flash and math exist)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3
        return {}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    if device_type != "cuda":
        names = {k: v for k, v in names.items() if k in ("flash", "math")}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


class TorchSdpa(AttentionOp):
    impl = "torch-sdpa"
    uses_backends = False

    def __init__(self, ctx: Context, pattern: str, backward: bool, kernel: str):
        super().__init__(ctx, pattern, backward)
        self.kernel = kernel
        self.detail = kernel
        self.peer_backend = kernel

    def setup(self) -> None:
        from torch.nn.attention import sdpa_kernel

        self.sdpa_kernel = sdpa_kernel
        self.backend_enum = sdpa_kernels(self.ctx.device.type)[self.kernel]

    def attend(self, q, k, v, mask):
        attn_mask: Optional[torch.Tensor] = None
        is_causal = False
        if mask is not None:
            attn_mask = mask[:, None, None, :]
            if self.causal:
                lq, lk = q.shape[-2], k.shape[-2]
                tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
                attn_mask = attn_mask & tri
        elif self.causal:
            is_causal = True
        with self.sdpa_kernel(self.backend_enum):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def peer_availability() -> Dict[str, Optional[str]]:
    """Each peer -> None when it can run here, else why not (recorded in the run's metadata)."""
    status: Dict[str, Optional[str]] = {}
    try:
        import timm  # noqa: F401
        from timm.models.vision_transformer import VisionTransformer  # noqa: F401

        status["timm"] = None
    except Exception as exc:  # timm needs torchvision, which may be missing or broken
        status["timm"] = f"timm not importable ({type(exc).__name__}: {str(exc)[:160]})"
    try:
        from transformers import BertModel, BlipForImageTextRetrieval  # noqa: F401

        status["transformers"] = None
    except Exception as exc:
        status["transformers"] = f"transformers' Blip not importable ({type(exc).__name__}: {str(exc)[:160]})"
    status["torch-sdpa"] = None if sdpa_kernels() else "torch.nn.attention.sdpa_kernel is not available"
    return status


def peer_workloads(group: str, ctx: Context, peers: List[str], patterns: List[str]) -> List[Any]:
    """The peer workloads of ``group`` among the requested ``peers`` (unavailable ones left out)."""
    out: List[Any] = []
    if group == "vit" and "timm" in peers:
        out += [TimmVit(ctx, backward=False), TimmVit(ctx, backward=True)]
    if group in ("itm", "itc") and "transformers" in peers:
        out.append(HfBlipItm(ctx, group))
    if group == "caption" and "transformers" in peers:
        out.append(HfBlipCaption(ctx))
    if group == "text" and "transformers" in peers:
        out += [HfBertText(ctx, backward=False), HfBertText(ctx, backward=True)]
    if group == "attention" and "torch-sdpa" in peers:
        for pattern in patterns:
            for backward in (False, True):
                out += [TorchSdpa(ctx, pattern, backward, kernel) for kernel in sdpa_kernels(ctx.device.type)]
    return out
