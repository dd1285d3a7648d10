"""Generation with the MED decoder: the fast cached path, the original's algorithm, and plain
recomputation.

``decoding='fast'`` (default):
  * the cross-attention keys/values of the image tokens are computed once per generation (not per
    step), for the images only: the beams of an image share them (their queries are folded into one
    attention per image, nothing is repeated per beam);
  * self-attention keys/values live in a preallocated :class:`~blip_fast.models.kv_cache.DecoderKVCache`;
    a step runs the decoder on one token per row (attention of one query against the cache through
    ``blip_fast.ops.attention``);
  * the search (:mod:`~blip_fast.generation.search`) runs on the device without host
    synchronisation; on CUDA the whole step (decoder + search + beam reorder) is captured once in a
    CUDA graph with fixed shapes and replayed, which removes the per-step launch overhead that
    dominates small batches. Graphs and their buffers are cached per decoder and shape;
  * the decoder runs as its decoding copy (:mod:`~blip_fast.generation.weights`): linear weights
    cast once to the autocast dtype, query/key/value projections stacked into one.

``decoding='original'``: what the original BLIP did through transformers' ``generate``: the image
embeddings repeated per beam, self-attention ``past_key_values`` tuples concatenated each step,
cross-attention keys/values recomputed from the image embeddings at every step, per-input Python
loops in beam search. ``decoding='recompute'``: no cache at all, the whole sequence every step.
Both use :func:`~blip_fast.generation.reference.reference_search`.
"""
from __future__ import annotations

import collections
import logging
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import ops
from ..cuda_graph import CUDAGraphStep
from ..models.kv_cache import DecoderKVCache
from . import weights as decoding_weights
from .config import GenerationConfig
from .reference import reference_search
from .search import make_search

Tensor = torch.Tensor
logger = logging.getLogger("blip_fast.generation")

__all__ = ["generate", "release_generation_state", "DECODINGS"]

DECODINGS = ("fast", "original", "recompute")
MAX_SESSIONS = 4


# -- helpers ---------------------------------------------------------------------------------------
def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in effect for ``device``'s type, or None when autocast is off."""
    kind = device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError):  # torch < 2.4: no device-type argument
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _compute_decoder(decoder: nn.Module, device: torch.device) -> nn.Module:
    """The decoding copy to run: linear weights in the autocast dtype (cast once), stacked QKV."""
    dtype = _autocast_dtype(device) or decoder.cls.predictions.decoder.weight.dtype
    return decoding_weights.decoding_copy(decoder, dtype)


def _last_logits(decoder: nn.Module, input_ids: Tensor, **kwargs: Any) -> Tensor:
    return decoder(input_ids, return_dict=True, logits_to_keep=1, **kwargs).logits[:, -1, :]


