"""The BLIP Vision Transformer (pre-LayerNorm ViT, patch 16, class token).

Module names match the original ``models/vit.py`` so that state dicts load key for key. The hot
ops (attention, LayerNorm, fc1 + GELU) go through :mod:`blip_fast.ops`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ._backend import BackendSelectable
from .layers import AttentionMapCapture, LayerNorm

Tensor = torch.Tensor


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth per sample: zero whole residual branches with probability ``drop_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Image to patch embedding: (B, C, H, W) -> (B, (H/p)*(W/p), D)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"expected images shaped (batch, {self.proj.in_channels}, {self.img_size[0]}, "
                f"{self.img_size[1]}), got {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input image size {tuple(x.shape[-2:])} does not match the model's "
                f"{self.img_size}: resize the images to {self.img_size[0]}x{self.img_size[1]}, or build "
                f"the model with image_size={x.shape[-1]} (checkpoint position embeddings are "
                f"interpolated at load)"
            )
        if x.dtype != self.proj.weight.dtype and not torch.is_autocast_enabled():
            raise TypeError(
                f"images are {x.dtype} but the model weights are {self.proj.weight.dtype}: convert "
                f"the images with .to({self.proj.weight.dtype}) or run under torch.autocast"
            )
        if x.device != self.proj.weight.device:
            raise ValueError(
                f"images are on {x.device} but the model is on {self.proj.weight.device}: move one "
                f"of them (.to(device))"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: Callable = nn.GELU, drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.act, nn.GELU) and self.act.approximate == "none":
            x = ops.linear_gelu(x, self.fc1.weight, self.fc1.bias)
        else:
            x = self.act(self.fc1(x))
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class Attention(AttentionMapCapture, nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    With ``register_hook=True`` the probabilities ``(B, heads, N, N)`` are kept
    (:meth:`get_attention_map`) and their gradient is captured on backward
    (:meth:`get_attn_gradients`), as Grad-CAM needs; otherwise the attention runs fused.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_gradients: Optional[Tensor] = None
        self.attention_map: Optional[Tensor] = None

    def forward(self, x: Tensor, register_hook: bool = False) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        dropout_p = self.attn_drop.p if self.training else 0.0
        if register_hook:
            out, attn = ops.attention(q, k, v, dropout_p=dropout_p, scale=self.scale, need_weights=True)
            self.save_attention_map(attn)
            if attn.requires_grad:
                attn.register_hook(self.save_attn_gradients)
        else:
            out = ops.attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        x = out.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Block(nn.Module):
    """Pre-LN transformer block; ``use_grad_checkpointing`` recomputes attn and mlp in backward."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: Callable = nn.GELU, norm_layer: Callable = nn.LayerNorm,
                 use_grad_checkpointing: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.use_grad_checkpointing = use_grad_checkpointing

    def _checkpointed(self, fn: Callable, *args: Any) -> Tensor:
        if self.use_grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: Tensor, register_hook: bool = False) -> Tensor:
        h = self.drop_path(self._checkpointed(partial(self.attn, register_hook=register_hook), self.norm1(x)))
        if isinstance(self.norm2, LayerNorm):  # the residual add and norm2 in one op (a fused kernel where one runs)
            x, y = ops.add_layer_norm(h, x, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        else:
            x = x + h
            y = self.norm2(x)
        return x + self.drop_path(self._checkpointed(self.mlp, y))


class VisionTransformer(BackendSelectable, nn.Module):
    """Vision Transformer as in BLIP (timm 0.4 layout, no classifier head).

    Args (as the original): ``img_size``, ``patch_size``, ``in_chans``, ``num_classes`` (unused),
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``qk_scale``,
    ``representation_size`` (unused), ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``,
    ``norm_layer`` (default LayerNorm eps 1e-6), ``use_grad_checkpointing`` and ``ckpt_layer``
    (checkpoint the last ``ckpt_layer`` blocks).

    Forward: images ``(B, 3, img_size, img_size)`` -> embeddings ``(B, 1 + P, embed_dim)``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, representation_size: Optional[int] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Optional[Callable] = None, use_grad_checkpointing: bool = False, ckpt_layer: int = 0):
        super().__init__()
        ops.load_backends()  # no first-use imports inside code traced by torch.compile
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.num_features = self.embed_dim = embed_dim
        norm_layer = norm_layer or partial(LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                  use_grad_checkpointing=(use_grad_checkpointing and i >= depth - ckpt_layer))
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def forward(self, x: Tensor, register_blk: int = -1) -> Tensor:
        with self.backend_context():
            B = x.shape[0]
            x = self.patch_embed(x)
            cls_tokens = self.cls_token.expand(B, -1, -1)
            x = torch.cat((cls_tokens, x), dim=1)
            x = x + self.pos_embed[:, : x.size(1), :]
            x = self.pos_drop(x)
            for i, blk in enumerate(self.blocks):
                x = blk(x, register_blk == i)
            return self.norm(x)

    @torch.jit.ignore()
    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """Load JAX/timm ``.npz`` ViT weights (Google's ViT/AugReg release layout)."""
        load_npz_weights(self, checkpoint_path, prefix)


def _n2p(w: np.ndarray, t: bool = True) -> Tensor:
    """numpy -> torch, converting JAX HWIO/IO kernel layouts to PyTorch's."""
    if w.ndim == 4 and w.shape[0] == w.shape[1] == w.shape[2] == 1:
        w = w.flatten()
    if t:
        if w.ndim == 4:
            w = w.transpose([3, 2, 0, 1])
        elif w.ndim == 3:
            w = w.transpose([2, 0, 1])
        elif w.ndim == 2:
            w = w.transpose([1, 0])
    return torch.from_numpy(np.ascontiguousarray(w))


@torch.no_grad()
def load_npz_weights(model: VisionTransformer, checkpoint_path: str, prefix: str = "") -> None:
    """Copy the weights of a JAX ViT ``.npz`` (keys like ``Transformer/encoderblock_0/...``).

    The position embedding is resized (bicubic) when the checkpoint's grid differs.
    """
    w = np.load(checkpoint_path)
    if not prefix and "opt/target/embedding/kernel" in w:
        prefix = "opt/target/"
    embed_kernel = w[f"{prefix}embedding/kernel"]
    model.patch_embed.proj.weight.copy_(_n2p(embed_kernel))
    model.patch_embed.proj.bias.copy_(_n2p(w[f"{prefix}embedding/bias"]))
    model.cls_token.copy_(_n2p(w[f"{prefix}cls"], t=False))
    pos_embed_w = _n2p(w[f"{prefix}Transformer/posembed_input/pos_embedding"], t=False)
    if pos_embed_w.shape != model.pos_embed.shape:
        pos_embed_w = interpolate_pos_embed(pos_embed_w, model)
    model.pos_embed.copy_(pos_embed_w)
    model.norm.weight.copy_(_n2p(w[f"{prefix}Transformer/encoder_norm/scale"]))
    model.norm.bias.copy_(_n2p(w[f"{prefix}Transformer/encoder_norm/bias"]))
    for i, block in enumerate(model.blocks.children()):
        block_prefix = f"{prefix}Transformer/encoderblock_{i}/"
        mha_prefix = block_prefix + "MultiHeadDotProductAttention_1/"
        block.norm1.weight.copy_(_n2p(w[f"{block_prefix}LayerNorm_0/scale"]))
        block.norm1.bias.copy_(_n2p(w[f"{block_prefix}LayerNorm_0/bias"]))
        block.attn.qkv.weight.copy_(torch.cat([
            _n2p(w[f"{mha_prefix}{n}/kernel"], t=False).flatten(1).T for n in ("query", "key", "value")]))
        block.attn.qkv.bias.copy_(torch.cat([
            _n2p(w[f"{mha_prefix}{n}/bias"], t=False).reshape(-1) for n in ("query", "key", "value")]))
        block.attn.proj.weight.copy_(_n2p(w[f"{mha_prefix}out/kernel"]).flatten(1))
        block.attn.proj.bias.copy_(_n2p(w[f"{mha_prefix}out/bias"]))
        for r in range(2):
            fc = getattr(block.mlp, f"fc{r + 1}")
            fc.weight.copy_(_n2p(w[f"{block_prefix}MlpBlock_3/Dense_{r}/kernel"]))
            fc.bias.copy_(_n2p(w[f"{block_prefix}MlpBlock_3/Dense_{r}/bias"]))
        block.norm2.weight.copy_(_n2p(w[f"{block_prefix}LayerNorm_2/scale"]))
        block.norm2.bias.copy_(_n2p(w[f"{block_prefix}LayerNorm_2/bias"]))


def interpolate_pos_embed(pos_embed_checkpoint: Tensor, visual_encoder: VisionTransformer) -> Tensor:
    """Resize a checkpoint's position embedding ``(1, extra + g*g, W)`` to the model's patch grid.

    The extra (class token) rows are kept; the patch rows are resized bicubically
    (align_corners False) over the square grid, exactly as the original BLIP loader does.
    """
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra_tokens = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int(round((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5))
    new_size = int(round(num_patches ** 0.5))
    if orig_size * orig_size != pos_embed_checkpoint.shape[-2] - num_extra_tokens:
        raise ValueError(
            f"checkpoint pos_embed has {pos_embed_checkpoint.shape[-2]} rows, which is not "
            f"{num_extra_tokens} extra row(s) plus a square patch grid"
        )
    if orig_size == new_size:
        return pos_embed_checkpoint
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens.float(), size=(new_size, new_size), mode="bicubic",
                               align_corners=False).to(pos_embed_checkpoint.dtype)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


VIT_SIZES: Dict[str, Dict[str, Any]] = {
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def create_vit(vit: Union[str, Dict[str, Any]], image_size: int, use_grad_checkpointing: bool = False,
               ckpt_layer: int = 0, drop_path_rate: float = 0.0) -> Tuple[VisionTransformer, int]:
    """Build BLIP's image encoder; returns ``(visual_encoder, vision_width)``.

    ``vit`` is ``'base'`` (768 wide, 12 blocks), ``'large'`` (1024, 24; drop path always 0.1, as
    the original builder does) or a dict of :class:`VisionTransformer` arguments for custom sizes
    (e.g. ``{"embed_dim": 64, "depth": 2, "num_heads": 2}``).
    """
    if isinstance(vit, str):
        if vit not in VIT_SIZES:
            raise ValueError(f"vit must be 'base', 'large' or a dict of VisionTransformer arguments, got {vit!r}")
        kwargs = dict(VIT_SIZES[vit])
        # The original writes `0.1 or drop_path_rate` for large, which is always 0.1.
        kwargs["drop_path_rate"] = 0.1 if vit == "large" else drop_path_rate
    elif isinstance(vit, dict):
        kwargs = {"drop_path_rate": drop_path_rate, **vit}
    else:
        raise TypeError(f"vit must be a str or a dict, got {type(vit).__name__}")
    kwargs.setdefault("patch_size", 16)
    visual_encoder = VisionTransformer(img_size=image_size, use_grad_checkpointing=use_grad_checkpointing,
                                       ckpt_layer=ckpt_layer, **kwargs)
    return visual_encoder, visual_encoder.embed_dim
