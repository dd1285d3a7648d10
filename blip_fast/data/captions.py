"""Caption cleaning as BLIP's ``data/utils.py`` does it."""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_RUNS_OF_WHITESPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Lower-case, replace ``. ! " ( ) * # : ; ~`` with spaces, collapse runs of whitespace, strip,
    and keep at most ``max_words`` space-separated words (BLIP's pretraining uses 30).

    Same output as the original for every input (a single tab or newline inside the caption is kept,
    as there).
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a string, got {type(caption).__name__}: {caption!r}")
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _RUNS_OF_WHITESPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
