"""Backend selection: context manager, process default, environment variable, errors, fallback."""
import logging
import os

import pytest
import torch

import blip_fast
from blip_fast import ops


def _qkv(b=2, h=2, lq=5, lk=7, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk)]


def test_default_is_auto_and_context_overrides(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert blip_fast.get_backend() == "auto"
    with blip_fast.use_backend("reference"):
        assert blip_fast.get_backend() == "reference"
        with blip_fast.use_backend("sdpa"):
            assert blip_fast.get_backend() == "sdpa"
        assert blip_fast.get_backend() == "reference"
    assert blip_fast.get_backend() == "auto"


def test_process_default_and_env(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "sdpa")
    assert blip_fast.get_backend() == "sdpa"
    blip_fast.set_backend("reference")
    try:
        assert blip_fast.get_backend() == "reference"
    finally:
        blip_fast.set_backend(None)
    assert blip_fast.get_backend() == "sdpa"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ops.BackendUnavailableError, match="unknown backend 'nope'"):
        with blip_fast.use_backend("nope"):
            pass


def test_explicit_backend_that_cannot_run_raises():
    q, k, v = _qkv()
    with blip_fast.use_backend("sdpa"):
        with pytest.raises(ops.BackendUnavailableError, match="need_weights"):
            ops.attention(q, k, v, need_weights=True)
        with pytest.raises(ops.BackendUnavailableError, match="no implementation of 'layer_norm'"):
            ops.layer_norm(q, None, None, 1e-5)


def test_auto_falls_back_and_logs_once(caplog):
    q, k, v = _qkv()
    ops._dispatch._logged_fallbacks.clear()
    with caplog.at_level(logging.INFO, logger="blip_fast.ops"):
        for _ in range(3):
            out, probs = ops.attention(q, k, v, need_weights=True)
    assert probs.shape == (2, 2, 5, 7)
    messages = [r.message for r in caplog.records if "attention runs on 'reference'" in r.message]
    assert len(messages) == 1


def test_model_level_override():
    from blip_fast.models.vit import VisionTransformer
    vit = VisionTransformer(img_size=32, embed_dim=16, depth=1, num_heads=2).eval()
    vit.set_backend("reference")
    seen = []
    original = ops._dispatch.resolve

    def spy(op, *a, **kw):
        seen.append(blip_fast.get_backend())
        return original(op, *a, **kw)

    ops._dispatch.resolve = spy
    try:
        vit(torch.randn(1, 3, 32, 32))
    finally:
        ops._dispatch.resolve = original
    assert seen and set(seen) == {"reference"}
    with pytest.raises(ops.BackendUnavailableError):
        vit.set_backend("nope")


def test_available_backends_reports_reasons():
    avail = blip_fast.available_backends()
    assert avail["reference"] is None and avail["sdpa"] is None
    assert "triton" in avail


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter case")
def test_auto_leaves_the_triton_interpreter_to_explicit_requests():
    from blip_fast.ops import _dispatch
    assert os.environ.get("TRITON_INTERPRET") == "1"
    if _dispatch.get_backend_object("triton").unavailable_reason is not None:
        pytest.skip("triton not importable here")
    q = torch.randn(1, 2, 5, 16)
    name, _ = _dispatch.resolve("attention", q, q, q)
    assert name != "triton"
    with blip_fast.use_backend("triton"):
        name, _ = _dispatch.resolve("attention", q, q, q)
        assert name == "triton"
        out = blip_fast.ops.attention(q, q, q)
    with blip_fast.use_backend("reference"):
        ref = blip_fast.ops.attention(q, q, q)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
