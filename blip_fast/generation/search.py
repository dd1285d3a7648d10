"""Token search on the device with fixed shapes: greedy, nucleus sampling and beam search.

The state of a search lives in preallocated tensors and :meth:`update` consumes one step's logits
without host synchronisation or data-dependent shapes, so a whole decode step (model + search) can
be captured in one CUDA graph. The results are those of transformers' ``generate`` (4.15, what the
original BLIP called) token for token; :mod:`blip_fast.generation.reference` is the per-row loop
this is tested against.

Scores are processed in float32 whatever the logits' dtype (transformers processes them in the
logits' dtype: the same in float32, a finer rounding under autocast).

Layout: ``rows = batch * rows_per_input``; the rows of one input are consecutive (as
``repeat_interleave`` lays out beams). ``ids`` ``(rows, max_length)`` holds the prompt and the
generated tokens; ``cur_len`` counts its valid columns.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import logits as lp
from .config import GenerationConfig

Tensor = torch.Tensor

__all__ = ["TokenSearch", "BeamSearch", "make_search"]


class _Search:
    def __init__(self, config: GenerationConfig, batch_size: int, device: torch.device):
        self.config = config
        self.batch_size = batch_size
        self.rows = batch_size * config.rows_per_input
        self.device = device
        self.max_length = config.max_length
        self.ids = torch.full((self.rows, self.max_length), config.pad_token_id, dtype=torch.long, device=device)
        self.cur_len = torch.zeros(1, dtype=torch.long, device=device)
        #: cur_len as the host knows it: the driver adds one per update (graph replays run no Python)
        self.host_len = 0
        self.next_tokens = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.all_done = torch.zeros(1, dtype=torch.bool, device=device)
        self.generator: Optional[torch.Generator] = None

    def reset(self, prompt_ids: Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Start from ``prompt_ids`` ``(rows, L0)`` (every row of an input holding its prompt)."""
        if prompt_ids.shape[0] != self.rows:
            raise ValueError(f"prompt has {prompt_ids.shape[0]} rows, the search expects {self.rows}")
        length = prompt_ids.shape[1]
        self.ids.fill_(self.config.pad_token_id)
        self.ids[:, :length] = prompt_ids
        self.cur_len.fill_(length)
        self.host_len = length
        self.all_done.zero_()
        self.generator = generator

    def _processed(self, logits: Tensor) -> Tensor:
        """Float32 scores after the repetition penalty and the minimum length."""
        cfg = self.config
        scores = logits.float()
        if cfg.is_beam_search:
            scores = torch.log_softmax(scores, dim=-1)
        if cfg.repetition_penalty != 1.0:
            scores = lp.repetition_penalty(scores, self.ids, cfg.repetition_penalty, self.cur_len)
        if cfg.min_length > 0:
            scores = lp.min_length(scores, self.cur_len, cfg.min_length, cfg.eos_token_id)
        return scores

    def _append(self, tokens: Tensor) -> None:
        self.ids.index_copy_(1, self.cur_len, tokens.unsqueeze(1))
        self.next_tokens.copy_(tokens)
        self.cur_len.add_(1)

    @property
    def done_on_host(self) -> bool:
        """Whether generation is over (reads one flag from the device: a synchronisation)."""
        return self.host_len >= self.max_length or bool(self.all_done.item())


class TokenSearch(_Search):
    """Greedy decoding (``do_sample=False``) or sampling, one row per input."""

    def __init__(self, config: GenerationConfig, batch_size: int, device: torch.device):
        super().__init__(config, batch_size, device)
        self.unfinished = torch.ones(self.rows, dtype=torch.long, device=device)

    def reset(self, prompt_ids: Tensor, generator: Optional[torch.Generator] = None) -> None:
        super().reset(prompt_ids, generator)
        self.unfinished.fill_(1)

    def update(self, logits: Tensor) -> None:
        """Consume the logits ``(rows, vocab)`` of the last position; append one token per row."""
        cfg = self.config
        scores = self._processed(logits)
        if cfg.do_sample:
            if cfg.top_k:
                scores = lp.top_k_filter(scores, cfg.top_k)
            if cfg.top_p < 1.0:
                scores = lp.top_p_filter(scores, cfg.top_p)
            tokens = lp.draw_token(torch.softmax(scores, dim=-1), self.generator)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = tokens * self.unfinished + cfg.pad_token_id * (1 - self.unfinished)
        self._append(tokens)
        self.unfinished.mul_((tokens != cfg.eos_token_id).long())
        self.all_done.copy_(self.unfinished.max() == 0)

    def result(self) -> Tensor:
        """``(batch, length)`` int64: prompt and generated tokens, finished rows padded."""
        return self.ids[:, :self.host_len].clone()


