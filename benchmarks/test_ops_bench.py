"""Op-level micro-benchmarks of :mod:`blip_fast.ops`, parametrised over every backend available
at run time (plus ``auto``).

    pytest benchmarks/ --benchmark-only                      # all ops, all backends
    pytest benchmarks/ --benchmark-only -k attention         # one op
    pytest benchmarks/ --benchmark-only --benchmark-json ops.json

On a GPU the shapes are BLIP's (ViT-B/16 at 224, batch 64; BERT-base, 30 tokens, batch 128; the
ITM cross-attention on 3 x 64 sequences; the decoder) in bfloat16; on the CPU they are small and
float32. Each backend runs alone (a backend that cannot take the call is skipped with its reason).
Inputs are random and rotated among three pre-generated sets; on CUDA every call ends with a
device synchronisation so the wall clock pytest-benchmark reads is the op's time.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import blip_fast  # noqa: E402
from blip_fast import ops  # noqa: E402
from blip_fast.ops import _dispatch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
N_SETS = 3

if CUDA:
    B, H, D, W, L, N_IMG, VOCAB = 64, 12, 64, 768, 30, 197, 30524
else:
    B, H, D, W, L, N_IMG, VOCAB = 2, 2, 32, 64, 30, 50, 30524
MLP = 4 * W


def _backends_for(op: str) -> List[str]:
    names = []
    for name, reason in blip_fast.available_backends().items():
        if reason is None and op in _dispatch.get_backend_object(name).ops:
            names.append(name)
    return sorted(names, key=lambda n: (n != "reference", n)) + [ops.AUTO]


def _padding(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    return torch.arange(length)[None, :] < lengths[:, None]


def _rand(*shape, gen, grad=False, dtype=None):
    t = torch.randn(*shape, generator=gen).to(DEVICE, dtype or DTYPE)
    return t.requires_grad_(grad)


# name -> (builder of (args, kwargs) for one input set given requires_grad, op name)
def _attention_case(batch, lq, lk, mask, causal):
    def build(gen, grad):
        q = _rand(batch, H, lq, D, gen=gen, grad=grad)
        k = _rand(batch, H, lk, D, gen=gen, grad=grad)
        v = _rand(batch, H, lk, D, gen=gen, grad=grad)
        kpm = _padding(batch, lk, gen).to(DEVICE) if mask else None
        return (q, k, v), {"key_padding_mask": kpm, "causal": causal}
    return build


CASES: Dict[str, Tuple[str, Callable]] = {
    "attention-vit_self": ("attention", _attention_case(B, N_IMG, N_IMG, False, False)),
    "attention-bert_self_padding": ("attention", _attention_case(2 * B, L, L, True, False)),
    "attention-cross": ("attention", _attention_case(3 * B, L, N_IMG, False, False)),
    "attention-decoder_causal": ("attention", _attention_case(B, L, L, True, True)),
    "layer_norm-vit": ("layer_norm", lambda gen, grad: (
        (_rand(B * N_IMG, W, gen=gen, grad=grad), _rand(W, gen=gen, grad=grad), _rand(W, gen=gen, grad=grad), 1e-6),
        {})),
    "layer_norm-bert_residual_dropout": ("layer_norm", lambda gen, grad: (
        (_rand(2 * B * L, W, gen=gen, grad=grad), _rand(W, gen=gen, grad=grad), _rand(W, gen=gen, grad=grad), 1e-12),
        {"residual": _rand(2 * B * L, W, gen=gen, grad=grad), "dropout_p": 0.1})),
    "bias_gelu-vit_mlp": ("bias_gelu", lambda gen, grad: (
        (_rand(B * N_IMG, MLP, gen=gen, grad=grad), _rand(MLP, gen=gen, grad=grad)), {})),
    "linear_gelu-vit_mlp": ("linear_gelu", lambda gen, grad: (
        (_rand(B * N_IMG, W, gen=gen, grad=grad), (0.02 * _rand(MLP, W, gen=gen)).requires_grad_(grad),
         _rand(MLP, gen=gen, grad=grad)), {})),
    "linear_cross_entropy-lm_head": ("linear_cross_entropy", lambda gen, grad: (
        (_rand(B * (L - 1), W, gen=gen, grad=grad), (0.02 * _rand(VOCAB, W, gen=gen)).requires_grad_(grad),
         _rand(VOCAB, gen=gen, grad=grad),
         torch.where(torch.rand(B * (L - 1), generator=gen) < 0.2, torch.tensor(-100),
                     torch.randint(0, VOCAB, (B * (L - 1),), generator=gen)).to(DEVICE)),
        {"label_smoothing": 0.1})),
}

PARAMS = [pytest.param(case, backend, mode, id=f"{case}-{backend}-{mode}")
          for case, (op, _) in CASES.items() for backend in _backends_for(op) for mode in ("fwd", "fwdbwd")]


@pytest.mark.parametrize("case,backend,mode", PARAMS)
def test_op(benchmark, case: str, backend: str, mode: str) -> None:
    op, build = CASES[case]
    grad = mode == "fwdbwd"
    gen = torch.Generator().manual_seed(0)
    sets: List[Tuple[Tuple[Any, ...], Dict[str, Any]]] = [build(gen, grad) for _ in range(N_SETS)]
    args0, kwargs0 = sets[0]
    if backend != ops.AUTO:
        reason = _dispatch.get_backend_object(backend).why_not(op, *args0, **kwargs0)
        if reason is not None:
            pytest.skip(f"{backend} cannot run {case}: {reason}")
    fn = getattr(ops, op)
    out0 = fn(*args0, **kwargs0)
    grads = [torch.randn_like(out0) if out0.dim() else None for _ in range(N_SETS)] if grad else None
    counter = itertools.count()

    def run() -> None:
        i = next(counter) % N_SETS
        args, kwargs = sets[i]
        if grad:
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor):
                    t.grad = None
            out = fn(*args, **kwargs)
            out.backward(grads[i]) if out.dim() else out.backward()
        else:
            with torch.no_grad():
                fn(*args, **kwargs)
        if CUDA:
            torch.cuda.synchronize()

    with ops.use_backend(backend):
        run()  # warm-up (compilation, autotuning)
        benchmark(run)
    shapes = {f"arg{i}": list(a.shape) for i, a in enumerate(args0) if isinstance(a, torch.Tensor)}
    benchmark.extra_info.update({"op": op, "backend": backend, "mode": mode, "device": str(DEVICE),
                                 "dtype": str(DTYPE).replace("torch.", ""), "shapes": shapes})
