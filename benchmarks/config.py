"""Model sizes, default batch sizes and step counts for the GPU and CPU configurations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from .flops import BERT_BASE, VIT_B, VIT_L, TextDims, VitDims

#: Every workload group, in the order they run.
GROUPS = ["pretrain", "pretrain_large", "itm", "itc", "nlvr", "vit", "text", "attention", "caption"]

GROUP_TITLES = {
    "pretrain": "BLIP_Pretrain training step (forward with momentum update and queues, backward, AdamW)",
    "pretrain_large": "BLIP_Pretrain training step, ViT-L/16",
    "itm": "BLIP_ITM inference, match_head='itm'",
    "itc": "BLIP_ITM inference, match_head='itc'",
    "nlvr": "BLIP_NLVR training step (2 images per sentence, backward, AdamW)",
    "vit": "Image encoder (ViT) alone",
    "text": "Text encoder (MED BERT, mode='text') alone",
    "attention": "Attention op micro-benchmarks",
    "caption": "BLIP_Decoder captioning: beam search (3 beams, 30 tokens max, 10 min), images to token ids",
}

ALL_PEERS = ["timm", "transformers", "torch-sdpa"]


@dataclass
class Sizes:
    """Model sizes of one configuration (``full``: BLIP's real sizes; ``tiny``: CPU smoke sizes)."""

    name: str
    vit_base: Union[str, Dict[str, Any]]
    vit_base_dims: VitDims
    vit_base_heads: int
    vit_large: Union[str, Dict[str, Any]]
    vit_large_dims: VitDims
    med: Optional[Dict[str, Any]]  # None: the shipped BERT-base configs
    text_dims: TextDims
    text_heads: int
    pretrain_image: int
    itm_image: int
    nlvr_image: int
    vit_image: int
    queue_size: int
    pretrain_len: int = 30
    itm_len: int = 35
    nlvr_len: int = 35
    text_len: int = 30
    attn_heads: int = 12
    attn_head_dim: int = 64
    caption_image: int = 384
    caption_beams: int = 3
    caption_max_length: int = 30
    caption_min_length: int = 10

    def describe(self) -> Dict[str, Any]:
        return {k: (v if not isinstance(v, (VitDims, TextDims)) else v.__dict__) for k, v in self.__dict__.items()}


FULL = Sizes(
    name="full", vit_base="base", vit_base_dims=VIT_B, vit_base_heads=12, vit_large="large",
    vit_large_dims=VIT_L, med=None, text_dims=BERT_BASE, text_heads=12, pretrain_image=224,
    itm_image=384, nlvr_image=384, vit_image=224, queue_size=57600,
)

_TINY_MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 256,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 64, "add_cross_attention": True,
}

TINY = Sizes(
    name="tiny", vit_base={"embed_dim": 64, "depth": 2, "num_heads": 2}, vit_base_dims=VitDims(64, 2),
    vit_base_heads=2, vit_large={"embed_dim": 96, "depth": 3, "num_heads": 2}, vit_large_dims=VitDims(96, 3),
    med=_TINY_MED, text_dims=TextDims(64, 2, 256), text_heads=2, pretrain_image=64, itm_image=96,
    nlvr_image=64, vit_image=64, queue_size=1024, attn_heads=2, attn_head_dim=32, caption_image=64,
)

GPU_BATCHES: Dict[str, List[int]] = {
    "pretrain": [32, 64, 128], "pretrain_large": [32], "itm": [64], "itc": [64], "nlvr": [32],
    "vit": [64, 128], "text": [128], "attention": [64], "caption": [1, 64],
}
GPU_QUICK_BATCHES: Dict[str, List[int]] = {
    "pretrain": [64], "itm": [64], "itc": [64], "vit": [128], "text": [128], "attention": [64],
}
CPU_BATCHES: Dict[str, List[int]] = {g: [2] for g in GROUPS}
CPU_QUICK_GROUPS = ["pretrain", "itm", "itc", "nlvr", "vit", "text", "attention"]


@dataclass
class Defaults:
    """Step counts of a configuration (the sizes and batches follow ``--size``)."""

    steps: int
    warmup: int
    input_sets: int
    max_case_seconds: float


def defaults(device_type: str, quick: bool) -> Defaults:
    if device_type == "cuda":
        if quick:
            return Defaults(steps=5, warmup=2, input_sets=3, max_case_seconds=10)
        return Defaults(steps=10, warmup=3, input_sets=3, max_case_seconds=30)
    if quick:
        return Defaults(steps=2, warmup=1, input_sets=2, max_case_seconds=5)
    return Defaults(steps=5, warmup=2, input_sets=2, max_case_seconds=10)
