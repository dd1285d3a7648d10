"""The Triton kernels' host side: direct launches, the torch.compile custom ops, graph-safe
dropout seeds and the ``auto`` routing of the triton backend.

On the CPU the kernels run in the Triton interpreter (set in conftest.py) with tiny shapes; the
``gpu`` tests check the direct launch and CUDA-graph dropout on the device.
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from blip_fast import ops  # noqa: E402
from blip_fast.ops import reference as ref  # noqa: E402
from blip_fast.ops import triton_backend  # noqa: E402
from blip_fast._kernels.triton import attention as attn_mod  # noqa: E402
from blip_fast._kernels.triton import bias_gelu as gelu_mod  # noqa: E402
from blip_fast._kernels.triton import common  # noqa: E402
from blip_fast._kernels.triton import cross_entropy  # noqa: E402,F401  (registers its ops)
from blip_fast._kernels.triton import layer_norm as ln_mod  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((out.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------ direct launch

class _FakeCompiled:
    def __init__(self, n_params):
        self.calls = []
        self.function = object()
        self.packed_metadata = (4, 1, 0)
        self.src = types.SimpleNamespace(signature={i: "i32" for i in range(n_params)})
        self.n_regs = 64
        self.metadata = types.SimpleNamespace(shared=0)

    def run(self, *args):
        self.calls.append(args)


class _FakeKernel:
    """Stands for a JITFunction: ``kernel[grid](*args, **constexprs)`` returns its compiled kernel."""

    arg_names = ["X", "n", "stride", "BLOCK", "FLAG"]
    __name__ = "fake_kernel"

    def __init__(self):
        self.compiled = _FakeCompiled(len(self.arg_names))
        self.jit_calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return self.compiled
        return launch


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(common, "_direct_launch_supported", lambda: True)
    monkeypatch.setattr(common, "_stream_getters", lambda: (lambda: 0, lambda device: 1234))
    monkeypatch.setattr(common, "_launch_hooks_active", lambda: False)


def test_direct_launch_after_first_jit_launch(direct):
    kernel = _FakeKernel()
    launcher = common.KernelLauncher(kernel)
    plan = common.LaunchPlan((3, 2), dict(BLOCK=64, FLAG=True), num_warps=4, num_stages=2)
    x = torch.zeros(4)
    launcher(plan, (x, 10, 1))
    assert len(kernel.jit_calls) == 1 and plan.direct is not None
    grid, args, kwargs = kernel.jit_calls[0]
    assert grid == (3, 2, 1) and args == (x, 10, 1)
    assert kwargs == dict(BLOCK=64, FLAG=True, num_warps=4, num_stages=2)
    launcher(plan, (x, 11, 1))
    assert len(kernel.jit_calls) == 1, "the second launch must skip the JIT"
    (call,) = kernel.compiled.calls
    # grid, stream, function, packed metadata, no launch metadata or hooks, then every argument
    # in signature order, constexprs included.
    assert call[:4] == (3, 2, 1, 1234)
    assert call[4] is kernel.compiled.function and call[5] == (4, 1, 0)
    assert call[6:9] == (None, None, None)
    assert call[9:] == (x, 11, 1, 64, True)


def test_direct_launch_switches_and_checks(direct):
    kernel = _FakeKernel()
    launcher = common.KernelLauncher(kernel)
    plan = common.LaunchPlan((1,), dict(BLOCK=64, FLAG=False), num_warps=4)
    x = torch.zeros(4)
    launcher(plan, (x, 16, 1))
    common.set_direct_launch(False)
    try:
        launcher(plan, (x, 16, 1))
    finally:
        common.set_direct_launch(True)
    assert len(kernel.jit_calls) == 2 and not kernel.compiled.calls
    previous = common.set_launch_checks(True)
    try:
        launcher(plan, (x, 32, 1))  # 32 specialises like 16 (a multiple of 16): fine
        with pytest.raises(RuntimeError, match="plan key is incomplete"):
            launcher(plan, (x, 17, 1))  # 17 would have compiled another kernel
    finally:
        common.set_launch_checks(previous)


def test_direct_launch_rebinds_after_the_compiled_hook(direct):
    """A hook that resizes the grid (and so the loop counts passed in) forces one more launch
    through the JIT, so that the direct launch never reuses a kernel specialised for the old
    values."""
    kernel = _FakeKernel()
    launcher = common.KernelLauncher(kernel)
    plan = common.LaunchPlan((1,), dict(BLOCK=64, FLAG=False), num_warps=4,
                             on_compiled=lambda p, c: p.set_grid((9,)))
    for _ in range(3):
        launcher(plan, (torch.zeros(1), 1, 1))
    assert len(kernel.jit_calls) == 2 and len(kernel.compiled.calls) == 1
    assert kernel.jit_calls[1][0] == (9, 1, 1)


def test_specialization_respects_do_not_specialize():
    generic = (False, True)
    assert common.specialization((16, 16), generic)[1] == common.specialization((16, 17), generic)[1]
    assert common.specialization((16, 1), generic)[0] != common.specialization((17, 1), generic)[0]


def test_direct_launch_refuses_unknown_layouts(direct):
    kernel = _FakeKernel()
    kernel.compiled.src.signature = {0: "i32"}  # a launcher that takes other arguments
    plan = common.LaunchPlan((1,), dict(BLOCK=64, FLAG=False), num_warps=4)
    launcher = common.KernelLauncher(kernel)
    for _ in range(2):
        launcher(plan, (torch.zeros(1), 1, 1))
    assert plan.direct is None and len(kernel.jit_calls) == 2


def test_on_compiled_hook_runs_once(direct):
    seen = []
    plan = common.LaunchPlan((1,), dict(BLOCK=64, FLAG=False), num_warps=4,
                             on_compiled=lambda p, c: (seen.append(c), p.set_grid((7,))))
    kernel = _FakeKernel()
    launcher = common.KernelLauncher(kernel)
    for _ in range(3):
        launcher(plan, (torch.zeros(1), 1, 1))
    assert seen == [kernel.compiled] and plan.grid == (7, 1, 1)


def test_specialization_matches_triton_rules():
    spec = common.specialization((1, 16, 17, 2**40, 0.5, True))
    assert spec[0] == (True, False, True) and spec[1] == (False, True, True)
    assert spec[2] == (False, False, True) and spec[3] == (False, True, False)
    assert spec[4] is float and spec[5] is bool
    t = torch.zeros(8, dtype=torch.float32)
    assert common.specialization((t,))[0] == (torch.float32, True)
    assert common.specialization((t[1:],))[0] == (torch.float32, False)


def test_new_output_layout_and_poison():
    out = common.new_output((2, 3, 5, 4), torch.float32, DEVICE, order=(0, 2, 1, 3))
    assert out.shape == (2, 3, 5, 4) and out.transpose(1, 2).is_contiguous()
    with common.poison_outputs():
        assert torch.isnan(common.new_output((3, 4), torch.float32, DEVICE)).all()


# ------------------------------------------------------------------------------- dropout seeds

def test_seed_is_a_device_tensor_from_torch_rng():
    torch.manual_seed(5)
    a = common.draw_seed(DEVICE)
    torch.manual_seed(5)
    b = common.draw_seed(DEVICE)
    assert a.device.type == DEVICE.type and a.dtype == torch.int64 and a.numel() == 1
    assert torch.equal(a, b) and not torch.equal(a, common.draw_seed(DEVICE))
    assert common.seed_tensor(17, DEVICE).item() == 17
    with pytest.raises(ValueError, match="one int32/int64 element"):
        common.seed_tensor(torch.zeros(2, dtype=torch.int64), DEVICE)


def test_dropout_recomputed_under_activation_checkpointing():
    """torch.utils.checkpoint restores the RNG state: the recomputed forward draws the same
    seed, so the gradients equal those of the plain run with the same seed."""
    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    x = torch.randn(9, 16, device=DEVICE, requires_grad=True)

    def block(q, k, v, x):
        out = attn_mod.attention(q, k, v, dropout_p=0.3)
        return ln_mod.layer_norm(out.sum(1).reshape(-1, 16)[:9], None, None, 1e-6, x, 0.3)

    torch.manual_seed(21)
    plain = torch.autograd.grad(block(q, k, v, x).square().sum(), (q, k, v, x))
    torch.manual_seed(21)
    ckpt = torch.utils.checkpoint.checkpoint(block, q, k, v, x, use_reentrant=False)
    again = torch.autograd.grad(ckpt.square().sum(), (q, k, v, x))
    for a, b in zip(plain, again):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------- custom ops

def test_custom_ops_are_registered():
    for name in ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "add_layer_norm_fwd",
                 "bias_gelu_fwd", "bias_gelu_bwd", "linear_cross_entropy_fwd", "linear_cross_entropy_bwd"):
        assert hasattr(torch.ops.blip_fast, name), name


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations and autograd registration of every forward op."""
    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, True, True, False, False]], device=DEVICE)
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    h = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    emb = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    labels = torch.tensor([[1, 5, -100], [7, 39, 2]], device=DEVICE)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    cases = [
        (torch.ops.blip_fast.attention_fwd, (q, k, v, mask, None, True, 0.0, 0.25)),
        (torch.ops.blip_fast.layer_norm_fwd, (x, w, w, 1e-6, x, 0.0, None)),
        (torch.ops.blip_fast.add_layer_norm_fwd, (x, x.detach().clone().requires_grad_(True), w, w, 1e-6,
                                                  torch.bfloat16)),
        (torch.ops.blip_fast.bias_gelu_fwd, (x, w)),
        (torch.ops.blip_fast.linear_cross_entropy_fwd,
         (h, emb, None, labels, 0.1, -100, "mean", None, True, True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=tests)


def test_compiled_fused_path_has_no_graph_break():
    """torch.compile traces attention, LayerNorm (post- and pre-LN), bias+GELU and the LM loss into one graph
    (fullgraph=True fails on any break) and matches eager, gradients included."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, 7, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3], device=DEVICE)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    emb = torch.randn(50, 32, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7), device=DEVICE)
    labels[1, 5:] = -100

    def step(q, k, v, w, emb):
        with ops.use_backend("triton"):
            ctx = ops.attention(q, k, v, key_padding_mask=mask, causal=True)
            hid = ctx.transpose(1, 2).reshape(2, 7, 32)
            hid = ops.layer_norm(ops.bias_gelu(hid, w), w, w, 1e-12, residual=hid)
            total, normed = ops.add_layer_norm(ops.bias_gelu(hid, w), hid, w, w, 1e-6)  # a pre-LN block
            return ops.linear_cross_entropy(normed + total, emb, None, labels, label_smoothing=0.1)

    eager = step(q, k, v, w, emb)
    grads = torch.autograd.grad(eager, (q, k, v, w, emb))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, w, emb)
    got_grads = torch.autograd.grad(got, (q, k, v, w, emb))
    assert rel_err(got, eager) < 1e-5
    for a, b in zip(got_grads, grads):
        assert rel_err(a, b) < 1e-5
    torch._dynamo.reset()


# --------------------------------------------------------------------------- auto routing

def test_auto_routing_follows_measured_crossovers(monkeypatch):
    """Eager calls too small for the triton kernels to beat the host overhead of their Python
    launch path go to the next backend; CUDA-graph capture and torch.compile always take triton."""
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    monkeypatch.setitem(triton_backend.EAGER_MIN_WORK, "attention",
                        {(True, False): 10**8, (True, True): 10**8, (False, False): 10**7, (False, True): 10**7})
    check = triton_backend._auto_attention
    big = torch.empty(64, 12, 197, 64, device="meta", requires_grad=True)
    tiny = torch.empty(1, 2, 8, 64, device="meta", requires_grad=True)
    assert check(big, big, big) is None
    assert check(tiny, tiny, tiny) is not None and "crossover" in check(tiny, tiny, tiny)
    # inference: its own (lower) threshold
    mid = torch.empty(1, 12, 64, 64, device="meta")  # 12.6 MFLOP: above 1e7, below 1e8
    assert check(mid, mid, mid) is None
    assert check(mid.requires_grad_(), mid, mid) is not None
    with torch.no_grad():
        assert check(mid, mid, mid) is None
    monkeypatch.setattr(triton_backend, "_capturing", lambda: True)
    assert check(tiny, tiny, tiny) is None
    monkeypatch.setattr(triton_backend, "_capturing", lambda: False)
    monkeypatch.setattr(triton_backend, "compiling", lambda: True)
    assert check(tiny, tiny, tiny) is None


def test_auto_routing_leaves_gpu_time_losses_to_sdpa(monkeypatch):
    """Long unmasked self-attention in training and head dim 128 go to the next backend, also
    under torch.compile (GPU time); masked text shapes and inference at long L stay on triton."""
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    check = triton_backend._auto_attention
    vit384 = torch.empty(32, 12, 577, 64, device="meta", requires_grad=True)
    assert "L >= 512" in check(vit384, vit384, vit384)
    with torch.no_grad():
        assert check(vit384, vit384, vit384) is None
    d128 = torch.empty(64, 6, 197, 128, device="meta", requires_grad=True)
    assert "head dim 128" in check(d128, d128, d128)
    monkeypatch.setattr(triton_backend, "compiling", lambda: True)
    assert check(d128, d128, d128) is not None
    text = torch.empty(192, 12, 35, 64, device="meta", requires_grad=True)
    image = torch.empty(192, 12, 577, 64, device="meta", requires_grad=True)
    mask = torch.ones(192, 577, dtype=torch.bool, device="meta")
    assert check(text, image, image, key_padding_mask=mask) is None


def test_auto_routing_of_layer_norm_and_linear_gelu(monkeypatch):
    """Eager training LayerNorm and linear+GELU go to torch's C++ autograd path (measured faster
    at every size); under torch.compile the LayerNorm kernel is taken; forward-only linear+GELU
    always goes to addmm + gelu (no GPU-time gain)."""
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    x = torch.empty(12608, 768, device="meta", requires_grad=True)
    w = torch.empty(768, device="meta", requires_grad=True)
    assert "every size" in triton_backend._auto_layer_norm(x, w, w, 1e-6)
    with torch.no_grad():
        assert triton_backend._auto_layer_norm(x, w, w, 1e-6) is None
    fc1 = torch.empty(3072, 768, device="meta", requires_grad=True)
    b = torch.empty(3072, device="meta", requires_grad=True)
    with torch.no_grad():
        assert "forward-only" in triton_backend._auto_linear_gelu(x, fc1, b)
    monkeypatch.setattr(triton_backend, "compiling", lambda: True)
    assert triton_backend._auto_layer_norm(x, w, w, 1e-6) is None
    assert triton_backend._auto_linear_gelu(x, fc1, b) is None
    with torch.no_grad():
        assert triton_backend._auto_linear_gelu(x, fc1, b) is not None


def test_auto_routing_thresholds_are_consistent():
    for op, table in triton_backend.EAGER_MIN_WORK.items():
        for key, threshold in table.items():
            assert threshold >= 0, (op, key)


def test_auto_never_picks_the_interpreter():
    q = torch.randn(1, 1, 4, 16)
    assert ops.resolve("attention", q, q, q)[0] != "triton"


# ------------------------------------------------------------------------------ GPU

@gpu
@needs_cuda
def test_gpu_direct_launch_and_alignment():
    """After the first call a plan launches directly; inputs of other alignment get their own
    plan (the key holds the alignment) and the right result."""
    previous = common.set_launch_checks(True)
    try:
        base = torch.randn(2 * 12 * 197 * 64 + 8, device="cuda", dtype=torch.bfloat16)
        for offset in (0, 0, 1, 1, 0):
            q = base[offset:offset + 2 * 12 * 197 * 64].view(2, 12, 197, 64)
            out = attn_mod.attention(q, q, q)
            assert rel_err(out, ref.attention(q.double(), q.double(), q.double())) < 2e-2
        plans = [p for p in attn_mod._FWD_PLANS.values() if p.grid[2] == 2]
        assert plans and all(p.direct is not None for p in plans)
    finally:
        common.set_launch_checks(previous)


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [300, 4 * 197])
def test_gpu_repeated_calls_match_reference(rows):
    """The first call of a shape goes through triton's JIT, the later ones launch directly (and
    the LayerNorm backward resizes its persistent grid after the first): every call must give
    the reference's values, gradients of shared parameters included."""
    previous = common.set_launch_checks(True)
    try:
        x = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
        x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
        want = torch.autograd.grad(ref.layer_norm(x64, w64, w64, 1e-6, residual=r64), (x64, r64, w64), g.double())
        want_gelu = torch.autograd.grad(ref.bias_gelu(x64, w64), (x64, w64), g.double())
        q, k, v = (torch.randn(4, 12, 197, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        go = torch.randn(4, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want_attn = torch.autograd.grad(ref.attention(q64, k64, v64), (q64, k64, v64), go.double())
        for _ in range(4):
            got = torch.autograd.grad(ln_mod.layer_norm(x, w, w, 1e-6, r), (x, r, w), g)
            for a, b in zip(got, want):
                assert rel_err(a, b) < 2e-2
            got = torch.autograd.grad(gelu_mod.bias_gelu(x, w), (x, w), g)
            for a, b in zip(got, want_gelu):
                assert rel_err(a, b) < 2e-2
            got = torch.autograd.grad(attn_mod.attention(q, k, v), (q, k, v), go)
            for a, b in zip(got, want_attn):
                assert rel_err(a, b) < 2e-2
    finally:
        common.set_launch_checks(previous)


@gpu
@needs_cuda
def test_gpu_dropout_under_cuda_graph_replay():
    """Each replay of a captured step draws fresh dropout masks (the seed lives in device memory
    and torch advances its Philox offset per replay); the gradient follows the replay's mask."""
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float32, requires_grad=True)
               for _ in range(3))
    x = torch.randn(128, 256, device="cuda", requires_grad=True)
    g = torch.randn(2, 4, 64, 64, device="cuda")
    static = {}

    def step():
        seed = common.draw_seed(q.device)
        static["seed"] = seed
        out = attn_mod.attention_impl(q, k, v, dropout_p=0.25)
        y = ln_mod.layer_norm(x, None, None, 1e-6, dropout_p=0.25)
        static["out"], static["y"] = out, y
        static["dv"], = torch.autograd.grad(out, (v,), g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append({n: t.clone() for n, t in static.items()})
    assert not torch.equal(outs[0]["out"], outs[1]["out"])
    assert not torch.equal(outs[0]["y"], outs[1]["y"])
    assert not torch.equal(outs[0]["dv"], outs[1]["dv"])
    # dv = P_dropped^T g: the keep fraction of the replay's mask shows in the gradient's norm
    # only statistically; check instead that eager runs with the same seed reproduce exactly.
    torch.manual_seed(3)
    a = attn_mod.attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(3)
    b = attn_mod.attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, b)


@gpu
@needs_cuda
def test_gpu_compiled_matches_eager():
    torch._dynamo.reset()
    q, k, v = (torch.randn(4, 12, 197, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(q, k, v, x, w):
        with ops.use_backend("triton"):
            out = ops.attention(q, k, v).transpose(1, 2).reshape(4, 197, 768)
            return ops.layer_norm(out, w, w, 1e-6, residual=x).float().square().mean()

    eager = step(q, k, v, x, w)
    compiled = torch.compile(step, fullgraph=True)(q, k, v, x, w)
    assert rel_err(compiled, eager) < 1e-2
    grads = torch.autograd.grad(compiled, (q, k, v, x, w))
    ref_grads = torch.autograd.grad(eager, (q, k, v, x, w))
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 2e-2
    torch._dynamo.reset()
