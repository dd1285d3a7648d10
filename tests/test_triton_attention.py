"""Triton fused attention (forward and backward) against the float64 reference.

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set in conftest.py)
with small shapes; the ``gpu`` tests run BLIP's real shapes on a CUDA device.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import pytest
import torch

pytest.importorskip("triton")

from blip_fast import ops  # noqa: E402
from blip_fast.ops import reference as ref  # noqa: E402
from blip_fast._kernels.triton import attention as attn_mod  # noqa: E402
from blip_fast._kernels.triton import common  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def _interpreter_handles_bf16() -> bool:
    """Some triton/torch pairs mis-read bfloat16 CPU tensors in the interpreter; probe it."""
    if ON_GPU:
        return True
    x = torch.arange(32, dtype=torch.bfloat16)
    out = attn_mod.attention(x.view(1, 1, 2, 16), x.view(1, 1, 2, 16), x.view(1, 1, 2, 16))
    expected = ref.attention(*(x.view(1, 1, 2, 16).double() for _ in range(3)))
    return bool(torch.allclose(out.double(), expected, rtol=0.05, atol=0.05))


CPU_DTYPES = [torch.float32, torch.float16,
              pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
                  not _interpreter_handles_bf16(), reason="this triton interpreter mis-reads bfloat16"))]


# ----------------------------------------------------------------------------------- helpers

def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """``||out - expected|| / ||expected||`` in float64 (NaN if ``out`` has any NaN).

    The denominator is floored at 1 for gradients that vanish exactly (dq and dk when Lk = 1).
    """
    expected = expected.double()
    return ((out.double() - expected).norm() / expected.norm().clamp_min(1.0)).item()


def qkv(b: int, h: int, lq: int, lk: int, d: int, dtype: torch.dtype,
        device: torch.device = DEVICE) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random leaves q (B, H, Lq, D), k and v (B, H, Lk, D)."""
    def leaf(length):
        return torch.randn(b, h, length, d, device=device).to(dtype).requires_grad_()
    return leaf(lq), leaf(lk), leaf(lk)


def padding_mask(lengths: Sequence[int], lk: int, device: torch.device = DEVICE) -> torch.Tensor:
    """Boolean (B, Lk) mask keeping the first ``lengths[b]`` keys of each row."""
    return torch.arange(lk, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_()


def check_against_reference(q, k, v, mask=None, causal=False, scale=None, tol=None):
    """Kernel forward and dq, dk, dv against the float64 reference on the same inputs."""
    out = attn_mod.attention(q, k, v, key_padding_mask=mask, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad = torch.randn_like(out, dtype=torch.float32)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))

    q64, k64, v64 = as64(q), as64(k), as64(v)
    out64 = ref.attention(q64, k64, v64, key_padding_mask=mask, causal=causal, scale=scale)
    dq64, dk64, dv64 = torch.autograd.grad(out64, (q64, k64, v64), grad.to(out.dtype).double())
    tol = tol or TOL[q.dtype]
    for name, got, want in (("out", out, out64), ("dq", dq, dq64), ("dk", dk, dk64), ("dv", dv, dv64)):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"
    return out, (dq, dk, dv)


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """NaN-fill every kernel output buffer (catches unwritten elements); fixed seed."""
    torch.manual_seed(1234)
    with common.poison_outputs():
        yield


# ------------------------------------------------------------------------- CPU / small shapes

