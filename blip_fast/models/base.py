"""What every top-level BLIP model shares: a lazily built tokenizer and the backend override."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .. import tokenizer as tok
from ._backend import BackendSelectable
from .pretrained import PretrainedMixin


class BlipBase(PretrainedMixin, BackendSelectable, nn.Module):
    """Base of BLIP_Pretrain / BLIP_ITM / BLIP_NLVR.

    ``tokenizer``: a tokenizer object, a vocab path / hub name for :func:`init_tokenizer`, or None
    (the default vocabulary). It is built on first use, so a model fed pre-tokenised captions
    never needs a vocabulary file.

    ``save_pretrained(folder)`` / ``from_pretrained(folder_or_hub_name)`` come from
    :class:`~blip_fast.models.pretrained.PretrainedMixin`.
    """

    def __init__(self, tokenizer: Optional[Union[str, Any]] = None):
        super().__init__()
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None or isinstance(self._tokenizer, str):
            self._tokenizer = tok.init_tokenizer(self._tokenizer)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    def _token_id(self, name: str, default: int) -> int:
        """A special token id, from the tokenizer when one is loaded, else BLIP's fixed id."""
        if self._tokenizer is None or isinstance(self._tokenizer, str):
            return default
        return int(getattr(self._tokenizer, name))

    @property
    def enc_token_id(self) -> int:
        return self._token_id("enc_token_id", tok.ENC_TOKEN_ID)

    @property
    def bos_token_id(self) -> int:
        return self._token_id("bos_token_id", tok.BOS_TOKEN_ID)

    @property
    def pad_token_id(self) -> int:
        return self._token_id("pad_token_id", tok.PAD_TOKEN_ID)

    def tokens(self, text: tok.TextInput, device: torch.device, padding: Union[str, bool],
               max_length: Optional[int], truncation: bool = True) -> tok.TokenizedText:
        """Captions (strings, tokenised here, or already tokenised) as ids + mask on ``device``."""
        tokenizer = self.tokenizer if tok.needs_tokenizer(text) else None
        return tok.as_tokens(tokenizer, text, device, padding=padding, max_length=max_length, truncation=truncation)
