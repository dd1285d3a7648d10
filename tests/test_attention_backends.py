"""The ``flash_attn`` and ``xformers`` backends on the CPU: availability and errors, the varlen
plans that express BLIP's masks for them (against the reference, forward and backward), the
flash-attn call path against a double of flash-attn's documented API, and the measured-timings
rule under which ``auto`` may pick them. Their GPU tests: tests/test_attention_backends_gpu.py.
"""
from __future__ import annotations

import json
import logging
import types

import pytest
import torch

import blip_fast
from blip_fast import ops
from blip_fast.ops import _dispatch, _varlen, flash_attn_backend, measured, xformers_backend
from blip_fast.ops import reference as ref
from conftest import rel_err

LIBRARY_BACKENDS = ("xformers", "flash_attn")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001
        return False
    return True


# --------------------------------------------------------------------- availability, dispatch

@pytest.mark.parametrize("name, module, hint", [("xformers", "xformers.ops", "pip install xformers"),
                                                ("flash_attn", "flash_attn", "pip install flash-attn")])
def test_unavailable_backend_says_why_and_how_to_install(name, module, hint):
    if _importable(module) and torch.cuda.is_available():
        pytest.skip(f"{module} is importable here")
    reason = blip_fast.available_backends()[name]
    assert reason is not None
    if not _importable(module):
        assert hint in reason
    q = torch.randn(2, 2, 5, 8)
    with blip_fast.use_backend(name), pytest.raises(ops.BackendUnavailableError) as err:
        ops.attention(q, q, q)
    assert f"backend {name!r} cannot run attention" in str(err.value)
    if not _importable(module):
        assert hint in str(err.value)


