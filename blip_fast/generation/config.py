"""What a generation call asks for: search, lengths, logits processing, special tokens."""
from __future__ import annotations

from dataclasses import dataclass

from .. import tokenizer as tok

__all__ = ["GenerationConfig"]


@dataclass(frozen=True)
class GenerationConfig:
    """Settings of one generation, with the semantics of transformers' ``generate`` as the original
    BLIP called it (transformers 4.15).

    * ``num_beams > 1`` and not ``do_sample``: beam search (``length_penalty``, ``early_stopping``);
      ``num_beams == 1``: greedy; ``do_sample``: nucleus sampling (top-k ``top_k`` then top-p
      ``top_p`` on the processed logits, one sample per row).
    * ``max_length`` / ``min_length`` count every token, the prompt included; before
      ``min_length`` the end token cannot be chosen.
    * ``repetition_penalty``: CTRL's penalty on every token already in the row (prompt included):
      a score below 0 is multiplied by it, above 0 divided by it (1.0: off).
    * ``eos_token_id`` ends a row (BLIP: ``[SEP]`` 102), ``pad_token_id`` fills finished rows.
    """

    max_length: int = 30
    min_length: int = 10
    num_beams: int = 3
    do_sample: bool = False
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool = False
    eos_token_id: int = tok.SEP_TOKEN_ID
    pad_token_id: int = tok.PAD_TOKEN_ID

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1 and not self.do_sample

    @property
    def rows_per_input(self) -> int:
        """Decoder rows per image: the beams in beam search, else one."""
        return self.num_beams if self.is_beam_search else 1

    def validate(self, prompt_length: int) -> "GenerationConfig":
        """Raise a clear ``ValueError`` for settings no search can run with; returns ``self``."""
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.do_sample and self.num_beams != 1:
            raise ValueError("sampling draws one sequence per input: use num_beams=1 with do_sample=True "
                             "(beam sampling is not part of BLIP)")
        if prompt_length < 1:
            raise ValueError("generation needs a prompt of at least one token (the [DEC] bos token)")
        if self.max_length <= prompt_length:
            raise ValueError(f"max_length={self.max_length} counts the prompt's {prompt_length} tokens too, so "
                             f"nothing would be generated: pass max_length > {prompt_length}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 is off), got {self.repetition_penalty}")
        if self.do_sample:
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        return self
