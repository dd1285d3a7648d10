"""The optional native CUDA extension (``kernels/cuda``, the ``cuda`` backend of blip_fast.ops).

CPU tests (CI, where the extension is not built): the backend reports itself unavailable with
the build command, explicit requests raise it, ``auto`` passes over it, the build helpers and
setup.py's opt-in need no compiler unless asked.

GPU tests (``-m gpu``, on a device where ``python -m blip_fast.native build`` has run; with
``BLIP_FAST_REQUIRE_NATIVE=1`` a missing extension fails instead of skipping): LayerNorm forward
and every gradient against the float64 reference in float32/bfloat16/float16 at BLIP's widths
and odd ones, outputs allocated from poisoned memory; the momentum update bit-identical to the
reference over BLIP_Pretrain's momentum parameters and mixed lists; torch.library.opcheck,
torch.compile(fullgraph=True) and CUDA-graph capture.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from blip_fast import native, ops
from blip_fast.ops import _dispatch, cuda_backend
from blip_fast.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.gpu
BUILD_COMMAND = "python -m blip_fast.native build"


# ============================================================================================
# CPU: the extension is optional
# ============================================================================================

@pytest.fixture
def unbuilt_backend(monkeypatch):
    """The ``cuda`` backend as it loads where nothing is built and apex is absent, registered in
    place of whatever this machine has."""
    monkeypatch.delenv(native.LIB_ENV, raising=False)
    monkeypatch.setattr(native, "find_library", lambda: None)
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError
    backend = cuda_backend.load()
    monkeypatch.setitem(_dispatch._REGISTRY, "cuda", backend)
    return backend


def test_unbuilt_backend_names_the_build_command(unbuilt_backend):
    reason = unbuilt_backend.unavailable_reason
    assert reason is not None and BUILD_COMMAND in reason and "BLIP_FAST_BUILD_CUDA=1" in reason
    assert ops.available_backends()["cuda"] == reason


def test_explicit_cuda_request_raises_with_the_fix(unbuilt_backend):
    x = torch.randn(3, 8)
    with ops.use_backend("cuda"):
        with pytest.raises(ops.BackendUnavailableError, match=re.escape(BUILD_COMMAND)):
            ops.layer_norm(x, None, None, 1e-6)
        with pytest.raises(ops.BackendUnavailableError, match=re.escape(BUILD_COMMAND)):
            ops.momentum_update([torch.zeros(2)], [torch.ones(2)], 0.9)


def test_auto_passes_over_the_unbuilt_backend_silently(unbuilt_backend, caplog):
    x = torch.randn(3, 8)
    with caplog.at_level(logging.WARNING):
        name, _ = ops.resolve("layer_norm", x, None, None, 1e-6)
        out = ops.layer_norm(x, None, None, 1e-6)
    assert name != "cuda" and not caplog.records
    assert torch.allclose(out, torch.nn.functional.layer_norm(x, (8,), eps=1e-6), atol=1e-6)
    p_m, p = [torch.zeros(4)], [torch.ones(4)]
    ops.momentum_update(p_m, p, 0.75)
    assert torch.equal(p_m[0], torch.full((4,), 0.25))


def test_library_path_from_the_environment_is_reported(monkeypatch, tmp_path):
    missing = tmp_path / "libblip_fast_cuda.so"
    monkeypatch.setenv(native.LIB_ENV, str(missing))
    assert native.find_library() == str(missing)
    backend = cuda_backend.load()
    assert backend.unavailable_reason is not None and str(missing) in backend.unavailable_reason
    with pytest.raises(FileNotFoundError, match=native.LIB_ENV):
        native.load()


def test_native_build_needs_cmake_and_a_checkout(monkeypatch, tmp_path):
    assert native.source_root() == str(ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake here
    with pytest.raises(native.NativeBuildError, match="cmake is not on PATH"):
        native.build(build_dir=str(tmp_path / "build"))
    with pytest.raises(native.NativeBuildError, match="source checkout"):
        native.build(source_dir=str(tmp_path))


def test_setup_py_builds_the_extension_only_when_asked(tmp_path):
    """Without BLIP_FAST_BUILD_CUDA the package step needs no compiler; with it, the build runs
    (and here, with no cmake on PATH, stops with a message naming what is missing)."""
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")]
    plain = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "lib" / "blip_fast" / "native.py").is_file()
    assert not (tmp_path / "lib" / "blip_fast" / "_native").exists()
    opted = subprocess.run(cmd, cwd=ROOT, env={**env, native.BUILD_ENV: "1"}, capture_output=True, text=True,
                           timeout=120)
    assert opted.returncode != 0 and "cmake is not on PATH" in opted.stdout + opted.stderr


def test_cmakelists_builds_every_kernel_source():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    sources = set(re.findall(r"kernels/cuda/(\w+\.(?:cu|cpp))", cmake))
    on_disk = {p.name for p in (ROOT / "kernels" / "cuda").iterdir() if p.suffix in (".cu", ".cpp")}
    assert sources == on_disk
    assert "set(CMAKE_CUDA_ARCHITECTURES 80 90)" in cmake and native.DEFAULT_ARCHITECTURES == "80;90"
    launchers = (ROOT / "kernels" / "cuda" / "launchers.h").read_text()
    assert f"kLayerNormMaxN = {cuda_backend.MAX_N};" in launchers
    assert f"kLayerNormScalarMaxN = {cuda_backend.SCALAR_MAX_N};" in launchers
    ops_cpp = (ROOT / "kernels" / "cuda" / "ops.cpp").read_text()
    assert f"TORCH_LIBRARY({native.OP_NAMESPACE}, m)" in ops_cpp and cuda_backend.OP_NAMESPACE == native.OP_NAMESPACE


def test_layer_norm_checks_decline_what_the_kernels_do_not_take():
    x = torch.randn(2, 8)
    assert "dropout" in cuda_backend.why_not_layer_norm(x, None, None, 1e-6, dropout_p=0.1)
    assert "cpu" in cuda_backend.why_not_layer_norm(x, None, None, 1e-6)
    assert "online" in cuda_backend.why_not_momentum_update([x], [], 0.9)
    assert "CUDA" in cuda_backend.why_not_momentum_update([x], [x], 0.9)


def _loaded_library(prefix: str) -> Optional[str]:
    with open("/proc/self/maps") as maps:
        return next((w for w in maps.read().split() if os.path.basename(w).startswith(prefix)), None)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_build_check_recognises_a_library_that_carries_the_cxx_runtime():
    """A build that linked libstdc++ statically is refused (its first formatted error message would
    crash the process): the check finds libstdc++'s own internals in a library, not in libtorch's."""
    runtime, c10 = _loaded_library("libstdc++.so"), _loaded_library("libc10.so")
    if runtime is None or c10 is None:
        pytest.skip("libstdc++ or libc10 not loaded from a file")
    assert native.bundles_cxx_runtime(runtime)
    assert not native.bundles_cxx_runtime(c10)


def test_native_info_reports_an_unbuilt_library(monkeypatch):
    monkeypatch.delenv(native.LIB_ENV, raising=False)
    monkeypatch.setattr(native, "find_library", lambda: None)
    text = native.info()
    assert "library: not built" in text and "not loaded" in text


# ============================================================================================
# GPU: parity, compile, graphs
# ============================================================================================

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """``||out - expected|| / ||expected||`` in float64 (NaN if ``out`` has any NaN)."""
    expected = expected.double()
    return ((out.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


@pytest.fixture
def native_ops():
    """The loaded extension's op namespace (fails instead of skipping with BLIP_FAST_REQUIRE_NATIVE=1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    backend = _dispatch.get_backend_object("cuda")
    reason = backend.unavailable_reason
    if reason is None and not native.is_loaded():
        reason = "the cuda backend runs on apex here, not on the native extension"
    if reason is not None:
        if os.environ.get("BLIP_FAST_REQUIRE_NATIVE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    torch.manual_seed(1234)
    return torch.ops.blip_fast_cuda


def poison_allocator() -> None:
    """Fill the caching allocator's free memory with 0xFF bytes (NaN in every float dtype), so
    that outputs a kernel leaves unwritten show up: one large block (carved up for large
    tensors) and small-pool blocks for the statistics and parameter gradients."""
    free, _ = torch.cuda.mem_get_info()
    big = torch.full((min(1 << 30, free // 4),), 255, dtype=torch.uint8, device="cuda")
    small = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in (512, 4096, 65536, 262144) * 8]
    del big, small


def leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Fresh random input on the GPU (never zeros) that records its gradient."""
    return (torch.randn(*shape, device="cuda") * scale + shift).to(dtype).requires_grad_()


def as64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def check_layer_norm(x, w, b, eps, r=None, backend: str = "cuda"):
    """Forward and every gradient through ``ops.layer_norm`` on ``backend`` against the float64
    reference; also no worse than the reference backend in the inputs' own dtypes."""
    poison_allocator()
    with ops.use_backend(backend):
        y = ops.layer_norm(x, w, b, eps, residual=r)
    out_dtype = x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)
    assert y.shape == x.shape and y.dtype == out_dtype and y.is_contiguous()
    g = torch.randn(y.shape, device="cuda").to(y.dtype)
    leaves = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
    poison_allocator()
    grads = torch.autograd.grad(y, leaves, g)

    x64, w64, b64, r64 = as64(x), as64(w), as64(b), as64(r)
    y64 = ref.layer_norm(x64, w64, b64, eps, residual=r64)
    leaves64 = [t for t in (x64, r64, w64, b64) if t is not None and t.requires_grad]
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    # the reference backend in the inputs' dtypes, for scale (it rounds x + residual first); mixed
    # dtypes promoted to a common one, as F.layer_norm needs (autocast runs it in float32)
    common = functools.reduce(torch.promote_types, [t.dtype for t in (x, w, b, r) if t is not None])
    xr, wr, br, rr = (None if t is None else t.detach().to(common).requires_grad_(t.requires_grad)
                      for t in (x, w, b, r))
    y_ref = ref.layer_norm(xr, wr, br, eps, residual=rr)
    grads_ref = torch.autograd.grad(y_ref, [t for t in (xr, rr, wr, br) if t is not None and t.requires_grad], g)

    tol = max(TOL[t.dtype] for t in (x, r, w, b) if t is not None)
    # theirs rounded to our output dtypes: "no worse than the reference" at the same precision
    errors = {"y": (rel_err(y, y64), rel_err(y_ref.to(y.dtype), y64))}
    names = [n for n, t in (("x", x), ("residual", r), ("weight", w), ("bias", b)) if t is not None and t.requires_grad]
    for name, got, t, want, theirs in zip(names, grads, leaves, grads64, grads_ref):
        assert got.dtype == t.dtype and got.shape == t.shape, name
        errors[name] = (rel_err(got, want), rel_err(theirs.to(got.dtype), want))
    for name, (ours, theirs) in errors.items():
        assert ours <= tol, (name, errors)
        assert ours <= 2 * theirs + 1e-6, (name, errors)
    return errors


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,rows", [(768, 64 * 197), (1024, 64 * 197), (769, 1000), (40, 333)])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_layer_norm_parity(native_ops, dtype, n, rows, residual):
    x = leaf(rows, n, dtype=dtype, scale=2.0, shift=0.3)
    r = leaf(rows, n, dtype=dtype) if residual else None
    check_layer_norm(x, leaf(n, dtype=dtype, shift=1.0), leaf(n, dtype=dtype), 1e-12 if residual else 1e-6, r)


@gpu
@pytest.mark.parametrize("x_dtype,r_dtype,p_dtype", [
    (torch.bfloat16, torch.float32, torch.float32),   # autocast: bf16 sublayer + fp32 stream
    (torch.float16, torch.float32, torch.float16),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, None, torch.float32),            # fp32 master weights, bf16 activations
])
def test_gpu_layer_norm_mixed_dtypes(native_ops, x_dtype, r_dtype, p_dtype):
    x = leaf(4, 35, 768, dtype=x_dtype)
    r = leaf(4, 35, 768, dtype=r_dtype) if r_dtype else None
    check_layer_norm(x, leaf(768, dtype=p_dtype, shift=1.0), leaf(768, dtype=p_dtype), 1e-12, r)


@gpu
@pytest.mark.parametrize("n,dtype", [(4096, torch.bfloat16), (8192, torch.float32), (4095, torch.float16),
                                     (2048, torch.bfloat16), (1536, torch.float32)])
def test_gpu_layer_norm_wide_rows(native_ops, n, dtype):
    check_layer_norm(leaf(97, n, dtype=dtype), leaf(n, dtype=dtype, shift=1.0), leaf(n, dtype=dtype), 1e-6,
                     leaf(97, n, dtype=dtype))


@gpu
def test_gpu_layer_norm_layouts_and_optional_parts(native_ops):
    # weight without bias, no affine at all, frozen weight
    check_layer_norm(leaf(50, 768, dtype=torch.bfloat16), leaf(768, dtype=torch.bfloat16, shift=1.0), None, 1e-6)
    check_layer_norm(leaf(50, 768, dtype=torch.float32), None, None, 1e-6, leaf(50, 768, dtype=torch.float32))
    frozen = leaf(768, dtype=torch.float32, shift=1.0).detach()
    check_layer_norm(leaf(50, 768, dtype=torch.float32), frozen, leaf(768, dtype=torch.float32), 1e-6)
    # a transposed (non-contiguous) input and a view that is not 16-byte aligned (element path)
    xt = leaf(768, 64, dtype=torch.bfloat16).detach().t().requires_grad_()
    check_layer_norm(xt, leaf(768, dtype=torch.bfloat16, shift=1.0), leaf(768, dtype=torch.bfloat16), 1e-6)
    buf = torch.randn(64 * 768 + 1, device="cuda")
    xu = buf[1:].view(64, 768).requires_grad_()
    assert xu.data_ptr() % 16
    check_layer_norm(xu, leaf(768, dtype=torch.float32, shift=1.0), leaf(768, dtype=torch.float32), 1e-6)
    # no rows: empty output, zero parameter gradients
    x0 = leaf(0, 768, dtype=torch.float32)
    w0, b0 = leaf(768, dtype=torch.float32), leaf(768, dtype=torch.float32)
    with ops.use_backend("cuda"):
        y0 = ops.layer_norm(x0, w0, b0, 1e-6)
    dw, db = torch.autograd.grad(y0.sum(), (w0, b0))
    assert y0.shape == (0, 768) and not dw.any() and not db.any()


@gpu
def test_gpu_layer_norm_dispatch(native_ops, monkeypatch):
    x = leaf(8, 768, dtype=torch.bfloat16)
    # auto takes the backend only for the ops measured faster (AUTO_OPS)
    monkeypatch.setattr(cuda_backend, "AUTO_OPS", frozenset())
    assert ops.resolve("layer_norm", x, None, None, 1e-6)[0] != "cuda"
    monkeypatch.setattr(cuda_backend, "AUTO_OPS", frozenset({"layer_norm"}))
    name, fn = ops.resolve("layer_norm", x, None, None, 1e-6)
    assert name == "cuda" and fn is cuda_backend.layer_norm
    # dropout is not in the native kernel: auto goes on to the next backend, explicit raises
    assert ops.resolve("layer_norm", x, None, None, 1e-6, residual=x, dropout_p=0.1)[0] != "cuda"
    with ops.use_backend("cuda"), pytest.raises(ops.BackendUnavailableError, match="dropout"):
        ops.layer_norm(x, None, None, 1e-6, dropout_p=0.1)


@gpu
def test_gpu_layer_norm_opcheck(native_ops):
    x = torch.randn(6, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(6, 768, device="cuda", dtype=torch.float32, requires_grad=True)
    w = torch.randn(768, device="cuda", requires_grad=True)
    b = torch.randn(768, device="cuda", requires_grad=True)
    torch.library.opcheck(native_ops.layer_norm, (x, w, b, 1e-6, r))
    torch.library.opcheck(native_ops.layer_norm, (x, None, None, 1e-6, None))
    # the forward and backward ops have no autograd of their own: plain inputs
    x, r, w, b = (t.detach() for t in (x, r, w, b))
    y, mean, rstd = native_ops.layer_norm_fwd(x, w, b, 1e-6, r, True)
    torch.library.opcheck(native_ops.layer_norm_fwd, (x, w, b, 1e-6, r, True))
    dy = torch.randn_like(y)
    torch.library.opcheck(native_ops.layer_norm_bwd, (dy, x, r, w, b, mean, rstd, True, True, True, True))
    torch.library.opcheck(native_ops.momentum_update_,
                          ([torch.randn(5, device="cuda")], [torch.randn(5, device="cuda")], 0.9))


@gpu
def test_gpu_layer_norm_compiles_fullgraph(native_ops):
    x = leaf(4, 30, 768, dtype=torch.bfloat16)
    r = leaf(4, 30, 768, dtype=torch.bfloat16)
    w, b = leaf(768, dtype=torch.float32, shift=1.0), leaf(768, dtype=torch.float32)

    def step(x, r, w, b):
        return ops.layer_norm(x, w, b, 1e-12, residual=r).float().square().mean()

    with ops.use_backend("cuda"):
        eager = torch.autograd.grad(step(x, r, w, b), (x, r, w, b))
        compiled = torch.compile(step, fullgraph=True)
        loss = compiled(x, r, w, b)
        grads = torch.autograd.grad(loss, (x, r, w, b))
    for e, c in zip(eager, grads):
        assert rel_err(c, e) <= 1e-2


@gpu
def test_gpu_layer_norm_cuda_graph(native_ops):
    x = leaf(512, 768, dtype=torch.bfloat16)
    w, b = leaf(768, dtype=torch.bfloat16, shift=1.0), leaf(768, dtype=torch.bfloat16)
    g = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    static = {}

    def step():
        y = native_ops.layer_norm(x, w, b, 1e-6, None)
        static["y"] = y
        static["grads"] = torch.autograd.grad(y, (x, w, b), g)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    eager = (static["y"].clone(), [t.clone() for t in static["grads"]])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    with torch.no_grad():
        x.mul_(0.5).add_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    with ops.use_backend("reference"):
        y_ref = ops.layer_norm(x.detach(), w.detach(), b.detach(), 1e-6)
    assert rel_err(static["y"], y_ref) <= 1e-2
    assert not torch.equal(static["y"], eager[0])  # the replay saw the new input


# ----------------------------------------------------------------------------- momentum update

def _reference_update(params_m, params, momentum):
    out = [p.clone() for p in params_m]
    with ops.use_backend("reference"):
        ops.momentum_update(out, params, momentum)
    return out


def _assert_bitwise(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item()
            raise AssertionError(f"pair #{i} {tuple(a.shape)} {a.dtype}: max |diff| {diff}")


@gpu
def test_gpu_momentum_update_blip_pretrain_parameters(native_ops):
    """Bit-identical to the reference over BLIP_Pretrain's momentum pairs (ViT-B/16, BERT with
    cross-attention, both projections: 470-odd tensors of mixed sizes), twice in a row."""
    from blip_fast.models import BLIP_Pretrain

    with torch.device("cuda"):
        model = BLIP_Pretrain(queue_size=64)
    online, momentum = model._momentum_params()
    assert len(online) > 400
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p) * 0.01)
    for m in (0.995, 0.9):
        want = _reference_update(momentum, online, m)
        version = momentum[0]._version
        poison_allocator()
        with ops.use_backend("cuda"):
            ops.momentum_update(momentum, online, m)
        _assert_bitwise(momentum, want)
        assert momentum[0]._version > version
    with ops.use_backend("cuda"):
        assert ops.resolve("momentum_update", momentum, online, 0.995)[0] == "cuda"


@gpu
def test_gpu_momentum_update_mixed_lists(native_ops):
    """Every dtype pair, sizes around the vector and chunk boundaries, tensors that are not
    16-byte aligned, and more pairs than one launch takes."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    sizes = (1, 3, 8, 17, 4096, 65535, 65536, 65537, 3 * 65536 + 5, 768 * 3072)
    params_m, params = [], []
    for i, size in enumerate(sizes * 3):
        dm, dp = dtypes[i % 3], dtypes[(i // 3) % 3]
        params_m.append(torch.randn(size, device="cuda").to(dm))
        params.append(torch.randn(size, device="cuda").to(dp))
    for dm in dtypes:  # views one element in: contiguous, not aligned
        params_m.append(torch.randn(10001, device="cuda").to(dm)[1:])
        params.append(torch.randn(10001, device="cuda").to(dm)[1:])
    params_m += [torch.randn(7, device="cuda") for _ in range(1500)]
    params += [torch.randn(7, device="cuda") for _ in range(1500)]
    want = _reference_update(params_m, params, 0.995)
    native_ops.momentum_update_(params_m, params, 0.995)
    _assert_bitwise(params_m, want)


@gpu
def test_gpu_momentum_update_rejects_bad_pairs(native_ops):
    a = torch.randn(4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="not contiguous"):
        native_ops.momentum_update_([a.t()], [a], 0.9)
    with pytest.raises(RuntimeError, match="elements"):
        native_ops.momentum_update_([a], [torch.randn(3, device="cuda")], 0.9)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native_ops.momentum_update_([a.double()], [a.double()], 0.9)


@gpu
def test_gpu_momentum_update_through_the_backend_rejects_bad_pairs(native_ops):
    a = torch.randn(4, 4, device="cuda")
    with ops.use_backend("cuda"):
        with pytest.raises(ValueError, match="not contiguous"):
            ops.momentum_update([a.t()], [a], 0.9)
        with pytest.raises(ValueError, match="elements"):
            ops.momentum_update([a], [torch.randn(3, device="cuda")], 0.9)
        with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
            ops.momentum_update([a.double()], [a.double()], 0.9)


@gpu
def test_gpu_momentum_update_in_a_cuda_graph(native_ops):
    params_m = [torch.randn(n, device="cuda") for n in (5, 70000, 768)]
    params = [torch.randn_like(p) for p in params_m]
    native_ops.momentum_update_(params_m, params, 0.99)  # warm up outside the capture
    start = [p.clone() for p in params_m]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        native_ops.momentum_update_(params_m, params, 0.99)
    for p_m, s in zip(params_m, start):
        p_m.copy_(s)
    graph.replay()
    graph.replay()
    _assert_bitwise(params_m, _reference_update(_reference_update(start, params, 0.99), params, 0.99))
