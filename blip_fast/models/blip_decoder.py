"""BLIP_Decoder: image captioning (LM loss for fine-tuning, ``generate`` for captions), as the
original ``models/blip.py`` BLIP_Decoder, with a fast generation path."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .. import tokenizer as tok
from ..checkpoint import require_complete
from ..generation import GenerationConfig, generate as generate_tokens, release_generation_state
from ..tokenizer import TextInput
from .base import BlipBase
from .blip import load_checkpoint
from .med import BertConfig, BertLMHeadModel, load_med_config
from .vit import create_vit

Tensor = torch.Tensor

DEFAULT_PROMPT = "a picture of "
#: ``[DEC] a picture of``: the default prompt as the original feeds it (tokenised, bos first, no [SEP]).
DEFAULT_PROMPT_IDS = (tok.BOS_TOKEN_ID, 1037, 3861, 1997)


class BLIP_Decoder(BlipBase):
    """Captioning model: ``forward(image, caption) -> loss``, ``generate(image, ...) -> captions``.

    Args (as the original): ``med_config``, ``image_size`` (384), ``vit``, ``vit_grad_ckpt``,
    ``vit_ckpt_layer``, ``prompt`` (``'a picture of '``); ``tokenizer`` (object, vocab path or None).

    Captions are tokenised with padding to the longest and truncation at 40 tokens, ``[DEC]``
    first; the prompt's tokens get no loss.
    """

    caption_max_length = 40

    def __init__(self, med_config: Union[str, Dict[str, Any], BertConfig, None] = "configs/med_config.json",
                 image_size: int = 384, vit: Union[str, Dict[str, Any]] = "base", vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, prompt: str = DEFAULT_PROMPT, tokenizer: Optional[Any] = None):
        super().__init__(tokenizer)
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        config = load_med_config(med_config, encoder_width=vision_width)
        self.text_decoder = BertLMHeadModel(config=config)
        self.prompt = prompt

    # -- the prompt ---------------------------------------------------------------------------------
    def _prompt_tokens(self) -> List[int]:
        """The prompt tokenised (``[CLS] ... [SEP]``); the default prompt needs no vocabulary."""
        if self.prompt == DEFAULT_PROMPT and (self._tokenizer is None or isinstance(self._tokenizer, str)):
            return [tok.CLS_TOKEN_ID, *DEFAULT_PROMPT_IDS[1:], tok.SEP_TOKEN_ID]
        return list(self.tokenizer(self.prompt).input_ids)

    @property
    def prompt_length(self) -> int:
        """Tokens of ``[DEC] + prompt`` (4 for the default prompt): their targets are ignored."""
        return len(self._prompt_tokens()) - 1

    def prompt_ids(self, device: Optional[torch.device] = None) -> Tensor:
        """``(prompt_length,)`` int64: ``[DEC]`` and the prompt, what generation starts from."""
        ids = self._prompt_tokens()[:-1]
        ids[0] = self.bos_token_id
        return torch.tensor(ids, dtype=torch.long, device=device)

    # -- training -----------------------------------------------------------------------------------
    def forward(self, image: Tensor, caption: TextInput) -> Tensor:
        """LM loss (label smoothing 0.1, mean over the non-prompt, non-pad targets) of ``caption``
        (strings or tokenised text, ``B`` of them) given ``image`` ``(B, 3, S, S)``."""
        with self.backend_context():
            image_embeds = self.visual_encoder(image)
            text = self.tokens(caption, image.device, padding="longest", max_length=self.caption_max_length)
            if text.input_ids.shape[0] != image.shape[0]:
                raise ValueError(f"{image.shape[0]} images but {text.input_ids.shape[0]} captions")
            input_ids = text.input_ids.clone()
            input_ids[:, 0] = self.bos_token_id
            targets = input_ids.masked_fill(input_ids == self.pad_token_id, -100)
            targets[:, :self.prompt_length] = -100
            output = self.text_decoder(input_ids, attention_mask=text.attention_mask,
                                       encoder_hidden_states=image_embeds, labels=targets, return_dict=True)
            return output.loss

    # -- captioning ---------------------------------------------------------------------------------
    def generate_ids(self, image: Tensor, sample: bool = False, num_beams: int = 3, max_length: int = 30,
                     min_length: int = 10, top_p: float = 0.9, repetition_penalty: Optional[float] = None, *,
                     top_k: int = 50, decoding: str = "fast", cuda_graph: Optional[bool] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
        """Token ids ``(B, length)`` of the generated captions, the prompt included (what the
        original's ``text_decoder.generate`` returns). Arguments: see :meth:`generate`."""
        if repetition_penalty is None:
            repetition_penalty = 1.1 if sample else 1.0  # the original hard-codes 1.1 for sampling
        config = GenerationConfig(max_length=max_length, min_length=min_length, num_beams=1 if sample else num_beams,
                                  do_sample=sample, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                  eos_token_id=self._token_id("sep_token_id", tok.SEP_TOKEN_ID),
                                  pad_token_id=self.pad_token_id)
        with self.backend_context(), torch.no_grad():
            image_embeds = self.visual_encoder(image)
            return generate_tokens(self.text_decoder, image_embeds, self.prompt_ids(image.device), config,
                                   decoding=decoding, cuda_graph=cuda_graph, generator=generator)

    def generate(self, image: Tensor, sample: bool = False, num_beams: int = 3, max_length: int = 30,
                 min_length: int = 10, top_p: float = 0.9, repetition_penalty: Optional[float] = None, *,
                 top_k: int = 50, decoding: str = "fast", cuda_graph: Optional[bool] = None,
                 generator: Optional[torch.Generator] = None) -> List[str]:
        """Captions of ``image`` ``(B, 3, S, S)``, the prompt stripped.

        As the original: beam search (``num_beams``, length penalty 1, no early stopping) or, with
        ``sample=True``, nucleus sampling (``top_p``, after transformers' default top-k 50);
        ``max_length`` / ``min_length`` count the prompt's tokens. ``repetition_penalty``: None
        gives the original's choice (1.0 for beam search; 1.1 for sampling, which the original
        hard-codes whatever is passed); a value is applied in both modes.

        ``decoding``: ``'fast'`` (cross-attention keys/values once per caption batch, in-place
        cache, CUDA graphs on GPUs), ``'original'`` (the original's per-step work) or
        ``'recompute'`` (no cache); all give the same tokens. ``cuda_graph=False`` turns graphs
        off; ``generator`` seeds sampling.
        """
        ids = self.generate_ids(image, sample, num_beams, max_length, min_length, top_p, repetition_penalty,
                                top_k=top_k, decoding=decoding, cuda_graph=cuda_graph, generator=generator)
        return self.decode_captions(ids)

    def decode_captions(self, ids: Union[Tensor, Sequence[Sequence[int]]]) -> List[str]:
        """Token ids -> caption strings with the prompt removed (as the original decodes them)."""
        captions = []
        for output in ids:
            text = self.tokenizer.decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            captions.append(text[len(self.prompt):])
        return captions

    def release_generation_cache(self) -> None:
        """Free the CUDA graphs, buffers and low-precision weights kept for fast generation."""
        release_generation_state(self.text_decoder)


def blip_decoder(pretrained: str = "", **kwargs: Any) -> BLIP_Decoder:
    """Build :class:`BLIP_Decoder`; with ``pretrained`` (path or URL) load it and require every key."""
    model = BLIP_Decoder(**kwargs)
    if pretrained:
        model, report = load_checkpoint(model, pretrained)
        require_complete(report, "BLIP_Decoder")
    return model
