"""Analytic FLOP counts of the benchmarked workloads (matrix products only).

Conventions
-----------
* Only matrix products are counted (linear layers, the patch-embedding convolution, the two
  attention products ``q k^T`` and ``p v``, the LM head, the contrastive similarities). Softmax,
  LayerNorm, GELU, dropout, embeddings look-ups, losses and the optimizer are element-wise and
  left out (well under 1% of the total at BLIP sizes).
* A multiply-accumulate (MAC) is 2 FLOPs: ``fwd = 2 * MACs``.
* The backward of a trained module costs twice its forward (gradient of the input and of the
  weight): ``fwd + bwd = 3 * fwd``. Frozen modules (the momentum encoders) run forward only.
* Attention is counted in full (no halving for the causal mask), at the padded length.

Per layer, for ``n`` tokens of width ``d`` (MLP width ``m``, usually ``4d``):

* self-attention block: ``q, k, v`` and output projections ``4 n d^2``; scores and weighted sum
  ``2 n^2 d``;
* MLP: ``2 n d m``;
* cross-attention (text of ``L`` tokens of width ``d`` attending to ``N`` image tokens of width
  ``w``): ``q`` and output projections ``2 L d^2``, image keys/values ``2 N w d``, products
  ``2 L N d``.

ViT (image ``S``, patch ``p``, ``P = (S/p)^2`` patches, ``n = P + 1`` tokens, depth ``D``):
``MACs = P * 3 p^2 * d  +  D * (4 n d^2 + 2 n^2 d + 2 n d m)``.
ViT-B/16 at 224: 17.56 GMACs = 35.1 GFLOP per image forward (timm quotes 17.6 GMACs).

BERT layer (``L`` tokens, hidden ``d``, intermediate ``m``): ``4 L d^2 + 2 L^2 d + 2 L d m``,
plus the cross-attention above in multimodal mode (twice, plus the ``2L*d*d`` merge layer from
``merge_layer_start`` on, for the NLVR twin). The LM head adds ``(L-1) d^2 + (L-1) d V``
(transform and vocabulary projection over the ``L-1`` predicted positions, ``V = 30524``).

BLIP_Pretrain step, per sample (``Q`` = queue size, ``e`` = contrastive embedding width 256)::

    3 * ViT                      online image encoder, fwd + bwd
  + 1 * ViT                      momentum image encoder, fwd
  + 3 * BERT_text(L)             online text encoder (unimodal), fwd + bwd
  + 1 * BERT_text(L)             momentum text encoder, fwd
  + 3 * 3 * BERT_mm(L, N)        ITM fused encoder on 3B sequences (B positives, 2B negatives)
  + 3 * (BERT_mm(L, N) + head)   image-grounded decoder with LM head, fwd + bwd
  + (2*3 + 2*1) * (B + Q) * e    contrastive similarities (online i2t/t2i fwd+bwd, momentum fwd)

with every term in MACs and the total times 2 for FLOPs. For ViT-B/16 at 224, BERT-base,
``L = 30``, ``N = 197``, ``Q = 57600``: **306.7 GFLOP per sample** (online ViT 105.4, momentum
ViT 35.1, online + momentum text encoders 20.5, ITM encoder on 3x batch 106.0, decoder with LM
head 39.5, similarities 0.24; ``python -m benchmarks.flops`` prints the breakdown). The design
card's "~305 GFLOP" is within 0.6% of this. The card gives no breakdown, so the small gap is a
term counted slightly differently (e.g. the LM head or the patch embedding, whose backward needs
no input gradient) or rounding, not a missing component: leaving out any one component (the
smallest is the momentum text encoder, 5.1 GFLOP) would move the total by far more.

ViT-L/16 at 224 (width 1024, depth 24, image keys/values 1024 wide): 681.0 GFLOP per sample.

This is the *model* FLOP count of the original algorithm: every pass of the cross-attention
recomputes the image keys and values (B positives, 2B negatives, B decoder = 4B per step). A fast
path that computes them once per image and reuses them does ~25 GMACs (about 50 GFLOP, 16%) less
work per sample; MFU here always uses the same model count for every backend, so it stays
proportional to throughput and comparable across backends.

MFU = (FLOPs per step / median step time) / (bf16 matmul rate measured in the same run), also
for float32 rows (so float32 MFU is low by construction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

VOCAB = 30524


@dataclass(frozen=True)
class VitDims:
    """ViT width, depth and patch size (heads do not change the FLOP count)."""

    width: int
    depth: int
    patch: int = 16
    mlp_ratio: float = 4.0
    in_chans: int = 3


@dataclass(frozen=True)
class TextDims:
    """BERT (MED) hidden width, layer count and intermediate width."""

    width: int
    layers: int
    intermediate: int
    vocab: int = VOCAB
    merge_layer_start: int = 6


def vit_tokens(image_size: int, patch: int) -> int:
    return (image_size // patch) ** 2 + 1


def vit_forward_macs(v: VitDims, image_size: int) -> float:
    """MACs of one image through the ViT (patch embedding and all blocks)."""
    patches = (image_size // v.patch) ** 2
    n = patches + 1
    d = v.width
    m = int(d * v.mlp_ratio)
    patch_embed = patches * (v.in_chans * v.patch * v.patch) * d
    block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    return float(patch_embed + v.depth * block)


def cross_attention_macs(length: int, width: int, img_tokens: int, img_width: int) -> float:
    """One cross-attention block: q/out projections, image k/v projections, the two products."""
    return float(2 * length * width * width + 2 * img_tokens * img_width * width
                 + 2 * length * img_tokens * width)


def bert_forward_macs(t: TextDims, length: int, img_tokens: int = 0, img_width: int = 0,
                      twin: bool = False) -> float:
    """MACs of one sequence through the MED BERT. ``img_tokens == 0``: unimodal (mode='text')."""
    d, m, L = t.width, t.intermediate, length
    total = 0.0
    for layer in range(t.layers):
        total += 4 * L * d * d + 2 * L * L * d + 2 * L * d * m
        if img_tokens:
            cross = cross_attention_macs(L, d, img_tokens, img_width)
            if twin:
                total += 2 * cross
                if layer >= t.merge_layer_start:
                    total += L * 2 * d * d
            else:
                total += cross
    return total


def lm_head_macs(t: TextDims, length: int) -> float:
    """Prediction transform and vocabulary projection over the ``length - 1`` predicted positions."""
    positions = length - 1
    return float(positions * t.width * t.width + positions * t.width * t.vocab)


def pretrain_step_flops(v: VitDims, t: TextDims, image_size: int, length: int, batch: int,
                        queue_size: int, embed_dim: int = 256) -> Dict[str, float]:
    """FLOPs of one BLIP_Pretrain training step, by component, and ``total``."""
    n_img = vit_tokens(image_size, v.patch)
    vit = vit_forward_macs(v, image_size)
    text = bert_forward_macs(t, length)
    mm = bert_forward_macs(t, length, n_img, v.width)
    sims = batch * (batch + queue_size) * embed_dim
    parts = {
        "vit_online_fwd_bwd": 3 * vit * batch,
        "vit_momentum_fwd": vit * batch,
        "text_online_fwd_bwd": 3 * text * batch,
        "text_momentum_fwd": text * batch,
        "itm_encoder_3x_fwd_bwd": 3 * 3 * mm * batch,
        "decoder_fwd_bwd": 3 * (mm + lm_head_macs(t, length)) * batch,
        "itc_similarities": (2 * 3 + 2 * 1) * sims,
    }
    out = {k: 2.0 * val for k, val in parts.items()}
    out["total"] = sum(out.values())
    return out


def itm_flops(v: VitDims, t: TextDims, image_size: int, length: int, batch: int) -> float:
    """BLIP_ITM 'itm' inference: ViT forward + image-grounded encoder forward."""
    n_img = vit_tokens(image_size, v.patch)
    return 2.0 * batch * (vit_forward_macs(v, image_size) + bert_forward_macs(t, length, n_img, v.width))


def itc_flops(v: VitDims, t: TextDims, image_size: int, length: int, batch: int, embed_dim: int = 256) -> float:
    """BLIP_ITM 'itc' inference: ViT forward + unimodal text encoder forward + B x B similarity."""
    return 2.0 * (batch * (vit_forward_macs(v, image_size) + bert_forward_macs(t, length))
                  + batch * batch * embed_dim)


def nlvr_step_flops(v: VitDims, t: TextDims, image_size: int, length: int, batch: int) -> float:
    """BLIP_NLVR training step for ``batch`` sentences (2 images each): everything fwd + bwd."""
    n_img = vit_tokens(image_size, v.patch)
    per_pair = 2 * vit_forward_macs(v, image_size) + bert_forward_macs(t, length, n_img, v.width, twin=True)
    return 2.0 * 3 * batch * per_pair


def vit_flops(v: VitDims, image_size: int, batch: int, backward: bool) -> float:
    return 2.0 * (3 if backward else 1) * batch * vit_forward_macs(v, image_size)


def text_flops(t: TextDims, length: int, batch: int, backward: bool) -> float:
    return 2.0 * (3 if backward else 1) * batch * bert_forward_macs(t, length)


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int, backward: bool) -> float:
    """The two attention products, ``4 B H Lq Lk D`` forward (full, also for causal)."""
    return (3 if backward else 1) * 4.0 * batch * heads * lq * lk * head_dim


def mfu(flops_per_step: Optional[float], seconds_per_step: Optional[float],
        peak_flops: Optional[float]) -> Optional[float]:
    if not flops_per_step or not seconds_per_step or not peak_flops:
        return None
    return flops_per_step / seconds_per_step / peak_flops


VIT_B = VitDims(768, 12)
VIT_L = VitDims(1024, 24)
BERT_BASE = TextDims(768, 12, 3072)


if __name__ == "__main__":  # python -m benchmarks.flops: print the per-sample pretraining count
    parts = pretrain_step_flops(VIT_B, BERT_BASE, 224, 30, 1, 57600)
    for key, value in parts.items():
        print(f"{key:24s} {value / 1e9:8.2f} GFLOP")
