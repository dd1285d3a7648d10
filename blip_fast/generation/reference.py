"""The search loop of transformers' ``generate`` (4.15, what the original BLIP called), written
out plainly: per-input Python loops, a growing ``input_ids``, one model call per step.

It is the oracle the fast, vectorised search (:mod:`blip_fast.generation.search`) is tested
against, and the search of the ``'original'`` and ``'recompute'`` decodings.

``step(input_ids) -> logits`` returns the logits ``(rows, vocab)`` of the last position of
``input_ids`` ``(rows, length)``; ``reorder(beam_idx)`` is called after each beam-search step with
the row each new row continues (to reorder a key/value cache; rows of finished inputs point at
row 0, as in transformers).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from . import logits as lp
from .config import GenerationConfig

Tensor = torch.Tensor
StepFn = Callable[[Tensor], Tensor]
ReorderFn = Callable[[Tensor], None]

__all__ = ["reference_search"]


class _Hypotheses:
    """n-best list of finished hypotheses of one input (``BeamHypotheses``)."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.beams: List[Tuple[float, Tensor]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


def _processed(scores: Tensor, input_ids: Tensor, config: GenerationConfig) -> Tensor:
    if config.repetition_penalty != 1.0:
        scores = lp.repetition_penalty(scores, input_ids, config.repetition_penalty)
    if config.min_length > 0:
        scores = lp.min_length(scores, input_ids.shape[1], config.min_length, config.eos_token_id)
    return scores


def _token_search(step: StepFn, input_ids: Tensor, config: GenerationConfig,
                  generator: Optional[torch.Generator]) -> Tensor:
    unfinished = input_ids.new_ones(input_ids.shape[0])
    while True:
        scores = _processed(step(input_ids).float(), input_ids, config)
        if config.do_sample:
            if config.top_k:
                scores = lp.top_k_filter(scores, config.top_k)
            if config.top_p < 1.0:
                scores = lp.top_p_filter(scores, config.top_p)
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = tokens * unfinished + config.pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished = unfinished * (tokens != config.eos_token_id).long()
        if unfinished.max() == 0 or input_ids.shape[1] >= config.max_length:
            return input_ids


def _beam_search(step: StepFn, reorder: ReorderFn, input_ids: Tensor, config: GenerationConfig,
                 batch_size: int) -> Tensor:
    k, eos, pad = config.num_beams, config.eos_token_id, config.pad_token_id
    device = input_ids.device
    beam_scores = torch.zeros(batch_size, k, dtype=torch.float, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(k, config.length_penalty, config.early_stopping) for _ in range(batch_size)]
    done = [False] * batch_size
    while True:
        cur_len = input_ids.shape[1]
        scores = _processed(torch.log_softmax(step(input_ids).float(), dim=-1), input_ids, config)
        scores = scores + beam_scores[:, None]
        vocab = scores.shape[-1]
        top_scores, top_ids = torch.topk(scores.view(batch_size, k * vocab), 2 * k, dim=1, largest=True, sorted=True)
        top_beams = torch.div(top_ids, vocab, rounding_mode="floor")
        top_tokens = top_ids % vocab
        next_scores = torch.zeros(batch_size, k, dtype=top_scores.dtype, device=device)
        next_tokens = torch.zeros(batch_size, k, dtype=torch.long, device=device)
        next_rows = torch.zeros(batch_size, k, dtype=torch.long, device=device)
        for b in range(batch_size):
            if done[b]:
                next_tokens[b] = pad
                continue
            filled = 0
            for rank, (token, score, beam) in enumerate(zip(top_tokens[b], top_scores[b], top_beams[b])):
                row = b * k + beam
                if token.item() == eos:
                    if rank >= k:
                        continue
                    hyps[b].add(input_ids[row].clone(), score.item())
                else:
                    next_scores[b, filled], next_tokens[b, filled], next_rows[b, filled] = score, token, row
                    filled += 1
                if filled == k:
                    break
            done[b] = done[b] or hyps[b].is_done(top_scores[b].max().item(), cur_len)
        beam_scores, beam_idx = next_scores.view(-1), next_rows.view(-1)
        input_ids = torch.cat([input_ids[beam_idx, :], next_tokens.view(-1, 1)], dim=-1)
        reorder(beam_idx)
        if all(done) or input_ids.shape[1] >= config.max_length:
            break

    for b in range(batch_size):  # finalize
        if done[b]:
            continue
        for beam in range(k):
            row = b * k + beam
            hyps[b].add(input_ids[row], beam_scores[row].item())
    best = [sorted(h.beams, key=lambda x: x[0]).pop()[1] for h in hyps]
    lengths = [len(hyp) for hyp in best]
    out = input_ids.new_full((batch_size, min(max(lengths) + 1, config.max_length)), pad)
    for b, hyp in enumerate(best):
        out[b, :lengths[b]] = hyp
        if lengths[b] < config.max_length:
            out[b, lengths[b]] = eos
    return out


def reference_search(step: StepFn, reorder: ReorderFn, prompt_ids: Tensor, config: GenerationConfig,
                     batch_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Generate from ``prompt_ids`` ``(batch * rows_per_input, L0)``; returns ``(batch, length)``
    int64 (prompt included), as transformers 4.15's ``generate`` returns it."""
    config.validate(prompt_ids.shape[1])
    if config.is_beam_search:
        return _beam_search(step, reorder, prompt_ids, config, batch_size)
    return _token_search(step, prompt_ids, config, generator)