class BeamSearch(_Search):
    """Beam search with transformers 4.15's ``BeamSearchScorer`` semantics, vectorised.

    Per input: the ``2 * num_beams`` best continuations; an end token among the first
    ``num_beams`` of them closes a hypothesis (score ``sum_logprobs / length ** length_penalty``,
    the end token not counted); the first ``num_beams`` other continuations are the next beams. An
    input is done when it holds ``num_beams`` hypotheses and none of its open beams can beat the
    worst (or at once with ``early_stopping``). At the end the open beams of unfinished inputs are
    added as hypotheses and each input returns its best one, followed by the end token if there is
    room, padded to the longest.

    Hypothesis scores are kept in float64, as transformers computes them in Python floats.
    """

    def __init__(self, config: GenerationConfig, batch_size: int, device: torch.device):
        super().__init__(config, batch_size, device)
        k = config.num_beams
        self.num_beams = k
        self.beam_scores = torch.zeros(self.rows, dtype=torch.float32, device=device)
        self.beam_idx = torch.arange(self.rows, device=device)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.hyp_scores = torch.zeros(batch_size, k, dtype=torch.float64, device=device)
        self.hyp_tokens = torch.zeros(batch_size, k, self.max_length, dtype=torch.long, device=device)
        self.hyp_len = torch.zeros(batch_size, k, dtype=torch.long, device=device)
        self.hyp_order = torch.zeros(batch_size, k, dtype=torch.long, device=device)
        self.hyp_count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._slots = torch.arange(k, device=device)
        self._own_rows = torch.arange(self.rows, device=device).view(batch_size, k)
        self._first_row = (torch.arange(batch_size, device=device) * k).unsqueeze(1)
        self._rank = torch.arange(2 * k, device=device)

    def reset(self, prompt_ids: Tensor, generator: Optional[torch.Generator] = None) -> None:
        super().reset(prompt_ids, generator)
        self.beam_scores.view(self.batch_size, self.num_beams).fill_(-1e9)[:, 0] = 0.0
        self.beam_idx.copy_(self._own_rows.view(-1))
        self.done.zero_()
        self.hyp_scores.zero_()
        self.hyp_tokens.fill_(self.config.pad_token_id)
        self.hyp_len.zero_()
        self.hyp_order.zero_()
        self.hyp_count.zero_()

    def _length_norm(self, length: Tensor) -> Tensor:
        return length.double() ** self.config.length_penalty

    def _worst(self) -> Tensor:
        """The lowest hypothesis score of each input (``+inf`` where none yet), float64 ``(B,)``."""
        filled = self._slots.unsqueeze(0) < self.hyp_count.unsqueeze(1)
        return torch.where(filled, self.hyp_scores, torch.full_like(self.hyp_scores, float("inf"))).amin(dim=1)

    def _add(self, candidate: Tensor, score: Tensor, tokens: Tensor, length: Tensor, order: Tensor) -> None:
        """``BeamHypotheses.add`` for every input at once.

        ``candidate`` ``(B,)`` bool: whether input b offers a hypothesis; ``score`` ``(B,)`` float64;
        ``tokens`` ``(B, T)``; ``length``/``order`` ``(1,)``. A full list replaces its lowest entry
        (the earliest added among equal lowest scores) when the new score is higher.
        """
        k = self.num_beams
        full = self.hyp_count >= k
        insert = candidate & (~full | (score > self._worst()))
        lowest = self.hyp_scores.amin(dim=1, keepdim=True)
        tied_order = torch.where(self.hyp_scores == lowest, self.hyp_order, torch.full_like(self.hyp_order, 2 ** 62))
        slot = torch.where(full, tied_order.argmin(dim=1), self.hyp_count.clamp(max=k - 1))
        write = (self._slots.unsqueeze(0) == slot.unsqueeze(1)) & insert.unsqueeze(1)  # (B, k)
        self.hyp_scores.copy_(torch.where(write, score.unsqueeze(1), self.hyp_scores))
        self.hyp_tokens.copy_(torch.where(write.unsqueeze(2), tokens.unsqueeze(1), self.hyp_tokens))
        self.hyp_len.copy_(torch.where(write, length, self.hyp_len))
        self.hyp_order.copy_(torch.where(write, order, self.hyp_order))
        self.hyp_count.add_(insert & ~full)

    def update(self, logits: Tensor) -> None:
        """Consume the logits ``(rows, vocab)`` of the last position; choose the next beams.

        Afterwards ``beam_idx`` holds, per row, the row it continues (the caller reorders its
        key/value cache with it) and ``next_tokens`` the token it appended.
        """
        cfg, k, b = self.config, self.num_beams, self.batch_size
        scores = self._processed(logits)
        vocab = scores.shape[-1]
        scores = (scores + self.beam_scores.unsqueeze(1)).view(b, k * vocab)
        top_scores, top_ids = torch.topk(scores, 2 * k, dim=1, largest=True, sorted=True)
        top_beam = torch.div(top_ids, vocab, rounding_mode="floor")
        top_tokens = top_ids % vocab
        top_rows = self._first_row + top_beam
        is_eos = top_tokens == cfg.eos_token_id
        norm = self._length_norm(self.cur_len)

        # end tokens among the first k continuations close hypotheses, in rank order
        for rank in range(k):
            self._add(is_eos[:, rank] & ~self.done, top_scores[:, rank].double() / norm,
                      self.ids.index_select(0, top_rows[:, rank]), self.cur_len, self.cur_len * (2 * k) + rank)

        # the first k continuations that are not an end token become the beams
        order = (is_eos.long() * (2 * k) + self._rank).argsort(dim=1)[:, :k]
        next_scores = top_scores.gather(1, order)
        next_tokens = top_tokens.gather(1, order)
        next_rows = top_rows.gather(1, order)
        # finished inputs keep their rows (transformers pads them; they no longer matter)
        frozen = self.done.unsqueeze(1)
        next_scores = torch.where(frozen, torch.zeros_like(next_scores), next_scores)
        next_tokens = torch.where(frozen, torch.full_like(next_tokens, cfg.pad_token_id), next_tokens)
        next_rows = torch.where(frozen, self._own_rows, next_rows)

        full = self.hyp_count >= k
        if cfg.early_stopping:
            newly_done = full
        else:
            newly_done = full & (self._worst() >= top_scores[:, 0].double() / norm)
        self.done.logical_or_(newly_done)

        self.beam_scores.copy_(next_scores.view(-1))
        self.beam_idx.copy_(next_rows.view(-1))
        self.ids.copy_(self.ids.index_select(0, self.beam_idx))
        self._append(next_tokens.view(-1))
        self.all_done.copy_(self.done.all().view(1))

    def result(self) -> Tensor:
        """``(batch, length)`` int64: the best hypothesis of each input (prompt included), then the
        end token where it fits, padded to the longest (``BeamSearchScorer.finalize``)."""
        cfg, k = self.config, self.num_beams
        length = self.cur_len.clone()
        norm = self._length_norm(length)
        open_inputs = ~self.done
        for beam in range(k):
            rows = self._own_rows[:, beam]
            self._add(open_inputs, self.beam_scores[rows].double() / norm, self.ids.index_select(0, rows),
                      length, length * (2 * k) + 2 * k + beam)
        # the best score; among equal best, the latest added (transformers pops the last of a stable sort)
        best_score = self.hyp_scores.amax(dim=1, keepdim=True)
        tied = torch.where(self.hyp_scores == best_score, self.hyp_order, torch.full_like(self.hyp_order, -1))
        best = tied.argmax(dim=1)
        batch = torch.arange(self.batch_size, device=self.device)
        tokens = self.hyp_tokens[batch, best]
        lengths = self.hyp_len[batch, best]
        out_len = int(min(int(lengths.max()) + 1, cfg.max_length))
        out = tokens[:, :out_len].clone()
        positions = torch.arange(out_len, device=self.device).unsqueeze(0)
        out.masked_fill_(positions >= lengths.unsqueeze(1), cfg.pad_token_id)
        out.masked_fill_((positions == lengths.unsqueeze(1)) & (lengths.unsqueeze(1) < cfg.max_length),
                         cfg.eos_token_id)
        return out


def make_search(config: GenerationConfig, batch_size: int, device: torch.device) -> _Search:
    """The search for ``config`` over ``batch_size`` inputs."""
    return BeamSearch(config, batch_size, device) if config.is_beam_search else TokenSearch(config, batch_size, device)
