"""Synthetic inputs: random images (``torch.randn``, never zeros) and 15-20-word random captions,
tokenised once before any timing.

Tokenisation uses BLIP's real tokenizer when a local vocabulary is found (``$BLIP_FAST_VOCAB`` or
the packaged bert-base-uncased vocab), else a synthetic one that needs no vocabulary: ``[CLS]``,
one to about 1.2 random word-piece ids in ``[1000, 30000)`` per word, ``[SEP]``, zero padding.
The models take pre-tokenised captions, so the timed region never tokenises.
"""
from __future__ import annotations

import random
from typing import Any, List, Optional, Tuple

import torch

from blip_fast import tokenizer as tok

WORDS = (
    "a an the man woman child dog cat bird horse car bus train bike boat plane street road field "
    "beach park river lake mountain tree flower grass table chair bed kitchen room window door "
    "wall floor sky cloud sun snow rain water food pizza cake plate cup bottle phone laptop book "
    "ball frisbee kite umbrella bag hat shirt jacket red blue green yellow white black brown small "
    "large young old tall happy sitting standing walking running riding holding eating playing "
    "looking flying lying near next to on in under over behind front of with and while two three "
    "group people crowd player team game city building house tower bridge sign light clock "
    "picture toy giraffe elephant zebra sheep cow bear surfboard skateboard skis wave ocean"
).split()

CLS_ID, SEP_ID, PAD_ID = tok.CLS_TOKEN_ID, tok.SEP_TOKEN_ID, tok.PAD_TOKEN_ID


def random_captions(n: int, rng: random.Random, min_words: int = 15, max_words: int = 20) -> List[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


class Tokenizer:
    """Tokenises captions to ``TokenizedText`` padded to ``max_length`` (real or synthetic)."""

    def __init__(self, mode: str = "auto"):
        if mode not in ("auto", "real", "synthetic"):
            raise ValueError(f"tokenizer mode must be auto, real or synthetic, got {mode!r}")
        self.real: Optional[Any] = None
        self.kind = "synthetic"
        if mode in ("auto", "real"):
            import os

            local = os.environ.get(tok.VOCAB_ENV) or tok.find_packaged_vocab()
            if local or mode == "real":
                try:
                    self.real = tok.init_tokenizer(local)
                    self.kind = "bert-base-uncased (BLIP tokenizer)"
                except Exception as exc:
                    if mode == "real":
                        raise
                    self.kind = f"synthetic (real tokenizer failed: {type(exc).__name__})"

    def __call__(self, captions: List[str], max_length: int, rng: random.Random) -> tok.TokenizedText:
        if self.real is not None:
            return tok.tokenize(self.real, captions, padding="max_length", max_length=max_length, truncation=True)
        ids = torch.full((len(captions), max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(captions), max_length), dtype=torch.long)
        for row, caption in enumerate(captions):
            n_words = len(caption.split())
            pieces = [rng.randrange(1000, 30000) for _ in range(n_words + rng.randint(0, n_words // 5))]
            seq = [CLS_ID] + pieces[: max_length - 2] + [SEP_ID]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return tok.TokenizedText(ids, mask)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A random generator on ``device`` (inputs are drawn where they are used: no host copies)."""
    return torch.Generator(device=device).manual_seed(seed)


def images(batch: int, size: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=gen, device=device)


def captions(tokenizer: Tokenizer, batch: int, max_length: int, rng: random.Random,
             device: torch.device) -> tok.TokenizedText:
    return tokenizer(random_captions(batch, rng), max_length, rng).to(device)


def image_text_sets(tokenizer: Tokenizer, n_sets: int, batch: int, image_size: int, max_length: int,
                    device: torch.device, seed: int, n_images: Optional[int] = None
                    ) -> List[Tuple[torch.Tensor, tok.TokenizedText]]:
    """``n_sets`` independent (images, captions) sets, generated and tokenised up front."""
    rng = random.Random(seed)
    gen = generator(device, seed)
    return [(images(n_images or batch, image_size, device, gen), captions(tokenizer, batch, max_length, rng, device))
            for _ in range(n_sets)]