def _encoder_keep(mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None:
        return None
    return mask if mask.dtype == torch.bool else mask != 0


# -- the fast path ---------------------------------------------------------------------------------
class _FastDecoding:
    """Cached decoding state of one generation shape: cross K/V, self-attention cache, search.

    With ``static=True`` every tensor has a fixed shape and both phases (:meth:`first`: cross K/V,
    prompt, first search step; :meth:`step`: one token) can be captured as CUDA graphs.
    """

    def __init__(self, decoder: nn.Module, config: GenerationConfig, batch_size: int, states: Tensor,
                 has_mask: bool, prompt_shape: Tuple[int, int], kv_dtype: torch.dtype, static: bool):
        cfg = decoder.config
        device = states.device
        self.decoder = decoder
        self.config = config
        self.static = static
        self.prompt_length = prompt_shape[1]
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        num_images, image_tokens = states.shape[:2]
        with torch.inference_mode(False), torch.no_grad():
            self.cache = DecoderKVCache(cfg.num_hidden_layers, prompt_shape[0], heads, head_dim, config.max_length,
                                        device, kv_dtype, static=static)
            self.search = make_search(config, batch_size, device)
            self.encoder_kv: List[Tuple[Tensor, Tensor]] = []
            self.states, self.mask, self.prompt = states, None, None
            if static:  # fixed buffers the graphs read; each generation copies its inputs in
                shape = (num_images, image_tokens, heads * head_dim)
                self.encoder_kv = [(self._heads(torch.empty(shape, device=device, dtype=kv_dtype), heads),
                                    self._heads(torch.empty(shape, device=device, dtype=kv_dtype), heads))
                                   for _ in range(cfg.num_hidden_layers)]
                self.states = torch.empty_like(states)
                self.prompt = torch.empty(prompt_shape, dtype=torch.long, device=device)
                if has_mask:
                    self.mask = torch.ones(num_images, image_tokens, dtype=torch.bool, device=device)
        self.graphs: Dict[str, CUDAGraphStep] = {}
        self.graph_error: Optional[str] = None

    @staticmethod
    def _heads(x: Tensor, heads: int) -> Tensor:
        b, n, width = x.shape
        return x.view(b, n, heads, width // heads).permute(0, 2, 1, 3)

    def load(self, states: Tensor, mask: Optional[Tensor], prompt_rows: Tensor,
             generator: Optional[torch.Generator]) -> None:
        """The new inputs (copied into the fixed buffers when static), a fresh cache and search."""
        if self.static:
            self.states.copy_(states)
            self.prompt.copy_(prompt_rows)
            if self.mask is not None:
                self.mask.copy_(mask)
        else:
            self.states, self.mask, self.prompt = states, mask, prompt_rows
        self.cache.reset()
        self.search.reset(prompt_rows, generator)

    def _after_update(self) -> None:
        if self.config.is_beam_search:
            self.cache.reorder(self.search.beam_idx)

    def first(self) -> None:
        """Cross-attention K/V of the images (once for the whole generation; the beams of an image
        share them), the prompt through the decoder, the first search step."""
        self.cache.length = 0  # host state: the same at a warm-up, a capture and eager runs
        layers = self.decoder.bert.encoder.layer
        if self.static:
            for layer, (k_buf, v_buf) in zip(layers, self.encoder_kv):
                k, v = layer.crossattention.self.project_kv(self.states)
                k_buf.copy_(k)
                v_buf.copy_(v)
        else:
            self.encoder_kv = [layer.crossattention.self.project_kv(self.states) for layer in layers]
        logits = _last_logits(self.decoder, self.prompt, past_key_values=self.cache, encoder_kv=self.encoder_kv,
                              encoder_attention_mask=self.mask)
        self.search.update(logits)
        self._after_update()

    def step(self) -> None:
        """One decode step: the last tokens through the decoder, the search, the beam reorder."""
        logits = _last_logits(self.decoder, self.search.next_tokens.view(-1, 1), past_key_values=self.cache,
                              encoder_kv=self.encoder_kv, encoder_attention_mask=self.mask)
        self.search.update(logits)
        self._after_update()

    def run(self, use_graph: bool) -> Tensor:
        search = self.search
        self._run("first", self.first, use_graph)
        self.cache.length = self.prompt_length  # a replay runs no Python
        search.host_len += 1
        while not search.done_on_host:
            self._run("step", self.step, use_graph)
            search.host_len += 1
        return search.result()

    def _run(self, name: str, fn, use_graph: bool) -> None:
        graph = self.graphs.get(name)
        if graph is not None:
            graph()  # replay
        elif not use_graph or self.graph_error is not None:
            fn()
        else:
            self._capture(name, fn)

    def _capture(self, name: str, fn) -> None:
        """One real run of ``fn`` (the warm-up, on a side stream), then its capture."""
        dtype = _autocast_dtype(torch.device("cuda"))
        try:
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None,
                                cache_enabled=False):
                self.graphs[name] = CUDAGraphStep(fn, warmup=1)
        except Exception as exc:  # not capturable here (an op that synchronises): decode eagerly
            self.graph_error = f"{type(exc).__name__}: {exc}"
            logger.warning("blip_fast generation: CUDA graph capture failed, decoding without graphs (%s)",
                           self.graph_error)


class _DecoderState:
    """Fast-decoding sessions of one decoder (LRU), dropped when its tensors are replaced."""

    def __init__(self) -> None:
        self.signature: Optional[Tuple] = None
        self.sessions: "collections.OrderedDict[Tuple, _FastDecoding]" = collections.OrderedDict()


_STATES: "weakref.WeakKeyDictionary[nn.Module, _DecoderState]" = weakref.WeakKeyDictionary()


def release_generation_state(decoder: nn.Module) -> None:
    """Free the cached CUDA graphs, buffers and decoding copies of ``decoder``."""
    _STATES.pop(decoder, None)
    decoding_weights.release(decoder)


def _session(decoder: nn.Module, compute: nn.Module, key: Tuple, build) -> _FastDecoding:
    state = _STATES.setdefault(decoder, _DecoderState())
    signature = decoding_weights.tensor_signature(compute)
    if state.signature != signature:
        state.sessions.clear()
        state.signature = signature
    session = state.sessions.get(key)
    if session is None:
        session = state.sessions[key] = build()
        while len(state.sessions) > MAX_SESSIONS:
            state.sessions.popitem(last=False)
    state.sessions.move_to_end(key)
    return session


def _fast(decoder: nn.Module, encoder_hidden_states: Tensor, encoder_mask: Optional[Tensor], prompt_rows: Tensor,
          config: GenerationConfig, batch_size: int, cuda_graph: Optional[bool], static_cache: Optional[bool],
          generator: Optional[torch.Generator]) -> Tensor:
    device = encoder_hidden_states.device
    on_cuda = device.type == "cuda"
    if cuda_graph and not on_cuda:
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    use_graph = on_cuda if cuda_graph is None else bool(cuda_graph)
    if use_graph and generator is not None:
        use_graph = False  # a custom generator's state is not captured: sample eagerly
    static = use_graph or bool(static_cache)
    compute = _compute_decoder(decoder, device)
    with compute.backend_context():
        kv_dtype = _autocast_dtype(device) or compute.bert.encoder.layer[0].crossattention.self.key.weight.dtype
        mask = _encoder_keep(encoder_mask)

        def build() -> _FastDecoding:
            return _FastDecoding(compute, config, batch_size, encoder_hidden_states, mask is not None,
                                 tuple(prompt_rows.shape), kv_dtype, static)

        if static:
            # a graph replays the op implementations chosen at capture: key on what decides them
            backend = ops.get_backend()
            selection = (backend, tuple(ops.AUTO_ORDER)) if backend == ops.AUTO else (backend,)
            key = (config, batch_size, tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype,
                   mask is not None, tuple(prompt_rows.shape), kv_dtype, _autocast_dtype(device), selection, device,
                   use_graph)
            session = _session(decoder, compute, key, build)
        else:
            session = build()
        session.load(encoder_hidden_states, mask, prompt_rows, generator)
        return session.run(use_graph)


# -- the original algorithm and plain recomputation -----------------------------------------------
class _OriginalSteps:
    """transformers-4.15 ``generate`` on BLIP's decoder: ``past_key_values`` tuples, cross K/V
    recomputed from the (per-beam repeated) image embeddings at every step."""

    def __init__(self, decoder: nn.Module, encoder_hidden_states: Tensor, encoder_mask: Optional[Tensor]):
        self.decoder = decoder
        self.states = encoder_hidden_states
        self.mask = encoder_mask
        self.past: Optional[Any] = None

    def step(self, input_ids: Tensor) -> Tensor:
        inputs = input_ids if self.past is None else input_ids[:, -1:]
        out = self.decoder(inputs, attention_mask=input_ids.new_ones(input_ids.shape), past_key_values=self.past,
                           encoder_hidden_states=self.states, encoder_attention_mask=self.mask, use_cache=True,
                           return_dict=True)
        self.past = out.past_key_values
        return out.logits[:, -1, :]

    def reorder(self, beam_idx: Tensor) -> None:
        self.past = self.decoder._reorder_cache(self.past, beam_idx)


def _recompute_step(decoder: nn.Module, states: Tensor, mask: Optional[Tensor]):
    def step(input_ids: Tensor) -> Tensor:
        return _last_logits(decoder, input_ids, encoder_hidden_states=states, encoder_attention_mask=mask,
                            use_cache=False)
    return step


# -- entry point -----------------------------------------------------------------------------------
def generate(decoder: nn.Module, encoder_hidden_states: Tensor, prompt_ids: Tensor, config: GenerationConfig,
             encoder_attention_mask: Optional[Tensor] = None, decoding: str = "fast",
             cuda_graph: Optional[bool] = None, static_cache: Optional[bool] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Generate token ids with a MED decoder (:class:`~blip_fast.models.med.BertLMHeadModel`).

    Args:
        decoder: the text decoder; eval mode is expected (dropout would make steps random).
        encoder_hidden_states: ``(B, N, encoder_width)`` what the decoder cross-attends to
            (image embeddings for captioning, question states for VQA).
        prompt_ids: ``(B, L0)`` or ``(L0,)`` int64, starting with the bos token.
        config: :class:`GenerationConfig`.
        encoder_attention_mask: ``(B, N)`` 0/1 or None (all kept).
        decoding: ``'fast'``, ``'original'`` or ``'recompute'`` (see the module docstring).
        cuda_graph: fast path only; None: on CUDA devices; False: never; True: required.
        static_cache: fast path only; run the fixed-shape (graph-capturable) step without a graph
            (for tests on the CPU).
        generator: random generator for sampling (a custom one disables CUDA graphs).

    Returns:
        ``(B, length)`` int64 token ids, the prompt included, as transformers' ``generate``.
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    if encoder_hidden_states.dim() != 3:
        raise ValueError("encoder_hidden_states must be (batch, tokens, width), got "
                         f"{tuple(encoder_hidden_states.shape)}")
    batch_size = encoder_hidden_states.shape[0]
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0).expand(batch_size, -1)
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != batch_size:
        raise ValueError(f"prompt_ids must be (batch={batch_size}, length) or (length,), got {tuple(prompt_ids.shape)}")
    config.validate(prompt_ids.shape[1])
    if config.max_length > decoder.config.max_position_embeddings:
        raise ValueError(f"max_length={config.max_length} exceeds the decoder's "
                         f"{decoder.config.max_position_embeddings} position embeddings")
    if decoder.training:
        logger.warning("blip_fast generation: the decoder is in training mode (dropout on); call model.eval()")
    prompt_ids = prompt_ids.to(encoder_hidden_states.device, torch.long)
    groups = config.rows_per_input
    prompt_rows = prompt_ids.repeat_interleave(groups, dim=0) if groups > 1 else prompt_ids.contiguous()
    with torch.no_grad():
        if decoding == "fast":
            return _fast(decoder, encoder_hidden_states, encoder_attention_mask, prompt_rows, config, batch_size,
                         cuda_graph, static_cache, generator)
        states = encoder_hidden_states.repeat_interleave(groups, dim=0) if groups > 1 else encoder_hidden_states
        mask = None
        if encoder_attention_mask is not None:
            mask = encoder_attention_mask.repeat_interleave(groups, dim=0) if groups > 1 else encoder_attention_mask
        if decoding == "original":
            steps = _OriginalSteps(decoder, states, mask)
            return reference_search(steps.step, steps.reorder, prompt_rows, config, batch_size, generator)
        return reference_search(_recompute_step(decoder, states, mask), lambda idx: None, prompt_rows, config,
                                batch_size, generator)
