"""The ``xformers`` and ``flash_attn`` attention backends on a CUDA device, against the float64 reference.

Every BLIP attention kind (ViT self-attention at 224/384/480 px without a mask; BERT
self-attention with ragged key padding; text-to-image cross-attention with and without a key
mask; the causal + padded decoder; cached decoding with Lq != Lk; rows whose keys are all
masked) in bfloat16 and float16 (and float32 where the backend takes it), forward and dq, dk, dv
through ``blip_fast.ops.attention`` under ``use_backend(name)``; dropout statistics and
reproducibility; torch.compile and CUDA-graph capture; a whole BLIP_Pretrain step with its
attention on the backend. Each backend's tests are skipped where it is not importable.

Before each test the CUDA caching allocator's free memory is filled with NaN bytes, so an output
element a kernel leaves unwritten shows up as NaN.

    python -m pytest -q -m gpu tests/test_attention_backends_gpu.py   # benchmarks/run_xformers_on_device.sh
"""
from __future__ import annotations

import collections

import pytest
import torch

import blip_fast
from blip_fast import ops
from blip_fast.ops import _dispatch
from blip_fast.ops import reference as ref
from test_gpu_parity import MED, VIT, IMG, _compare, _inputs, exact_float32  # noqa: F401 (autouse fixture)
from test_triton_attention import GPU_TOL, _ragged, as64, padding_mask, qkv, rel_err

pytestmark = pytest.mark.gpu

LIBRARY_BACKENDS = ("xformers", "flash_attn")


def _backend_params(names=LIBRARY_BACKENDS):
    params = []
    for name in names:
        reason = blip_fast.available_backends()[name]
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)[:200])))
    return params


BACKENDS = _backend_params()
FP32_BACKENDS = _backend_params(("xformers",))  # flash-attn has no float32 kernels