def test_xformers_whose_extension_does_not_load_is_unavailable_with_the_build_mismatch(monkeypatch):
    """The xformers 0.0.35 wheel under torch 2.11 imports, but its C++/CUDA library does not load
    and no kernel runs: the backend must say so up front instead of declining every call."""
    import sys

    class LoadError(Exception):
        build_info = types.SimpleNamespace(torch_version="2.10.0+cu128", cuda_version=1208)

    package = types.ModuleType("xformers")
    package.__version__, package._has_cpp_library = "0.0.35", False
    package._cpp_lib = types.SimpleNamespace(_cpp_library_load_exception=LoadError())
    package.ops = types.ModuleType("xformers.ops")
    package.ops.fmha = types.ModuleType("xformers.ops.fmha")
    for name, module in (("xformers", package), ("xformers._cpp_lib", package._cpp_lib),
                         ("xformers.ops", package.ops), ("xformers.ops.fmha", package.ops.fmha)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = xformers_backend.load().unavailable_reason
    assert "C++/CUDA extension does not load (built for torch 2.10.0+cu128" in reason and "pip install xformers" in reason


def test_auto_order_and_cpu_routing_unchanged():
    assert ops.AUTO_ORDER == ["cuda", "triton", "flash_attn", "xformers", "sdpa", "reference"]
    assert set(LIBRARY_BACKENDS) <= set(ops.known_backends())
    q = torch.randn(2, 2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert _dispatch.resolve("attention", q, q, q)[0] == "sdpa"
    assert _dispatch.resolve("attention", q, q, q, key_padding_mask=mask, causal=True)[0] == "sdpa"
    assert _dispatch.resolve("attention", q, q, q, need_weights=True)[0] == "reference"
    for op in ("layer_norm", "bias_gelu"):
        for name in LIBRARY_BACKENDS:
            assert op not in _dispatch.get_backend_object(name).ops


def test_auto_skips_an_unmeasured_library_backend_and_logs_why(monkeypatch, caplog):
    """Even where it can run a call, auto passes a library backend over without a measurement."""
    calls = []

    def fake_attention(*args, **kwargs):
        calls.append(1)
        return ref.attention(*args, **kwargs)

    backend = ops.Backend("xformers", ops={"attention": fake_attention}, checks={"attention": lambda *a, **k: None},
                          auto_checks={"attention": xformers_backend._auto_attention})
    monkeypatch.setitem(_dispatch._REGISTRY, "xformers", backend)
    q = torch.randn(2, 2, 5, 16)
    _dispatch._logged_fallbacks.clear()
    with caplog.at_level(logging.INFO, logger="blip_fast.ops"):
        name, _ = _dispatch.resolve("attention", q, q, q)
    assert name == "sdpa" and not calls
    assert any("xformers: no measurement" in r.message for r in caplog.records)
    with blip_fast.use_backend("xformers"):
        ops.attention(q, q, q)
    assert calls == [1]


@pytest.mark.parametrize("module", [xformers_backend, flash_attn_backend])
def test_capability_reasons(module):
    q = torch.randn(2, 2, 5, 16)
    assert "CUDA tensors only" in module.why_not_attention(q, q, q)
    assert "need_weights" in module.why_not_attention(q, q, q, need_weights=True)
    assert "4-D" in module.why_not_attention(q[0], q[0], q[0])


# ---------------------------------------------------------------------------- varlen plans

def _torch_varlen(scale):
    """A varlen kernel in plain PyTorch: packed sequences, bottom-right causal per sequence."""
    def kernel(q, k, v, seg):
        assert q.shape[0] == sum(seg.q_lens) and k.shape[0] == sum(seg.k_lens)
        outs, qs, ks = [], 0, 0
        for nq, nk in zip(seg.q_lens, seg.k_lens):
            assert nq > 0 and nk > 0 and (nk >= nq or not seg.causal)
            outs.append(_attend(q[qs:qs + nq][None], k[ks:ks + nk][None], v[ks:ks + nk][None], scale, seg.causal)[0])
            qs, ks = qs + nq, ks + nk
        return torch.cat(outs)
    return kernel


def _attend(q, k, v, scale, causal):
    """(B, L, H, D) attention, causal aligned bottom right, rows with no key are zeros."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lq, lk = q.shape[1], k.shape[1]
    if causal:
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _mask(kind, b, lk, gen):
    if kind == "none":
        return None
    lens = torch.randint(1, lk + 1, (b,), generator=gen)
    lens[0] = lk
    if kind == "empty_row":
        lens[-1] = 0
    if kind == "all_empty":
        lens[:] = 0
    mask = torch.arange(lk)[None, :] < lens[:, None]
    if kind == "not_prefix":
        mask = mask[:, torch.randperm(lk, generator=gen)]
    return mask


MASK_KINDS = ["none", "prefix", "empty_row", "all_empty", "not_prefix"]
SHAPES = [(1, 1), (5, 5), (9, 9), (4, 9), (1, 9), (9, 4), (9, 1)]  # (Lq, Lk)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("lq, lk", SHAPES)
def test_varlen_plan_matches_reference(lq, lk, kind, causal):
    gen = torch.Generator().manual_seed(lq * 100 + lk)
    b, h, d = 4, 2, 8
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for n in (lq, lk, lk))
    mask = _mask(kind, b, lk, gen)
    scale = d ** -0.5
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    if mask is None:
        out = _varlen.attend_dense(qb, kb, vb, causal, lambda q_, k_, v_, c: _attend(q_, k_, v_, scale, c))
    else:
        try:
            plan = _varlen.build_plan(mask, causal, lq, lk)
        except _varlen.CausalMaskNotPrefix:
            assert causal and kind == "not_prefix"
            return
        if plan is None:
            assert bool(mask.all())
            out = _varlen.attend_dense(qb, kb, vb, causal, lambda q_, k_, v_, c: _attend(q_, k_, v_, scale, c))
        else:
            assert len(plan.segments) <= 2
            out = _varlen.attend_packed(plan, qb, kb, vb, _torch_varlen(scale))
    out = out.transpose(1, 2)
    expected = ref.attention(q, k, v, key_padding_mask=mask, causal=causal)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad(out, (q, k, v), grad)
    want_grads = torch.autograd.grad(expected, (q, k, v), grad)
    assert (out - expected).abs().max() < 1e-12
    for got, want in zip(got_grads, want_grads):
        assert (got - want).abs().max() < 1e-12


def test_plan_segments_for_the_decoder():
    """Causal + right padding with Lq == Lk: the kept queries as one causal block over the kept
    keys, the padded queries as one plain block seeing every kept key; cu_seqlens match."""
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    plan = _varlen.build_plan(mask, causal=True, lq=6, lk=6)
    causal_seg, full_seg = plan.segments
    assert causal_seg.causal and causal_seg.q_lens == (6, 4, 2) and causal_seg.k_lens == (6, 4, 2)
    assert not full_seg.causal and full_seg.q_lens == (2, 4) and full_seg.k_lens == (4, 2)
    assert full_seg.q_index.tolist() == [6 + 4, 6 + 5, 12 + 2, 12 + 3, 12 + 4, 12 + 5]
    cu_q, cu_k = full_seg.cu_seqlens(torch.device("cpu"))
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == [0, 2, 6] and cu_k.tolist() == [0, 4, 6]
    assert (full_seg.max_q, full_seg.max_k) == (4, 4)
    assert _varlen.build_plan(torch.ones(3, 6, dtype=torch.bool), True, 6, 6) is None


def test_plan_cache_follows_the_mask_tensor():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    plan = _varlen.plan_for(mask, False, 3, 3)
    assert _varlen.plan_for(mask, False, 3, 3) is plan
    assert _varlen.plan_for(mask, True, 3, 3) is not plan
    mask[0, 2] = True  # in place: a new version, a new plan (now nothing is masked)
    assert _varlen.plan_for(mask, False, 3, 3) is None
    bad = torch.tensor([[False, True, True]])
    for _ in range(2):  # the refusal is cached too
        with pytest.raises(_varlen.CausalMaskNotPrefix, match="not a prefix"):
            _varlen.plan_for(bad, True, 3, 3)
    assert _varlen.plan_for(mask.to(torch.uint8), False, 3, 3) is None  # non-bool masks


def test_bmhk_views_and_copies():
    b, n, h, d = 2, 7, 3, 16
    fused = torch.randn(b, n, 3 * h * d)
    q, k, v = fused.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    for t in (q, k, v):
        view = _varlen.to_bmhk(t)
        assert view.data_ptr() == t.data_ptr() and view.shape == (b, n, h, d)
    odd = torch.randn(b * h * n * d + 3)[3:].view(b, h, n, d)  # offset 3: not 16-byte aligned
    assert _varlen.to_bmhk(odd).is_contiguous() and torch.equal(_varlen.to_bmhk(odd), odd.transpose(1, 2))
    assert _varlen.to_bmhk(torch.randn(b, h, d, n).transpose(-1, -2)).stride(-1) == 1


# ------------------------------------------------------- flash-attn call path (API double)

class _FlashAttnDouble(types.ModuleType):
    """flash-attn's documented Python API in plain PyTorch: ``flash_attn_func`` on (B, L, H, D)
    and ``flash_attn_varlen_func`` on packed (total, H, D) with int32 cu_seqlens; causal masks
    aligned bottom right; a row with no key is zeros. ``fa3=True``: FlashAttention-3's
    signatures (no dropout argument) returning ``(out, softmax_lse)``."""

    def __init__(self, fa3: bool = False):
        super().__init__("flash_attn_interface" if fa3 else "flash_attn")
        self.__version__ = "3.0.0" if fa3 else "2.6.3"
        self.fa3 = fa3
        self.calls = []

    def _ret(self, out):
        out = out.contiguous()  # the library allocates its outputs
        return (out, None) if self.fa3 else out

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 4 and q.stride(-1) == 1 and dropout_p == 0.0
        self.calls.append(("dense", causal))
        return self._ret(_attend(q, k, v, softmax_scale, causal))

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == 3 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert cq[-1] == q.shape[0] and ck[-1] == k.shape[0]
        assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:]))
        assert max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
        self.calls.append(("varlen", causal))
        outs = [_attend(q[a:b][None], k[c:e][None], v[c:e][None], softmax_scale, causal)[0]
                for a, b, c, e in zip(cq, cq[1:], ck, ck[1:])]
        return self._ret(torch.cat(outs))


@pytest.mark.parametrize("library", ["fa2", "fa3"])
@pytest.mark.parametrize("lq, lk, kind, causal", [
    (9, 9, "none", False), (9, 9, "none", True), (4, 9, "none", True), (9, 4, "none", True),
    (9, 9, "prefix", False), (4, 9, "not_prefix", False), (9, 9, "prefix", True), (3, 9, "prefix", True),
    (9, 4, "prefix", True), (9, 9, "empty_row", True), (9, 9, "all_empty", False),
])
def test_flash_attn_call_path(monkeypatch, library, lq, lk, kind, causal):
    double = _FlashAttnDouble(fa3=library == "fa3")
    monkeypatch.setattr(flash_attn_backend, "_FA2", None if library == "fa3" else double)
    monkeypatch.setattr(flash_attn_backend, "_FA3", double if library == "fa3" else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gen = torch.Generator().manual_seed(7)
    b, h, d = 3, 2, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for n in (lq, lk, lk))
    mask = _mask(kind, b, lk, gen)
    out = flash_attn_backend.attention(q, k, v, key_padding_mask=mask, causal=causal, scale=0.3)
    expected = ref.attention(q, k, v, key_padding_mask=mask, causal=causal, scale=0.3)
    assert out.shape == expected.shape and out.transpose(1, 2).is_contiguous()
    assert rel_err(out, expected) < 1e-12
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), torch.ones_like(out))):
        assert (got - want).abs().max() < 1e-12
    if kind != "all_empty" and not (mask is not None and bool(mask.all())):
        assert double.calls, "the library was not called"


def test_flash_attn_refuses_what_it_cannot_express(monkeypatch):
    monkeypatch.setattr(flash_attn_backend, "_FA2", None)
    monkeypatch.setattr(flash_attn_backend, "_FA3", _FlashAttnDouble(fa3=True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = torch.randn(2, 2, 4, 16, dtype=torch.float64)
    with pytest.raises(ops.BackendUnavailableError, match="FlashAttention-3 has no dropout"):
        flash_attn_backend.attention(q, q, q, dropout_p=0.1)
    monkeypatch.setattr(flash_attn_backend, "_FA2", _FlashAttnDouble())
    with pytest.raises(ops.BackendUnavailableError, match="not a prefix.*right-pad"):
        flash_attn_backend.attention(q, q, q, key_padding_mask=torch.tensor([[False, True, True, True]] * 2),
                                     causal=True)
    mask = torch.tensor([[True, True, False, False]] * 2)
    assert "right-padded" in flash_attn_backend._auto_attention(q, q, q, key_padding_mask=mask, causal=True)


def test_xformers_call_path_with_xformers_mask_classes(monkeypatch):
    """Where xformers imports (its CUDA kernels need not run): our calls against a plain-PyTorch
    kernel fed xformers' own materialised attention-bias classes, forward and backward."""
    fmha = pytest.importorskip("xformers.ops.fmha")

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        b, m, h, _ = q.shape
        bias = 0.0
        if isinstance(attn_bias, torch.Tensor):
            bias = attn_bias
        elif attn_bias is not None:
            bias = attn_bias.materialize((b, h, m, k.shape[1]), dtype=q.dtype, device=torch.device("cpu"))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    double = types.SimpleNamespace(attn_bias=fmha.attn_bias, memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setattr(xformers_backend, "_fmha", lambda: double)
    gen = torch.Generator().manual_seed(3)
    for lq, lk in SHAPES:
        for kind in MASK_KINDS:
            for causal in (False, True):
                q, k, v = (torch.randn(3, 2, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
                           for n in (lq, lk, lk))
                mask = _mask(kind, 3, lk, gen)
                out = xformers_backend.attention(q, k, v, key_padding_mask=mask, causal=causal)
                expected = ref.attention(q, k, v, key_padding_mask=mask, causal=causal)
                assert (out - expected).abs().max() < 1e-12, (lq, lk, kind, causal)
                for got, want in zip(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)),
                                     torch.autograd.grad(expected, (q, k, v), torch.ones_like(out))):
                    assert (got - want).abs().max() < 1e-12, (lq, lk, kind, causal)


# ------------------------------------------------------------------------ measured routing

def _row(**kw):
    row = dict(device="GPU-X", dtype="bfloat16", shape="s", batch=64, heads=12, lq=30, lk=30, head_dim=64,
               padding=True, causal=False, training=True, ms={"triton": 1.0, "sdpa": 1.2, "xformers": 0.8})
    row.update(kw)
    return row


def test_select_row_matches_kind_and_nearest_size():
    rows = [_row(batch=64), _row(batch=200), _row(batch=64, padding=False), _row(batch=64, training=False),
            _row(batch=64, lk=197), _row(batch=64, device="GPU-Y"), _row(batch=64, dtype="float16")]
    pick = lambda **kw: measured.select_row(rows, **{**dict(device="GPU-X", dtype="bfloat16", batch=64, heads=12, lq=30, lk=30,  # noqa: E731
                                                           head_dim=64, padding=True, causal=False, training=True), **kw})
    assert pick() is rows[0]
    assert pick(batch=150) is rows[1]
    assert pick(batch=20) is None  # more than MAX_WORK_RATIO away from every row
    assert pick(padding=False) is rows[2] and pick(training=False) is rows[3]
    assert pick(lq=30, lk=190) is rows[4]  # cross-attention matches cross-attention rows only
    assert pick(device="GPU-Z") is None and pick(dtype="float16") is rows[6] and pick(causal=True) is None


def test_slower_than_needs_a_margin_and_a_taker():
    row = _row()
    assert measured.slower_than("xformers", row, lambda other: True) is None
    assert "slower than 'xformers'" in measured.slower_than("triton", row, lambda other: True)
    assert measured.slower_than("triton", row, lambda other: other != "xformers") is None
    close = _row(ms={"triton": 1.0, "xformers": 0.97})  # within MARGIN: no switch
    assert measured.slower_than("triton", close, lambda other: True) is None
    assert "not measured" in measured.slower_than("flash_attn", row, lambda other: True)


def test_timings_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "attention_timings.json"
    path.write_text(json.dumps({"rows": [_row()]}))
    monkeypatch.setenv(measured.TIMINGS_ENV, str(path))
    assert measured.timing_rows() == [_row()]
    path.write_text("not json")
    import os
    os.utime(path, (1, 1))
    with pytest.raises(ValueError, match=measured.TIMINGS_ENV):
        measured.timing_rows()
    monkeypatch.delenv(measured.TIMINGS_ENV)
    assert measured.timing_rows() is measured.ATTENTION_TIMINGS


def test_rows_from_the_attention_benchmark():
    results = {"bert_pad_self": {
        "shape": dict(name="bert_pad_self", batch=192, heads=12, lq=30, lk=30, head_dim=64, padding=True, causal=False),
        "results": {"triton": {"fwd_ms": 0.1}, "ops_triton": {"fwd_ms": 0.2, "fwd_bwd_ms": 0.5},
                    "ops_sdpa": {"fwd_ms": 0.3, "fwd_bwd_ms": 0.6}, "ops_xformers": {"error": "x"},
                    "ops_auto": {"fwd_ms": 0.2, "fwd_bwd_ms": 0.5}}}}
    rows = measured.rows_from_attention_results(results, "GPU-X", "bfloat16", "test")
    assert [r["training"] for r in rows] == [False, True]
    assert rows[0]["ms"] == {"triton": 0.2, "sdpa": 0.3} and rows[1]["ms"] == {"triton": 0.5, "sdpa": 0.6}
    assert measured.select_row(rows, "GPU-X", "bfloat16", 192, 12, 30, 30, 64, True, False, True) is rows[1]


def test_recorded_rows_are_well_formed():
    for row in measured.ATTENTION_TIMINGS:
        assert set(measured.ROW_KEYS) <= set(row), row
        assert set(row["ms"]) <= set(ops.known_backends()) and all(t > 0 for t in row["ms"].values()), row
