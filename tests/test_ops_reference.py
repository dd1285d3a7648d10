"""The reference ops against first-principles float64 math, and sdpa against the reference."""
import pytest
import torch
import torch.nn.functional as F

import blip_fast
from blip_fast import ops
from conftest import rel_err


def naive_attention(q, k, v, keep=None, scale=None):
    """float64 softmax attention over an explicit (B, 1|H, Lq, Lk) boolean keep mask."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def ragged_mask(lengths, lk):
    return torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("kind", ["none", "padding", "causal", "causal_padding", "cross", "causal_cached"])
def test_attention_matches_float64_math(backend, kind):
    torch.manual_seed(0)
    B, H, D = 3, 2, 16
    lq, lk = {"cross": (5, 11), "causal_cached": (3, 9)}.get(kind, (9, 9))
    q, k, v = torch.randn(B, H, lq, D), torch.randn(B, H, lk, D), torch.randn(B, H, lk, D)
    kpm = ragged_mask([lk, 4, 1], lk) if kind in ("padding", "causal_padding", "cross") else None
    causal = kind.startswith("causal")
    keep = torch.ones(B, 1, lq, lk, dtype=torch.bool)
    if kpm is not None:
        keep &= kpm[:, None, None, :]
    if causal:
        keep &= (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq))[None, None]
    with blip_fast.use_backend(backend):
        out = ops.attention(q, k, v, key_padding_mask=kpm, causal=causal)
    assert rel_err(out, naive_attention(q, k, v, keep)) < 1e-6


def test_fully_masked_rows_are_zero_not_nan():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, :3] = True
    for backend in ("reference", "sdpa"):
        with blip_fast.use_backend(backend):
            out = ops.attention(q, k, v, key_padding_mask=kpm)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0


def test_attention_probs_and_strided_inputs():
    torch.manual_seed(2)
    B, N, H, D = 2, 10, 3, 8
    qkv = torch.randn(B, N, 3 * H * D).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    assert not q.is_contiguous()
    out, probs = ops.attention(q, k, v, need_weights=True)
    assert torch.allclose(probs.sum(-1), torch.ones(B, H, N))
    assert rel_err(out, naive_attention(q, k, v)) < 1e-6


def test_original_bert_additive_mask_equivalence():
    """The original adds (1 - mask) * -10000 to the scores; the keep mask gives the same numbers."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 2, 7, 64), torch.randn(2, 2, 7, 64), torch.randn(2, 2, 7, 64)
    mask = ragged_mask([7, 3], 7).long()
    scores = q @ k.transpose(-1, -2) / 64 ** 0.5 + (1.0 - mask[:, None, None, :].float()) * -10000.0
    original = scores.softmax(-1) @ v
    with blip_fast.use_backend("reference"):
        assert torch.equal(ops.attention(q, k, v, key_padding_mask=mask.bool()), original)


def test_layer_norm_with_residual():
    torch.manual_seed(4)
    x, r = torch.randn(4, 5, 24), torch.randn(4, 5, 24)
    w, b = torch.randn(24), torch.randn(24)
    out = ops.layer_norm(x, w, b, 1e-12, residual=r)
    ref = F.layer_norm((x + r).double(), (24,), w.double(), b.double(), 1e-12)
    assert rel_err(out, ref) < 1e-6


def test_linear_gelu_and_bias_gelu():
    torch.manual_seed(5)
    x, w, b = torch.randn(6, 16), torch.randn(32, 16), torch.randn(32)
    ref = F.gelu(x.double() @ w.double().T + b.double())
    assert rel_err(ops.linear_gelu(x, w, b), ref) < 1e-6
    assert rel_err(ops.bias_gelu(x @ w.T, b), ref) < 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy(reduction):
    torch.manual_seed(6)
    h, w, b = torch.randn(3, 5, 16), torch.randn(50, 16), torch.randn(50)
    labels = torch.randint(0, 50, (3, 5))
    labels[0, 2] = labels[2, 4] = -100
    out = ops.linear_cross_entropy(h, w, b, labels, label_smoothing=0.1, reduction=reduction)
    logits = (h.double() @ w.double().T + b.double()).reshape(-1, 50)
    ref = F.cross_entropy(logits, labels.reshape(-1), label_smoothing=0.1, reduction=reduction)
    assert out.shape == (ref.view(3, 5) if reduction == "none" else ref).shape
    assert rel_err(out.reshape(-1), ref.reshape(-1)) < 1e-6
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(h, w, b, labels, reduction="avg")


def test_momentum_update_formula():
    torch.manual_seed(7)
    p, pm = [torch.randn(5), torch.randn(3, 2)], [torch.randn(5), torch.randn(3, 2)]
    expected = [m * 0.995 + x * 0.005 for m, x in zip(pm, p)]
    with ops.use_backend("reference"):
        ops.momentum_update(pm, p, 0.995)
    for a, e in zip(pm, expected):
        assert torch.equal(a, e)


def test_momentum_update_multi_tensor_matches_reference():
    torch.manual_seed(8)
    p = [torch.randn(64), torch.randn(33, 7), torch.randn(5, dtype=torch.float64)]
    pm = [torch.randn_like(x) for x in p]
    pm_ref = [x.clone() for x in pm]
    with ops.use_backend("reference"):
        ops.momentum_update(pm_ref, p, 0.995)
    with ops.use_backend("sdpa"):
        ops.momentum_update(pm, p, 0.995)
    for a, e in zip(pm, pm_ref):
        assert rel_err(a, e) < 1e-6
    with pytest.raises(ops.BackendUnavailableError, match="mismatch"):
        with ops.use_backend("sdpa"):
            ops.momentum_update([torch.zeros(3)], [torch.zeros(4)], 0.9)
