"""What every image-caption dataset of the job shares.

A dataset maps an index to a raw sample (a PIL image or an image tensor, and a caption string),
:class:`TransformedDataset` applies the transform and caption cleaning with a per-sample random
generator derived from ``(seed, epoch, index)``, and replaces unreadable samples (missing or
corrupt image, empty caption) by the next readable one, recording each skip.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .captions import pre_caption

Tensor = torch.Tensor


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short category for the skip counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


#: Exceptions that mean "this image cannot be decoded" (PIL raises several kinds).
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(source: Union[str, bytes], name: str = "") -> Image.Image:
    """Decode an image file path or encoded bytes fully (so truncation shows here), as RGB."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError as exc:
        raise SampleError("missing image", f"{name or source}: {exc}") from None
    except DECODE_ERRORS as exc:
        raise SampleError("corrupt image", f"{name or source}: {type(exc).__name__}: {exc}") from None


def choose_caption(caption: Any, rng: np.random.Generator, where: str) -> str:
    """A caption string from an annotation's ``caption`` (a string, or a list: one drawn at random)."""
    if isinstance(caption, (list, tuple)):
        options = [c for c in caption if isinstance(c, str) and c.strip()]
        if not options:
            raise SampleError("empty caption", where)
        return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
    if not isinstance(caption, str):
        raise SampleError("bad caption", f"{where}: expected a string or a list of strings, got "
                                         f"{type(caption).__name__}")
    return caption


class ImageTextSource:
    """Raw samples: ``len(source)`` and ``source.load(index, rng) -> (image, caption)`` where image is
    a PIL image (to transform) or a ``(3, S, S)`` uint8 tensor (already final). Raises
    :class:`SampleError` for unusable samples. ``set_epoch(epoch)`` is called before each epoch."""

    #: whether load() returns final uint8 tensors (no transform needed)
    renders_tensors = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, rng: np.random.Generator) -> Tuple[Any, str]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        pass

    def describe(self) -> str:
        return f"{type(self).__name__}({len(self)} samples)"


@dataclass
class Sample:
    """One transformed sample, plus the samples skipped to reach it (index, reason, detail)."""

    image: Tensor
    caption: str
    index: int
    skipped: List[Tuple[int, str, str]] = field(default_factory=list)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's random choices: a function of (seed, epoch, index) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


class TransformedDataset(Dataset):
    """Map-style dataset of :class:`Sample` over an :class:`ImageTextSource`.

    ``transform(pil_image, rng) -> uint8 tensor`` (unused for sources that render tensors);
    ``max_words``: caption cleaning (30 for BLIP's pretraining). An unusable sample is replaced by
    the next index (wrapping), at most ``max_consecutive_skips`` times before a clear error.
    """

    def __init__(self, source: ImageTextSource, transform: Optional[Callable[..., Tensor]], seed: int,
                 max_words: int = 30, max_consecutive_skips: int = 64):
        if len(source) == 0:
            raise ValueError(f"{source.describe()} holds no samples")
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.max_words = max_words
        self.max_consecutive_skips = max_consecutive_skips
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.source.set_epoch(epoch)

    def _load(self, index: int) -> Tuple[Tensor, str]:
        rng = sample_rng(self.seed, self.epoch, index)
        image, caption = self.source.load(index, rng)
        caption = pre_caption(caption, self.max_words)
        if not caption:
            raise SampleError("empty caption", f"sample {index}")
        if not isinstance(image, torch.Tensor):
            if self.transform is None:
                raise TypeError(f"{type(self.source).__name__} returned a PIL image but no transform was given")
            image = self.transform(image, rng)
        return image, caption

    def __getitem__(self, index: int) -> Sample:
        """The sample at ``index``, or at the next usable index. Only ``index``'s own failure is
        reported in ``skipped`` (the others are reported when their own index comes up), so every
        unusable sample counts once per epoch."""
        failures: List[Tuple[int, str, str]] = []
        n = len(self.source)
        for attempt in range(self.max_consecutive_skips + 1):
            i = (index + attempt) % n
            try:
                image, caption = self._load(i)
                return Sample(image, caption, i, failures[:1])
            except SampleError as exc:
                failures.append((i, exc.reason, exc.detail))
        reasons: Dict[str, int] = {}
        for _, reason, _ in failures:
            reasons[reason] = reasons.get(reason, 0) + 1
        raise RuntimeError(
            f"{len(failures)} consecutive unusable samples from index {index} of {self.source.describe()} "
            f"({reasons}; first: {failures[0][2]}). Check image_root / the annotation paths and the files.")