# (B, H, Lq, Lk, D, key lengths or None, causal)
CASES = {
    "self_L1": (2, 2, 1, 1, 32, None, False),
    "self_L7": (2, 2, 7, 7, 64, None, False),
    "self_L33": (2, 2, 33, 33, 32, None, False),
    "self_L70_d64": (2, 2, 70, 70, 64, None, False),
    "self_d40": (2, 2, 33, 33, 40, None, False),
    "pad_ragged_empty_row": (3, 2, 33, 33, 32, [33, 5, 0], False),
    "pad_L70": (2, 2, 70, 70, 64, [70, 41], False),
    "causal_L7": (2, 2, 7, 7, 32, None, True),
    "causal_L70": (2, 2, 70, 70, 32, None, True),
    "causal_pad_L33": (2, 2, 33, 33, 64, [20, 33], True),
    "cross_7_to_70": (2, 2, 7, 70, 32, None, False),
    "cross_33_to_70_pad": (2, 2, 33, 70, 32, [70, 12], False),
    "cross_70_to_7": (2, 2, 70, 7, 32, None, False),
    "causal_br_7_to_33": (2, 2, 7, 33, 32, None, True),
    "causal_br_33_to_7_pad": (2, 2, 33, 7, 32, [7, 3], True),  # Lq > Lk: early rows see no key
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    b, h, lq, lk, d, lengths, causal = CASES[case]
    q, k, v = qkv(b, h, lq, lk, d, torch.float32)
    mask = None if lengths is None else padding_mask(lengths, lk)
    check_against_reference(q, k, v, mask, causal)


@pytest.mark.parametrize("dtype", CPU_DTYPES[1:])
@pytest.mark.parametrize("case", ["pad_ragged_empty_row", "causal_br_33_to_7_pad", "cross_33_to_70_pad"])
def test_matches_reference_half(case, dtype):
    b, h, lq, lk, d, lengths, causal = CASES[case]
    q, k, v = qkv(b, h, lq, lk, d, dtype)
    mask = None if lengths is None else padding_mask(lengths, lk)
    check_against_reference(q, k, v, mask, causal)


@pytest.mark.parametrize("inline_delta", [True, False], ids=["inline_delta", "delta_kernel"])
@pytest.mark.parametrize("case", ["causal_L70", "causal_br_7_to_33", "causal_br_33_to_7_pad",
                                  "cross_33_to_70_pad", "self_L70_d64"])
def test_small_unequal_blocks(case, inline_delta, monkeypatch):
    """Many blocks, BLOCK_M != BLOCK_N, two-kind backward even for short Lq: exercises the
    interior/diagonal split of every loop, with delta computed inside the backward or by its
    own kernel."""
    monkeypatch.setattr(attn_mod, "SHORT_Q_MAX", 0)
    monkeypatch.setattr(attn_mod, "INLINE_DELTA", inline_delta)
    monkeypatch.setattr(attn_mod, "_INTERPRETER_FWD", attn_mod.FwdConfig(16, 32, 1, 1))
    monkeypatch.setattr(attn_mod, "_INTERPRETER_BWD", attn_mod.BwdConfig(16, 32, 32, 16, 1, 1))
    b, h, lq, lk, d, lengths, causal = CASES[case]
    q, k, v = qkv(b, h, lq, lk, d, torch.float32)
    mask = None if lengths is None else padding_mask(lengths, lk)
    check_against_reference(q, k, v, mask, causal)


@pytest.mark.parametrize("case", ["causal_br_7_to_33", "causal_br_33_to_7_pad", "cross_33_to_70_pad",
                                  "pad_ragged_empty_row"])
def test_short_backward_many_key_blocks(case, monkeypatch):
    """The one-program-per-head backward over several key blocks (interior and masked tail)."""
    monkeypatch.setattr(attn_mod, "_INTERPRETER_SHORT_BWD", attn_mod.ShortBwdConfig(16, 1, 1))
    b, h, lq, lk, d, lengths, causal = CASES[case]
    assert lq <= attn_mod.SHORT_Q_MAX
    q, k, v = qkv(b, h, lq, lk, d, torch.float32)
    mask = None if lengths is None else padding_mask(lengths, lk)
    check_against_reference(q, k, v, mask, causal)


def test_custom_scale_and_nonbool_mask():
    q, k, v = qkv(2, 2, 7, 33, 32, torch.float32)
    mask = padding_mask([33, 9], 33).to(torch.int64)
    check_against_reference(q, k, v, mask, scale=0.37)


def test_rows_without_keys_are_zero():
    q, k, v = qkv(2, 2, 33, 7, 32, torch.float32)
    mask = padding_mask([0, 4], 7)
    out, (dq, _, _) = check_against_reference(q, k, v, mask, causal=True)
    assert (out[0] == 0).all() and (dq[0] == 0).all()
    # Bottom-right causal with Lq > Lk: query i sees keys <= i - 26, so rows 0..25 see none.
    assert (out[1, :, :26] == 0).all() and (out[1, :, 26:].abs().sum(-1) > 0).all()


def test_strided_fused_qkv():
    """q, k, v as slices of one fused projection: read through strides, no copy."""
    b, n, h, d = 2, 33, 2, 32
    fused = torch.randn(b, n, 3 * h * d, device=DEVICE, requires_grad=True)
    q, k, v = fused.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    mask = padding_mask([33, 17], n)
    out = attn_mod.attention(q, k, v, key_padding_mask=mask)
    grad = torch.randn_like(out)
    (g_fused,) = torch.autograd.grad(out, fused, grad)

    f64 = fused.detach().double().requires_grad_()
    q64, k64, v64 = f64.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out64 = ref.attention(q64, k64, v64, key_padding_mask=mask)
    (g64,) = torch.autograd.grad(out64, f64, grad.double())
    assert rel_err(out, out64) <= TOL[torch.float32]
    assert rel_err(g_fused, g64) <= TOL[torch.float32]


def test_output_layout_transposes_for_free():
    q, k, v = qkv(2, 3, 7, 7, 32, torch.float32)
    out = attn_mod.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("lq", [33, 70])
def test_backward_is_deterministic(lq):
    q, k, v = qkv(2, 2, lq, 70, 32, torch.float32)
    out = attn_mod.attention(q, k, v, key_padding_mask=padding_mask([70, 30], 70), causal=True)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dispatch_selects_triton():
    q, k, v = qkv(2, 2, 7, 7, 32, torch.float32)
    with ops.use_backend("triton"):
        assert ops.resolve("attention", q, k, v)[0] == "triton"
        out = ops.attention(q, k, v)
        with pytest.raises(ops.BackendUnavailableError, match="need_weights"):
            ops.attention(q, k, v, need_weights=True)
    assert rel_err(out, ref.attention(as64(q), as64(k), as64(v))) <= TOL[torch.float32]


@pytest.mark.parametrize("kwargs, expected", [
    (dict(need_weights=True), "need_weights"),
    (dict(d=256), "head dim 256"),
    (dict(dtype=torch.float64), "dtype torch.float64"),
    (dict(dv=16), "head dims differ"),
    (dict(mask_shape=(2, 5)), "key_padding_mask must be"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_why_not_reasons(kwargs, expected):
    d, dv = kwargs.pop("d", 32), kwargs.pop("dv", None)
    dtype = kwargs.pop("dtype", torch.float32)
    q = torch.randn(2, 2, 7, d, dtype=dtype, device=DEVICE)
    k = torch.randn(2, 2, 9, d, dtype=dtype, device=DEVICE)
    v = torch.randn(2, 2, 9, dv or d, dtype=dtype, device=DEVICE)
    shape = kwargs.pop("mask_shape", None)
    mask = None if shape is None else torch.ones(shape, dtype=torch.bool, device=DEVICE)
    reason = attn_mod.why_not_attention(q, k, v, key_padding_mask=mask, **kwargs)
    assert reason is not None and expected in reason
    ok = torch.randn(2, 2, 7, 32, device=DEVICE)
    assert attn_mod.why_not_attention(ok, ok, ok) is None


# ----------------------------------------------------------------------------------- dropout

def _kernel_mask(seed_state: int, b: int, h: int, lq: int, lk: int, p: float) -> torch.Tensor:
    """The keep mask the next attention call draws after ``torch.manual_seed(seed_state)``."""
    torch.manual_seed(seed_state)
    seed = common.draw_seed(DEVICE)
    return attn_mod.dropout_keep_mask(seed, b, h, lq, lk, p, device=DEVICE)


def test_dropout_reproducible_and_seed_dependent():
    q, k, v = qkv(2, 2, 33, 33, 32, torch.float32)
    runs = []
    for state in (7, 7, 8):
        torch.manual_seed(state)
        runs.append(attn_mod.attention(q, k, v, dropout_p=0.3))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_dropout_keep_fraction():
    p = 0.3
    keep = _kernel_mask(5, 2, 3, 64, 96, p)
    assert keep.shape == (2, 3, 64, 96)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.015  # ~37k draws: 6 standard deviations
    # Different (b, h, i, j) draw independently: rows are not copies of each other.
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


def test_dropout_applies_the_reported_mask():
    """With v = I the output rows are the dropped probabilities themselves."""
    b, h, l, p = 2, 2, 30, 0.25
    q, k, _ = qkv(b, h, l, l, 32, torch.float32)
    eye = torch.eye(l, 32, device=DEVICE).expand(b, h, l, 32)
    mask = padding_mask([30, 18], l)
    torch.manual_seed(11)
    out = attn_mod.attention(q, k, eye, key_padding_mask=mask, dropout_p=p)
    keep = _kernel_mask(11, b, h, l, l, p)
    _, probs = ref.attention(q.detach().double(), k.detach().double(), eye.double(),
                             key_padding_mask=mask, need_weights=True)
    expected = probs * keep / (1 - p)
    assert rel_err(out[..., :l], expected) <= TOL[torch.float32]
    # Unbiased: E[dropped probs] = probs, so the kept mass per row averages to 1.
    row_mass = out[0, :, :, :l].sum(-1).mean().item()
    assert abs(row_mass - 1.0) < 0.1


@pytest.mark.parametrize("short_backward", [True, False], ids=["one_program_per_head", "two_kind"])
@pytest.mark.parametrize("causal, lengths", [(False, None), (True, [33, 20])])
def test_dropout_gradients(causal, lengths, short_backward, monkeypatch):
    if not short_backward:
        monkeypatch.setattr(attn_mod, "SHORT_Q_MAX", 0)
    b, h, lq, lk, d, p = 2, 2, 33, 33, 32, 0.2
    q, k, v = qkv(b, h, lq, lk, d, torch.float32)
    mask = None if lengths is None else padding_mask(lengths, lk)
    torch.manual_seed(3)
    out = attn_mod.attention(q, k, v, key_padding_mask=mask, causal=causal, dropout_p=p)
    keep = _kernel_mask(3, b, h, lq, lk, p)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)

    q64, k64, v64 = as64(q), as64(k), as64(v)
    _, probs = ref.attention(q64, k64, v64, key_padding_mask=mask, causal=causal, need_weights=True)
    out64 = (probs * keep / (1 - p)) @ v64
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad.double())
    assert rel_err(out, out64) <= TOL[torch.float32]
    for name, got, want in zip("qkv", grads, grads64):
        assert rel_err(got, want) <= TOL[torch.float32], f"d{name}"


# ------------------------------------------------------------------------------ GPU / real shapes

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GPU_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# name: (B, H, Lq, Lk, D, key lengths (None = no mask), causal)
GPU_CASES = {
    "vit_197": (16, 12, 197, 197, 64, None, False),
    "vit_577": (8, 12, 577, 577, 64, None, False),
    "vit_901": (4, 12, 901, 901, 64, None, False),
    "bert_pad_35": (48, 12, 35, 35, 64, "ragged", False),
    "cross_35_to_577": (16, 12, 35, 577, 64, "ragged", False),
    "decoder_causal_pad_35": (48, 12, 35, 35, 64, "ragged", True),
    "vit_197_d128": (8, 6, 197, 197, 128, None, False),
    "cross_35_to_197_d32": (16, 12, 35, 197, 32, "ragged", False),
}


def _ragged(b: int, lk: int) -> list:
    lengths = torch.randint(max(1, lk // 3), lk + 1, (b,)).tolist()
    lengths[0] = lk
    return lengths


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_real_shapes(case, dtype):
    b, h, lq, lk, d, lengths, causal = GPU_CASES[case]
    q, k, v = qkv(b, h, lq, lk, d, dtype)
    mask = None if lengths is None else padding_mask(_ragged(b, lk), lk)
    check_against_reference(q, k, v, mask, causal, tol=GPU_TOL[dtype])


@gpu
@needs_cuda
def test_gpu_strided_and_dropout():
    b, n, h, d = 8, 197, 12, 64
    fused = torch.randn(b, n, 3 * h * d, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = fused.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = attn_mod.attention(q, k, v)
    assert rel_err(out, ref.attention(q.double(), k.double(), v.double())) <= GPU_TOL[torch.bfloat16]
    keep = _kernel_mask(9, b, h, n, n, 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 0.005


@gpu
@needs_cuda
@pytest.mark.parametrize("case", ["bert_pad_35", "decoder_causal_pad_35", "cross_35_to_577"])
def test_gpu_two_kind_backward_for_short_queries(case, monkeypatch):
    """The general backward also runs short query sequences (e.g. with SHORT_Q_MAX lowered)."""
    monkeypatch.setattr(attn_mod, "SHORT_Q_MAX", 0)
    b, h, lq, lk, d, lengths, causal = GPU_CASES[case]
    q, k, v = qkv(b, h, lq, lk, d, torch.bfloat16)
    mask = None if lengths is None else padding_mask(_ragged(b, lk), lk)
    check_against_reference(q, k, v, mask, causal, tol=GPU_TOL[torch.bfloat16])
