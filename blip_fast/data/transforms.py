"""BLIP's image transforms on Pillow + torch (no torchvision).

The pretraining transform is ``RandomResizedCrop(size, scale=(min_scale, 1), bicubic)``, a
horizontal flip with probability 0.5 and ``RandomAugment(2, 5, BLIP_AUGS)``; evaluation resizes to
``size x size`` (bicubic). Both return ``(3, size, size)`` uint8 tensors: the division by 255 and the
normalisation with BLIP's (CLIP's) mean and std run on the training device
(:func:`normalize_images`), which moves 4x fewer bytes through the data loader and pinned memory
and gives the same floats as ``ToTensor()`` followed by ``Normalize(mean, std)``.

Every random draw comes from a ``numpy.random.Generator`` passed per call, so a sample's
augmentation is a function of the seed, the epoch and the sample index (reproducible across
workers, ranks and resumed runs).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .randaugment import BLIP_AUGS, RandomAugment

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

Tensor = torch.Tensor


def to_uint8_tensor(img) -> Tensor:
    """A PIL image or an HWC uint8 array -> ``(3, H, W)`` uint8 tensor."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalize_images(images: Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """uint8 images ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` on the images' device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype}")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255.0).sub_(m).div_(s)


def random_resized_crop_box(width: int, height: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                            rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop covering ``scale`` of the area with aspect ratio in ``ratio``
    (log-uniform): ten tries, then a centre crop with the ratio clamped (torchvision's algorithm)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """BLIP's training transform: ``__call__(pil_image, rng) -> (3, size, size)`` uint8 tensor.

    ``min_scale``: 0.2 in BLIP's pretraining (``create_dataset('pretrain', config, min_scale=0.2)``),
    0.5 in its fine-tuning. ``augment=False`` keeps only the crop and flip.
    """

    def __init__(self, image_size: int, min_scale: float = 0.2, augment: bool = True,
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.image_size = int(image_size)
        self.scale = (float(min_scale), 1.0)
        self.ratio = ratio
        self.randaugment: Optional[RandomAugment] = (
            RandomAugment(2, 5, isPIL=True, augs=BLIP_AUGS) if augment else None)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Tensor:
        img = img.convert("RGB")
        top, left, h, w = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = self.randaugment(img, rng) if self.randaugment is not None else np.asarray(img)
        return to_uint8_tensor(arr)

    def __repr__(self) -> str:
        return (f"PretrainTransform(size={self.image_size}, scale={self.scale}, bicubic, hflip 0.5, "
                f"{self.randaugment!r})")


class EvalTransform:
    """BLIP's test transform: resize to ``size x size`` (bicubic) -> uint8 tensor."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> Tensor:
        img = img.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        return to_uint8_tensor(img)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.image_size}, bicubic)"
