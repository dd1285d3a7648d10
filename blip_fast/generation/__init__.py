"""Generation for BLIP's decoder: beam search, greedy and nucleus sampling with transformers'
``generate`` semantics (4.15, as the original BLIP called it), on a decoding path that computes the
image tokens' cross-attention keys/values once per generation, caches self-attention keys/values
in place and, on CUDA, replays each step as a CUDA graph."""
from .config import GenerationConfig
from .engine import DECODINGS, generate, release_generation_state
from .reference import reference_search

__all__ = ["GenerationConfig", "generate", "release_generation_state", "reference_search", "DECODINGS"]
