"""Logits processing of generation (transformers 4.15 semantics), shape-static.

Every function takes scores ``(rows, vocab)`` float32 and returns them processed. Lengths may be
Python ints (eager decoding) or ``(1,)`` int64 device tensors (fixed-shape steps captured in a CUDA
graph: no host synchronisation, no data-dependent shapes).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Tensor = torch.Tensor
Length = Union[int, Tensor]

__all__ = ["repetition_penalty", "min_length", "top_k_filter", "top_p_filter", "draw_token"]


def repetition_penalty(scores: Tensor, ids: Tensor, penalty: float, length: Optional[Tensor] = None) -> Tensor:
    """CTRL's repetition penalty on every token present in ``ids`` ``(rows, T)``.

    A present token's score is multiplied by ``penalty`` when negative and divided by it otherwise.
    ``length``: only ``ids[:, :length]`` count (fixed-size id buffers); the positions past it are
    replaced by ``ids[:, 0]``, which is always present, so they change nothing.
    """
    if length is not None:
        valid = torch.arange(ids.shape[1], device=ids.device) < length
        ids = torch.where(valid, ids, ids[:, :1])
    picked = scores.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, ids, picked)


def min_length(scores: Tensor, cur_len: Length, min_len: int, eos_token_id: int) -> Tensor:
    """Forbid ``eos_token_id`` while the rows hold fewer than ``min_len`` tokens (in place)."""
    if isinstance(cur_len, int):
        if cur_len < min_len:
            scores[:, eos_token_id] = -float("inf")
        return scores
    column = scores[:, eos_token_id]
    scores[:, eos_token_id] = torch.where(cur_len < min_len, torch.full_like(column, -float("inf")), column)
    return scores


def top_k_filter(scores: Tensor, top_k: int, min_tokens_to_keep: int = 1) -> Tensor:
    """Keep the ``top_k`` highest scores of each row (ties with the k-th kept), the rest ``-inf``."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """Nucleus filter: keep the smallest set of highest-probability tokens whose cumulative
    probability exceeds ``top_p`` (the token that crosses it is kept), the rest ``-inf``."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    if min_tokens_to_keep > 1:
        remove[..., :min_tokens_to_keep - 1] = False
    remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


def draw_token(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row from ``probs`` ``(rows, vocab)``: ``(rows,)`` int64.

    This is the computation ``torch.multinomial(probs, 1)`` performs for one sample (the
    exponential race ``argmax(probs / Exp(1))``, drawing the same random numbers), without its
    validity check, which synchronises with the host and cannot be captured in a CUDA graph.
    """
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)
