"""BLIP_VQA: visual question answering (answer generation or ranking of candidate answers), as the
original ``models/blip_vqa.py``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import tokenizer as tok
from ..generation import GenerationConfig, generate as generate_tokens, release_generation_state
from ..tokenizer import TextInput, TokenizedText
from .base import BlipBase
from .blip import load_checkpoint
from .med import BertConfig, BertLMHeadModel, BertModel, load_med_config
from .vit import create_vit

Tensor = torch.Tensor

INFERENCE_MODES = ("rank", "generate")


class BLIP_VQA(BlipBase):
    """``forward(image, question, answer=None, n=None, weights=None, train=True, inference='rank', k_test=128)``.

    * train: ``answer`` holds ``sum(n)`` answers, ``n[b]`` of them for question ``b`` with
      ``weights`` ``(sum(n),)``; returns ``sum(weights * answer_loss) / B`` (answer losses are
      per-sequence sums of the label-smoothed cross-entropy).
    * ``inference='generate'``: answers as strings (beam search, 3 beams, at most 10 tokens).
    * ``inference='rank'``: ``answer`` is the candidate list (tokenised, ``[DEC]`` first, as the
      original's callers pass it; strings are tokenised here the same way); returns ``(B,)`` int64
      indices of the best candidate among the ``k_test`` whose first token is most likely.

    Questions: padding to the longest, truncation at 35, ``[ENC]`` first. The decoder
    cross-attends to the question encoder's states (with an all-ones mask, as the original).
    """

    question_max_length = 35

    def __init__(self, med_config: Union[str, Dict[str, Any], BertConfig, None] = "configs/med_config.json",
                 image_size: int = 480, vit: Union[str, Dict[str, Any]] = "base", vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, tokenizer: Optional[Any] = None):
        super().__init__(tokenizer)
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer,
                                                       drop_path_rate=0.1)
        encoder_config = load_med_config(med_config, encoder_width=vision_width)
        self.text_encoder = BertModel(config=encoder_config, add_pooling_layer=False)
        decoder_config = load_med_config(med_config)  # cross-attends to the question states
        self.text_decoder = BertLMHeadModel(config=decoder_config)

    # -- pieces -------------------------------------------------------------------------------------
    def encode_questions(self, image: Tensor, question: TextInput):
        """Question states ``(B, L, 768)`` of the image-grounded encoder and the question mask."""
        image_embeds = self.visual_encoder(image)
        q = self.tokens(question, image.device, padding="longest", max_length=self.question_max_length)
        if q.input_ids.shape[0] != image.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {q.input_ids.shape[0]} questions")
        input_ids = q.input_ids.clone()
        input_ids[:, 0] = self.enc_token_id
        states = self.text_encoder(input_ids, attention_mask=q.attention_mask, encoder_hidden_states=image_embeds,
                                   return_dict=True).last_hidden_state
        return states, q.attention_mask

    def _answers(self, answer: TextInput, device: torch.device) -> TokenizedText:
        """Strings: tokenised (padding to the longest, no truncation) with ``[DEC]`` first;
        tokenised text is taken as given (the original's callers set ``[DEC]`` themselves)."""
        if tok.needs_tokenizer(answer):
            tokens = self.tokens(answer, device, padding="longest", max_length=None, truncation=False)
            ids = tokens.input_ids.clone()
            ids[:, 0] = self.bos_token_id
            return TokenizedText(ids, tokens.attention_mask)
        return self.tokens(answer, device, padding="longest", max_length=None, truncation=False)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, image: Tensor, question: TextInput, answer: Optional[TextInput] = None,
                n: Optional[Sequence[int]] = None, weights: Optional[Tensor] = None, train: bool = True,
                inference: str = "rank", k_test: int = 128) -> Union[Tensor, List[str]]:
        with self.backend_context():
            if train:
                if answer is None or n is None or weights is None:
                    raise ValueError("training needs answer, n (answers per question) and weights")
                return self._train_loss(image, question, answer, n, weights)
            if inference not in INFERENCE_MODES:
                raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
            states, question_atts = self.encode_questions(image, question)
            if inference == "generate":
                return self.generate_answers(states)
            if answer is None:
                raise ValueError("inference='rank' needs the candidate answers (answer=...)")
            answers = self._answers(answer, image.device)
            return self.rank_answer(states, question_atts, answers.input_ids, answers.attention_mask, k_test)

    def _train_loss(self, image: Tensor, question: TextInput, answer: TextInput, n: Sequence[int],
                    weights: Tensor) -> Tensor:
        states, question_atts = self.encode_questions(image, question)
        answers = self._answers(answer, image.device)
        counts = torch.as_tensor(list(n), device=image.device)
        if counts.numel() != image.shape[0] or int(counts.sum()) != answers.input_ids.shape[0]:
            raise ValueError(f"n must give, for each of the {image.shape[0]} questions, its number of answers, "
                             f"summing to the {answers.input_ids.shape[0]} answers given")
        targets = answers.input_ids.masked_fill(answers.input_ids == self.pad_token_id, -100)
        output = self.text_decoder(answers.input_ids, attention_mask=answers.attention_mask,
                                   encoder_hidden_states=states.repeat_interleave(counts, dim=0),
                                   encoder_attention_mask=question_atts.repeat_interleave(counts, dim=0),
                                   labels=targets, return_dict=True, reduction="none")
        loss = weights.to(output.loss.dtype) * output.loss
        return loss.sum() / image.shape[0]

    def generate_answers(self, question_states: Tensor, num_beams: int = 3, max_length: int = 10,
                         min_length: int = 1, decoding: str = "fast", cuda_graph: Optional[bool] = None) -> List[str]:
        """Answers by beam search over the decoder cross-attending to ``question_states``
        (all positions, as the original's all-ones mask)."""
        config = GenerationConfig(max_length=max_length, min_length=min_length, num_beams=num_beams,
                                  eos_token_id=self._token_id("sep_token_id", tok.SEP_TOKEN_ID),
                                  pad_token_id=self.pad_token_id)
        bos = torch.tensor([self.bos_token_id], device=question_states.device)
        ids = generate_tokens(self.text_decoder, question_states, bos, config, decoding=decoding, cuda_graph=cuda_graph)
        return [self.tokenizer.decode(o, skip_special_tokens=True, clean_up_tokenization_spaces=True) for o in ids]

    def rank_answer(self, question_states: Tensor, question_atts: Tensor, answer_ids: Tensor, answer_atts: Tensor,
                    k: int) -> Tensor:
        """Index ``(num_questions,)`` of the best candidate per question.

        The ``k`` candidates whose first token is most likely after the start token are scored by
        their whole sequence (minus the per-sequence label-smoothed loss, as the original); the
        question's keys/values are computed once for its ``k`` candidates.
        """
        num_ques = question_states.shape[0]
        k = min(k, answer_ids.shape[0])
        start_ids = answer_ids[0, 0].repeat(num_ques, 1)  # the bos token
        start_output = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                         encoder_attention_mask=question_atts, return_dict=True)
        logits = start_output.logits[:, 0, :]
        prob_first_token = F.softmax(logits.float(), dim=1).index_select(dim=1, index=answer_ids[:, 1])
        _, topk_ids = prob_first_token.topk(k, dim=1)

        input_ids = answer_ids.index_select(0, topk_ids.reshape(-1))
        input_atts = answer_atts.index_select(0, topk_ids.reshape(-1))
        targets = input_ids.masked_fill(input_ids == self.pad_token_id, -100)
        # the k candidates of a question share its cross-attention keys/values (no tiling)
        encoder_kv = self.text_decoder.bert.precompute_cross_kv(question_states)
        output = self.text_decoder(input_ids, attention_mask=input_atts, encoder_kv=encoder_kv,
                                   encoder_attention_mask=question_atts, labels=targets, return_dict=True,
                                   reduction="none")
        log_probs_sum = -output.loss.view(num_ques, k)
        max_topk_ids = log_probs_sum.argmax(dim=1)
        return topk_ids.gather(1, max_topk_ids.unsqueeze(1)).squeeze(1)

    def release_generation_cache(self) -> None:
        """Free the CUDA graphs, buffers and low-precision weights kept for answer generation."""
        release_generation_state(self.text_decoder)


def blip_vqa(pretrained: str = "", **kwargs: Any) -> BLIP_VQA:
    """Build :class:`BLIP_VQA`; with ``pretrained`` (path or URL) load it (missing keys are
    reported in the log, as the original does not assert)."""
    model = BLIP_VQA(**kwargs)
    if pretrained:
        model, _ = load_checkpoint(model, pretrained)
    return model
