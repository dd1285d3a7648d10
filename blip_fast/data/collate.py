"""Batching: images stacked, captions tokenised in the data-loader worker."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple, Union

import torch

from ..tokenizer import TokenizedText, tokenize
from .base import Sample

Tensor = torch.Tensor


@dataclass
class ImageTextBatch:
    """``images``: ``(B, 3, S, S)`` uint8; ``text``: tokenised captions ``(B, L)``; ``captions``: the
    cleaned strings; ``indices``: dataset indices; ``skipped``: ``(index, reason, detail)`` of samples
    replaced because they were unusable."""

    images: Tensor
    text: TokenizedText
    captions: List[str]
    indices: Tensor
    skipped: List[Tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> "ImageTextBatch":
        return ImageTextBatch(self.images.pin_memory(),
                              TokenizedText(self.text.input_ids.pin_memory(), self.text.attention_mask.pin_memory()),
                              self.captions, self.indices, self.skipped)

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "ImageTextBatch":
        return ImageTextBatch(self.images.to(device, non_blocking=non_blocking),
                              self.text.to(device, non_blocking=non_blocking),
                              self.captions, self.indices, self.skipped)


class ImageTextCollator:
    """``collate(samples) -> ImageTextBatch``; tokenises with ``padding='max_length'`` to
    ``max_length`` (30, as ``BLIP_Pretrain.forward`` does; 35 for retrieval evaluation)."""

    def __init__(self, tokenizer: Any, max_length: int = 30):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[Sample]) -> ImageTextBatch:
        captions = [s.caption for s in samples]
        text = tokenize(self.tokenizer, captions, padding="max_length", max_length=self.max_length)
        skipped = [skip for s in samples for skip in s.skipped]
        return ImageTextBatch(torch.stack([s.image for s in samples]), text, captions,
                              torch.tensor([s.index for s in samples], dtype=torch.long), skipped)
