"""Triton LayerNorm, bias+GELU and fused linear cross-entropy against the float64 reference.

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set in conftest.py)
with small shapes; the ``gpu`` tests run BLIP's real shapes on a CUDA device.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from blip_fast import ops  # noqa: E402
from blip_fast.ops import reference as ref  # noqa: E402
from blip_fast._kernels.triton import bias_gelu as gelu_mod  # noqa: E402
from blip_fast._kernels.triton import cross_entropy as ce_mod  # noqa: E402
from blip_fast._kernels.triton import layer_norm as ln_mod  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """``||out - expected|| / ||expected||`` in float64 (NaN if ``out`` has any NaN)."""
    return ((out.double() - expected).norm() / expected.norm()).item()


def leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0,
         grad: bool = True, device: torch.device = DEVICE) -> torch.Tensor:
    """Fresh random input (never zeros) as a leaf that records its gradient."""
    t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def as64(t):
    """Detached float64 leaf copy of ``t`` (None stays None)."""
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill every float ``torch.empty``/``empty_like`` with NaN, so unwritten outputs show up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# --------------------------------------------------------------------------------- LayerNorm

def _check_layer_norm(x, w, b, eps, r=None, keep=None, p=0.0, seed=0, tol=None):
    """Forward and backward of the kernel against the reference in float64.

    ``keep`` is the dropout mask the kernel applied (recovered with ``dropout_mask``); the
    reference applies it explicitly.
    """
    y = ln_mod.layer_norm_fn(x, w, b, eps, r, p, seed=seed)
    assert y.shape == x.shape and y.dtype == x.dtype
    g = torch.randn_like(y, dtype=torch.float32)
    (y.float() * g).sum().backward()

    x64, w64, b64, r64 = as64(x), as64(w), as64(b), as64(r)
    xin = x64 if keep is None else x64 * keep / (1.0 - p)
    y64 = ref.layer_norm(xin, w64, b64, eps, residual=r64)
    (y64 * g.double()).sum().backward()
    tol = tol or TOL[x.dtype]
    assert rel_err(y, y64) <= tol
    for name, t, t64 in (("x", x, x64), ("weight", w, w64), ("bias", b, b64), ("residual", r, r64)):
        if t is not None:
            assert t.grad.dtype == t.dtype, name
            assert rel_err(t.grad, t64.grad) <= tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 16), (37, 48), (5, 768)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm(dtype, rows, n, residual):
    x = leaf(rows, n, dtype=dtype, scale=2.0, shift=0.5)
    w = leaf(n, dtype=dtype, shift=1.0)
    b = leaf(n, dtype=dtype)
    r = leaf(rows, n, dtype=dtype) if residual else None
    _check_layer_norm(x, w, b, 1e-6, r)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_optional_affine(affine):
    x = leaf(9, 48, dtype=torch.float32)
    w = leaf(48, dtype=torch.float32, shift=1.0) if affine == "weight" else None
    b = leaf(48, dtype=torch.float32) if affine == "bias" else None
    _check_layer_norm(x, w, b, 1e-12, leaf(9, 48, dtype=torch.float32))


def test_layer_norm_strided_and_mixed_dtypes():
    # Non-contiguous leading dims (a transposed view), fp16, float32 affine parameters.
    base = leaf(6, 4, 40, dtype=torch.float16, grad=False)
    x = base.transpose(0, 1).requires_grad_()
    r = leaf(4, 6, 40, dtype=torch.float16)
    _check_layer_norm(x, leaf(40, dtype=torch.float32, shift=1.0), leaf(40, dtype=torch.float32),
                      1e-6, r)
    # Last dim not contiguous: copied.
    x = leaf(40, 7, dtype=torch.float32, grad=False).t().requires_grad_()
    _check_layer_norm(x, leaf(40, dtype=torch.float32), None, 1e-6)


def test_layer_norm_grads_only_where_needed():
    x = leaf(5, 48, dtype=torch.float32)
    w = leaf(48, dtype=torch.float32, grad=False)
    r = leaf(5, 48, dtype=torch.float32, grad=False)
    ln_mod.layer_norm(x, w, leaf(48, dtype=torch.float32), 1e-6, r).sum().backward()
    assert x.grad is not None and w.grad is None and r.grad is None


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_dropout_matches_recovered_mask(residual):
    p, seed, rows, n = 0.3, 97, 13, 768
    x = leaf(rows, n, dtype=torch.float32)
    r = leaf(rows, n, dtype=torch.float32) if residual else None
    keep = ln_mod.dropout_mask(seed, (rows, n), p, DEVICE)
    _check_layer_norm(x, leaf(n, dtype=torch.float32), leaf(n, dtype=torch.float32), 1e-12, r,
                      keep=keep.double(), p=p, seed=seed)


def test_dropout_mask_statistics_and_reproducibility():
    p = 0.25
    keep = ln_mod.dropout_mask(5, (64, 768), p, DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert torch.equal(keep, ln_mod.dropout_mask(5, (64, 768), p, DEVICE))
    assert not torch.equal(keep, ln_mod.dropout_mask(6, (64, 768), p, DEVICE))


def test_layer_norm_dropout_seed_from_torch_rng():
    x = leaf(8, 48, dtype=torch.float32, grad=False)
    torch.manual_seed(3)
    y1 = ln_mod.layer_norm(x, None, None, 1e-6, dropout_p=0.5)
    torch.manual_seed(3)
    y2 = ln_mod.layer_norm(x, None, None, 1e-6, dropout_p=0.5)
    y3 = ln_mod.layer_norm(x, None, None, 1e-6, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_backward_persistent_loops(monkeypatch):
    """Few programs, so each walks several row blocks (the last ones partly past the end)."""
    monkeypatch.setattr(ln_mod, "BWD_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(gelu_mod, "BWD_PROGRAMS_PER_SM", 1)
    x = leaf(37, 48, dtype=torch.float32)
    _check_layer_norm(x, leaf(48, dtype=torch.float32), leaf(48, dtype=torch.float32), 1e-6,
                      leaf(37, 48, dtype=torch.float32), keep=None)
    x, b = leaf(100, 48, dtype=torch.float32), leaf(48, dtype=torch.float32)
    gelu_mod.bias_gelu(x, b).sum().backward()
    x64, b64 = as64(x), as64(b)
    ref.bias_gelu(x64, b64).sum().backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5 and rel_err(b.grad, b64.grad) <= 1e-5


def _layer_norm64(total, w, b, eps):
    return torch.nn.functional.layer_norm(total, (total.shape[-1],), w, b, eps)


@pytest.mark.parametrize("uses", ["both", "y_only", "sum_only"])
@pytest.mark.parametrize("x_dtype,r_dtype,y_dtype", [
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.float32, torch.bfloat16),  # a pre-LN ViT block under bf16 autocast
    (torch.bfloat16, torch.bfloat16, None),
])
def test_add_layer_norm(uses, x_dtype, r_dtype, y_dtype):
    """(x + residual, LayerNorm(x + residual)) in one kernel, forward and backward, with the
    gradient arriving through the sum, the normalised output or both."""
    rows, n = 37, 48
    x, r = leaf(rows, n, dtype=x_dtype), leaf(rows, n, dtype=r_dtype, scale=2.0)
    w, b = leaf(n, dtype=torch.float32, shift=1.0), leaf(n, dtype=torch.float32)
    total, y = ln_mod.add_layer_norm(x, r, w, b, 1e-6, y_dtype)
    sum_dtype = torch.promote_types(x_dtype, r_dtype)
    assert total.dtype == sum_dtype and y.dtype == (y_dtype or sum_dtype)
    gs, gy = torch.randn(rows, n), torch.randn(rows, n)
    loss = {"both": (total.float() * gs).sum() + (y.float() * gy).sum(), "y_only": (y.float() * gy).sum(),
            "sum_only": (total.float() * gs).sum()}[uses]
    loss.backward()

    x64, r64, w64, b64 = as64(x), as64(r), as64(w), as64(b)
    total64 = r64 + x64
    y64 = _layer_norm64(total64, w64, b64, 1e-6)
    loss64 = {"both": (total64 * gs.double()).sum() + (y64 * gy.double()).sum(),
              "y_only": (y64 * gy.double()).sum(), "sum_only": (total64 * gs.double()).sum()}[uses]
    loss64.backward()
    tol = TOL[torch.bfloat16 if torch.bfloat16 in (x_dtype, r_dtype, y_dtype) else torch.float32]
    assert rel_err(total, total64) <= tol and rel_err(y, y64) <= tol
    for name, t, t64 in (("x", x, x64), ("residual", r, r64), ("weight", w, w64), ("bias", b, b64)):
        if uses == "sum_only" and name in ("weight", "bias"):
            assert t.grad is None or t.grad.abs().max() == 0, name
            continue
        assert t.grad.dtype == t.dtype, name
        assert rel_err(t.grad, t64.grad) <= tol, name


def test_add_layer_norm_through_the_ops_matches_the_unfused_pair():
    """ops.add_layer_norm on triton and on the reference: the same sum, and the same normalised
    output once cast as the next matmul would (bf16 under autocast)."""
    x, r = leaf(6, 40, dtype=torch.bfloat16), leaf(6, 40, dtype=torch.float32)
    w, b = leaf(40, dtype=torch.float32, shift=1.0), leaf(40, dtype=torch.float32)
    outs = {}
    for backend in ("triton", "reference"):
        with ops.use_backend(backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            outs[backend] = ops.add_layer_norm(x, r, w, b, 1e-6)
    (s_t, y_t), (s_r, y_r) = outs["triton"], outs["reference"]
    assert y_t.dtype == y_r.dtype == torch.bfloat16 and s_t.dtype == s_r.dtype == torch.float32
    assert torch.equal(s_t, s_r)
    assert rel_err(y_t, y_r.double()) <= TOL[torch.bfloat16]


def test_layer_norm_why_not():
    x = torch.randn(2, 8, device=DEVICE)
    assert ln_mod.why_not_layer_norm(x, None, None, 1e-6) is None
    assert "dimension" in ln_mod.why_not_layer_norm(
        torch.randn(1, ln_mod.MAX_N + 1, device=DEVICE), None, None, 1e-6)
    assert "dtype" in ln_mod.why_not_layer_norm(x.double(), None, None, 1e-6)
    assert "weight" in ln_mod.why_not_layer_norm(x, torch.ones(7, device=DEVICE), None, 1e-6)


def test_dispatch_reaches_triton_backend():
    x = leaf(3, 16, dtype=torch.float32, grad=False)
    with ops.use_backend("triton"):
        name, fn = ops.resolve("layer_norm", x, None, None, 1e-6)
        y = ops.layer_norm(x, None, None, 1e-6)
        assert name == "triton" and fn is ln_mod.layer_norm
        assert ops.resolve("bias_gelu", x, x[0])[1] is gelu_mod.bias_gelu
    assert rel_err(y, ref.layer_norm(x.double(), None, None, 1e-6)) <= 1e-5


# ------------------------------------------------------------------------------- bias + GELU

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (37, 48), (3, 5, 300)])
def test_bias_gelu(dtype, shape):
    x = leaf(*shape, dtype=dtype, scale=2.0)
    b = leaf(shape[-1], dtype=dtype)
    y = gelu_mod.bias_gelu(x, b)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64, b64 = as64(x), as64(b)
    y64 = ref.bias_gelu(x64, b64)
    (y64 * g.double()).sum().backward()
    assert y.dtype == dtype
    for out, expected in ((y, y64), (x.grad, x64.grad), (b.grad, b64.grad)):
        assert rel_err(out, expected) <= TOL[dtype]


def test_bias_gelu_float32_bias_promotes_and_strided_input():
    x = leaf(10, 48, dtype=torch.bfloat16, grad=False)[:, ::2].requires_grad_()
    b = leaf(24, dtype=torch.float32)
    y = gelu_mod.bias_gelu(x, b)
    assert y.dtype == torch.float32  # as F.gelu(x + b) promotes
    y.sum().backward()
    x64, b64 = as64(x), as64(b)
    ref.bias_gelu(x64, b64).sum().backward()
    assert rel_err(y, ref.bias_gelu(x64, b64)) <= 1e-5
    assert x.grad.dtype == torch.bfloat16 and rel_err(x.grad, x64.grad) <= 1e-2
    assert rel_err(b.grad, b64.grad) <= 1e-5


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gelu(with_bias):
    x = leaf(2, 7, 32, dtype=torch.float32)
    w = leaf(48, 32, dtype=torch.float32, scale=0.2)
    b = leaf(48, dtype=torch.float32) if with_bias else None
    y = gelu_mod.linear_gelu(x, w, b)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64, w64, b64 = as64(x), as64(w), as64(b)
    (ref.linear_gelu(x64, w64, b64) * g.double()).sum().backward()
    assert rel_err(y, ref.linear_gelu(x64, w64, b64)) <= 1e-5
    for t, t64 in ((x, x64), (w, w64), (b, b64)):
        if t is not None:
            assert rel_err(t.grad, t64.grad) <= 1e-5


# ------------------------------------------------------------------- linear + cross-entropy

@pytest.fixture
def small_ce_blocks(monkeypatch):
    """Several vocabulary blocks per row even for the small test vocabularies."""
    monkeypatch.setattr(ce_mod, "_MAX_BLOCK_V", 128)


def _ce_inputs(rows, hid, vocab, dtype, bias=True, lead=None, ignore_every=5):
    lead = lead or (rows,)
    h = leaf(*lead, hid, dtype=dtype)
    w = leaf(vocab, hid, dtype=dtype, scale=0.3)
    b = leaf(vocab, dtype=dtype) if bias else None
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    labels.view(-1)[::ignore_every] = -100
    return h, w, b, labels


def _check_ce(h, w, b, labels, smoothing, reduction, chunk_rows, tol):
    loss = ce_mod.linear_cross_entropy_fn(h, w, b, labels, smoothing, -100, reduction,
                                          chunk_rows=chunk_rows)
    h64, w64, b64 = as64(h), as64(w), as64(b)
    loss64 = ref.linear_cross_entropy(h64, w64, b64, labels, smoothing, -100, reduction)
    assert loss.shape == loss64.shape and loss.dtype == h.dtype
    assert rel_err(loss, loss64) <= tol
    g = torch.rand_like(loss64) + 0.5  # per-row upstream grads for 'none'
    (loss.double() * g).sum().backward()
    (loss64 * g).sum().backward()
    for name, t, t64 in (("hidden", h, h64), ("weight", w, w64), ("bias", b, b64)):
        if t is not None and t.requires_grad:
            assert t.grad.dtype == t.dtype, name
            assert rel_err(t.grad, t64.grad) <= tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy(small_ce_blocks, dtype, reduction, smoothing):
    h, w, b, labels = _ce_inputs(37, 48, 300, dtype)
    _check_ce(h, w, b, labels, smoothing, reduction, chunk_rows=8, tol=TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_no_bias_3d(small_ce_blocks, reduction):
    h, w, _, labels = _ce_inputs(0, 32, 1000, torch.float32, bias=False, lead=(3, 7))
    _check_ce(h, w, None, labels, 0.1, reduction, chunk_rows=5, tol=1e-5)


def test_linear_cross_entropy_auto_chunks(small_ce_blocks, monkeypatch):
    monkeypatch.setattr(ce_mod, "CHUNK_BYTES", 100 * 4 * 6)  # 6 rows of 100 float32 logits
    assert ce_mod.chunk_rows_for(20, 100, 4) == 5  # 4 equal chunks
    h, w, b, labels = _ce_inputs(20, 16, 100, torch.float32)
    _check_ce(h, w, b, labels, 0.0, "mean", chunk_rows=None, tol=1e-5)


def test_linear_cross_entropy_frozen_weight_and_tied(small_ce_blocks):
    h, w, b, labels = _ce_inputs(11, 16, 130, torch.float32)
    w.requires_grad_(False)
    _check_ce(h, w, b, labels, 0.0, "sum", chunk_rows=4, tol=1e-5)
    # A weight tied to an embedding: both uses accumulate into one gradient.
    h, w, _, labels = _ce_inputs(11, 16, 130, torch.float32)
    ids = torch.randint(0, 130, (11,), device=DEVICE)
    emb = torch.nn.functional.embedding(ids, w)
    loss = ce_mod.linear_cross_entropy(h + emb, w, None, labels)
    loss.backward()
    w64 = as64(w)
    ref.linear_cross_entropy(h.detach().double() + torch.nn.functional.embedding(ids, w64), w64,
                             None, labels).backward()
    assert rel_err(w.grad, w64.grad) <= 1e-5


def test_linear_cross_entropy_without_grad_and_all_ignored(small_ce_blocks):
    h, w, b, labels = _ce_inputs(9, 16, 140, torch.float32)
    with torch.no_grad():
        loss = ce_mod.linear_cross_entropy(h, w, b, labels, 0.1)
    assert rel_err(loss, ref.linear_cross_entropy(as64(h), as64(w), as64(b), labels, 0.1)) <= 1e-5
    labels.fill_(-100)
    assert torch.isnan(ce_mod.linear_cross_entropy(h, w, b, labels))  # 0 / 0, as F.cross_entropy
    loss = ce_mod.linear_cross_entropy(h, w, b, labels, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_linear_cross_entropy_second_backward_raises(small_ce_blocks):
    h, w, b, labels = _ce_inputs(5, 16, 100, torch.float32)
    loss = ce_mod.linear_cross_entropy(h, w, b, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed"):
        loss.backward()


def test_linear_cross_entropy_why_not():
    h, w, b, labels = _ce_inputs(4, 16, 100, torch.float32, ignore_every=2)
    assert ce_mod.why_not_linear_cross_entropy(h, w, b, labels) is None
    assert "dtype" in ce_mod.why_not_linear_cross_entropy(h, w.double(), b, labels)
    assert "labels" in ce_mod.why_not_linear_cross_entropy(h, w, b, labels.float())


# ------------------------------------------------------------------------ compiler, no GPU

def test_kernels_compile_for_sm90():
    """Errors only the compiler sees (the interpreter runs kernels as Python): compile for sm_90."""
    script = Path(__file__).with_name("compile_check_norm_gelu_ce.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])  # the source tree under test, not an install
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode == 2:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------- GPU, real shapes

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_layer_norm_vit(dtype):
    x = leaf(64 * 197, 768, dtype=dtype, scale=2.0, device=torch.device("cuda"))
    w = leaf(768, dtype=dtype, shift=1.0, device=torch.device("cuda"))
    b = leaf(768, dtype=dtype, device=torch.device("cuda"))
    _check_layer_norm(x, w, b, 1e-6)


@gpu
@needs_cuda
def test_gpu_add_layer_norm_vit_block_under_autocast():
    """A ViT-B block's first residual add + norm2 at batch 64 as bf16 autocast runs it: bf16
    sublayer output, float32 stream, bf16 normalised output; gradients through both outputs."""
    cuda = torch.device("cuda")
    x = leaf(64 * 197, 768, dtype=torch.bfloat16, device=cuda)
    r = leaf(64 * 197, 768, dtype=torch.float32, scale=3.0, device=cuda)
    w = leaf(768, dtype=torch.float32, shift=1.0, device=cuda)
    b = leaf(768, dtype=torch.float32, device=cuda)
    total, y = ln_mod.add_layer_norm(x, r, w, b, 1e-6, torch.bfloat16)
    gs, gy = torch.randn_like(total), torch.randn_like(total)
    ((total * gs).sum() + (y.float() * gy).sum()).backward()
    x64, r64, w64, b64 = as64(x), as64(r), as64(w), as64(b)
    total64 = r64 + x64
    y64 = _layer_norm64(total64, w64, b64, 1e-6)
    ((total64 * gs.double()).sum() + (y64 * gy.double()).sum()).backward()
    assert rel_err(total, total64) <= TOL[torch.float32] and rel_err(y, y64) <= TOL[torch.bfloat16]
    for t, t64 in ((x, x64), (r, r64), (w, w64), (b, b64)):
        assert t.grad.dtype == t.dtype and rel_err(t.grad, t64.grad) <= TOL[torch.bfloat16]


@gpu
@needs_cuda
def test_gpu_layer_norm_bert_residual_dropout():
    cuda = torch.device("cuda")
    p, seed, shape = 0.1, 2024, (192, 30, 768)
    x = leaf(*shape, dtype=torch.bfloat16, device=cuda)
    r = leaf(*shape, dtype=torch.bfloat16, device=cuda)
    keep = ln_mod.dropout_mask(seed, shape, p, cuda)
    assert abs(keep.float().mean().item() - (1 - p)) < 2e-3
    _check_layer_norm(x, leaf(768, dtype=torch.bfloat16, shift=1.0, device=cuda),
                      leaf(768, dtype=torch.bfloat16, device=cuda), 1e-12, r,
                      keep=keep.double(), p=p, seed=seed)


@gpu
@needs_cuda
def test_gpu_bias_gelu():
    cuda = torch.device("cuda")
    x = leaf(64 * 197, 3072, dtype=torch.bfloat16, device=cuda)
    b = leaf(3072, dtype=torch.bfloat16, device=cuda)
    y = gelu_mod.bias_gelu(x, b)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64, b64 = as64(x), as64(b)
    y64 = ref.bias_gelu(x64, b64)
    (y64 * g.double()).sum().backward()
    for out, expected in ((y, y64), (x.grad, x64.grad), (b.grad, b64.grad)):
        assert rel_err(out, expected) <= 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.1), ("none", 0.0)])
def test_gpu_linear_cross_entropy_lm_head(reduction, smoothing):
    cuda = torch.device("cuda")
    h = leaf(128, 30, 768, dtype=torch.bfloat16, device=cuda)
    w = leaf(30524, 768, dtype=torch.bfloat16, scale=0.05, device=cuda)
    b = leaf(30524, dtype=torch.bfloat16, scale=0.1, device=cuda)
    labels = torch.randint(0, 30524, (128, 30), device=cuda)
    labels[:, 20:] = -100  # padding
    _check_ce(h, w, b, labels, smoothing, reduction, chunk_rows=None, tol=1e-2)