@pytest.fixture(autouse=True)
def _poisoned_allocator():
    """Fixed seed; the allocator's cached free blocks (small and large pools) filled with 0xFF
    bytes, a NaN in float16, bfloat16 and float32."""
    torch.manual_seed(1234)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        blocks = [torch.full((512 << 10,), 255, dtype=torch.uint8, device="cuda") for _ in range(64)]
        blocks += [torch.full((64 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(8)]
        del blocks
    yield


# name: (B, H, Lq, Lk, D, key lengths: None | "ragged" | "empty" (ragged, last row fully masked), causal)
CASES = {
    "vit224_self": (16, 12, 197, 197, 64, None, False),
    "vit384_self": (8, 12, 577, 577, 64, None, False),
    "vit480_self": (4, 12, 901, 901, 64, None, False),
    "bert_pad_35": (48, 12, 35, 35, 64, "ragged", False),
    "cross_35_to_197": (48, 12, 35, 197, 64, None, False),
    "cross_35_to_197_pad": (48, 12, 35, 197, 64, "ragged", False),
    "cross_35_to_577": (16, 12, 35, 577, 64, None, False),
    "cross_35_to_577_pad": (16, 12, 35, 577, 64, "ragged", False),
    "decoder_causal_35": (48, 12, 35, 35, 64, None, True),
    "decoder_causal_pad_35": (48, 12, 35, 35, 64, "ragged", True),
    "bert_pad_empty_row": (8, 12, 35, 35, 64, "empty", False),
    "decoder_causal_pad_empty_row": (8, 12, 35, 35, 64, "empty", True),
    "cached_decoding_5_to_35": (16, 12, 5, 35, 64, None, True),
    "cached_decoding_5_to_35_pad": (16, 12, 5, 35, 64, "ragged", True),
    "cached_decoding_1_to_35_pad": (16, 12, 1, 35, 64, "ragged", True),
    "causal_35_to_7_pad": (8, 12, 35, 7, 64, "ragged", True),  # Lq > Lk: early queries see no key
    "vit224_self_d128": (8, 6, 197, 197, 128, None, False),
    "cross_35_to_197_pad_d32": (16, 12, 35, 197, 32, "ragged", False),
}
FP32_CASES = ("vit224_self", "bert_pad_35", "cross_35_to_577_pad", "decoder_causal_pad_35",
              "cached_decoding_5_to_35_pad", "bert_pad_empty_row")


def _mask(kind, b, lk):
    if kind is None:
        return None
    lengths = _ragged(b, lk)
    if kind == "empty":
        lengths[-1] = 0
    return padding_mask(lengths, lk)


def check_backend(backend, q, k, v, mask=None, causal=False, scale=None, tol=None):
    """Forward and dq, dk, dv of ops.attention under ``backend`` against the float64 reference."""
    with blip_fast.use_backend(backend):
        assert _dispatch.resolve("attention", q, k, v, key_padding_mask=mask, causal=causal)[0] == backend
        out = ops.attention(q, k, v, key_padding_mask=mask, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = as64(q), as64(k), as64(v)
    out64 = ref.attention(q64, k64, v64, key_padding_mask=mask, causal=causal, scale=scale)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad.double())
    tol = tol or GPU_TOL[q.dtype]
    for name, got, want in (("out", out, out64), *zip(("dq", "dk", "dv"), grads, grads64)):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"
    return out


# ------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_blip_attention_kinds(backend, case, dtype):
    b, h, lq, lk, d, lengths, causal = CASES[case]
    q, k, v = qkv(b, h, lq, lk, d, dtype)
    mask = _mask(lengths, b, lk)
    out = check_backend(backend, q, k, v, mask, causal)
    if mask is not None and lengths == "empty":
        assert (out[-1] == 0).all(), "a row whose keys are all masked must be zeros"
    if causal and lq > lk:
        assert (out[:, :, : lq - lk] == 0).all(), "causal queries before the first key must be zeros"


@pytest.mark.parametrize("case", FP32_CASES)
@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_float32(backend, case):
    b, h, lq, lk, d, lengths, causal = CASES[case]
    q, k, v = qkv(b, h, lq, lk, d, torch.float32)
    check_backend(backend, q, k, v, _mask(lengths, b, lk), causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_fused_qkv_custom_scale_and_layout(backend):
    """q, k, v as slices of one fused projection (no copy), a custom scale, the output as a
    (B, H, L, D) view of (B, L, H, D) memory (the models' reshape after it is free)."""
    b, n, h, d = 8, 197, 12, 64
    fused = torch.randn(b, n, 3 * h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = fused.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = check_backend(backend, q, k, v, scale=0.1)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_mask_that_is_not_a_prefix(backend):
    """Keys masked in the middle of a row with a causal mask: xformers takes a bias tensor,
    flash-attn (whose varlen causal mask is per packed sequence) refuses with the fix."""
    b, h, l, d = 4, 12, 35, 64
    q, k, v = qkv(b, h, l, l, d, torch.bfloat16)
    mask = torch.rand(b, l, device="cuda") > 0.3
    mask[:, 0] = False  # the first query of each row sees no key
    if backend == "flash_attn":
        with blip_fast.use_backend(backend), pytest.raises(ops.BackendUnavailableError, match="not a prefix"):
            ops.attention(q, k, v, key_padding_mask=mask, causal=True)
        return
    out = check_backend(backend, q, k, v, mask, causal=True)
    assert (out[:, :, 0] == 0).all()


def test_flash_attn_declines_float32_with_a_reason():
    if blip_fast.available_backends()["flash_attn"] is not None:
        pytest.skip("flash_attn not importable here")
    q, k, v = qkv(2, 2, 16, 16, 64, torch.float32)
    with blip_fast.use_backend("flash_attn"), pytest.raises(ops.BackendUnavailableError, match="float16 and bfloat16"):
        ops.attention(q, k, v)


# ------------------------------------------------------------------------------ dropout

def _dropout_call(backend, case, p, seed, dtype=torch.bfloat16):
    """ops.attention with v = I: the output rows are the dropped probabilities themselves."""
    b, h, l = 8, 4, 64
    lq = 16 if case in ("cross_pad", "cached_causal_pad") else l
    q = (0.3 * torch.randn(b, h, lq, l, device="cuda")).to(dtype).requires_grad_()
    k = (0.3 * torch.randn(b, h, l, l, device="cuda")).to(dtype).requires_grad_()
    v = torch.eye(l, device="cuda", dtype=dtype).expand(b, h, l, l).clone().requires_grad_()
    mask = None if case == "self" else padding_mask([l] + [l // 2 + 3 * i for i in range(1, b)], l)
    causal = case in ("causal_pad", "cached_causal_pad")
    torch.manual_seed(seed)
    with blip_fast.use_backend(backend):
        out = ops.attention(q, k, v, key_padding_mask=mask, causal=causal, dropout_p=p)
    return out, (q, k, v, mask, causal)


@pytest.mark.parametrize("case", ["self", "cross_pad", "causal_pad", "cached_causal_pad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_a_scaled_bernoulli_mask(backend, case):
    """The kept fraction is 1 - p, kept probabilities are scaled by 1 / (1 - p) (mean 1 and
    variance p / (1 - p) of dropped / undropped), draws are independent, and the backward uses
    the forward's mask (gradients match the float64 reference under the recovered mask)."""
    p = 0.2
    out, (q, k, v, mask, causal) = _dropout_call(backend, case, p, seed=5)
    q64, k64, v64 = as64(q), as64(k), as64(v)
    _, probs = ref.attention(q64, k64, v64, key_padding_mask=mask, causal=causal, need_weights=True)
    live = probs > 0
    # dropped / undropped probability: 0 (dropped) or 1 / (1 - p) (kept), mean 1, variance p / (1 - p)
    ratio = (out.detach().double() / probs.detach().clamp_min(1e-30))[live]
    keep = torch.zeros_like(live)
    keep[live] = ratio > 0.5 / (1 - p)
    n = ratio.numel()
    frac = keep[live].double().mean().item()
    assert abs(frac - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5 + 1e-3, frac
    sigma = (p / (1 - p) / n) ** 0.5  # of the mean; the sample variance's is about 1.3x that here
    assert abs(ratio.mean().item() - 1.0) < 6 * sigma + 2e-3, ratio.mean().item()
    assert abs(ratio.var().item() - p / (1 - p)) < 8 * sigma + 5e-3, ratio.var().item()
    kept = ratio[ratio > 0.5 / (1 - p)]
    assert rel_err(kept, torch.full_like(kept, 1 / (1 - p))) <= GPU_TOL[torch.bfloat16]
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[0, 1])
    assert torch.isfinite(out).all() and (out.detach()[~live] == 0).all()

    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    out64 = (probs * keep / (1 - p)) @ v64
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads64):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        assert rel_err(got, want) <= GPU_TOL[torch.bfloat16], f"{name}: {rel_err(got, want):.3g}"


@pytest.mark.parametrize("case", ["self", "causal_pad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_under_manual_seed(backend, case):
    runs = [_dropout_call(backend, case, 0.3, seed)[0].detach() for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ------------------------------------------------------------------- compile, CUDA graphs

@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_runs_the_backend_eagerly(backend):
    b, h, l, d = 8, 12, 35, 64
    q, k, v = qkv(b, h, l, l, d, torch.bfloat16)
    mask = padding_mask(_ragged(b, l), l)

    def step(q, k, v, mask):
        return ops.attention(q, k, v, key_padding_mask=mask, causal=True)

    with blip_fast.use_backend(backend):
        eager = step(q, k, v, mask)
        compiled = torch.compile(step)(q, k, v, mask)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_of_unmasked_calls(backend):
    """Unmasked attention captures and replays; a masked call needs a host synchronisation
    and is refused during capture, with the reason."""
    q, k, v = (t.detach() for t in qkv(8, 12, 197, 197, 64, torch.bfloat16))
    mask = padding_mask(_ragged(8, 197), 197)
    with blip_fast.use_backend(backend):
        expected = ops.attention(q, k, v, causal=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.attention(q, k, v, causal=True)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.attention(q, k, v, causal=True)
            refusal = _dispatch.get_backend_object(backend).why_not("attention", q, k, v, key_padding_mask=mask)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert refusal is not None and "CUDA-graph capture" in refusal


# ------------------------------------------------------------------------------ a whole model

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_blip_pretrain_step_with_attention_on_the_backend(backend, dtype, monkeypatch):
    """BLIP_Pretrain forward + backward with every attention call on ``backend`` (the other ops
    on the reference backend, as ``blip-fast bench`` runs a backend) against the reference path
    on the CPU (test_gpu_parity's bounds)."""
    from benchmarks.runner import backend_scope
    from blip_fast.models import BLIP_Pretrain
    if backend == "flash_attn" and dtype == torch.float32:
        pytest.skip("flash-attn has no float32 kernels")
    used = collections.Counter()
    original = _dispatch.resolve

    def spy(op, *args, **kwargs):
        name, fn = original(op, *args, **kwargs)
        if op == "attention" and blip_fast.get_backend() == ops.AUTO:
            used[name] += 1
        return name, fn

    monkeypatch.setattr(_dispatch, "resolve", spy)
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))

    def step(model, device):
        images, tokens = _inputs(device, 4)
        return model(images, tokens, alpha=0.4, hard_negatives=negatives)

    with backend_scope(backend, strict=False):  # "auto" = the backend where it can run a call, else reference
        _compare(lambda: BLIP_Pretrain(med_config=MED, image_size=IMG, vit=VIT, embed_dim=32, queue_size=16),
                 step, dtype)
    assert used[backend] > 0 and set(used) == {backend}, dict(used)
