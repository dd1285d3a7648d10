"""GPU fast path against the CPU reference path: the same weights and inputs, every model and head.

Run on a CUDA machine: ``python -m pytest -q -m gpu tests/test_gpu_parity.py``. The fast path is
``auto`` on the GPU (Triton / flash / SDPA kernels, multi-tensor momentum update); the reference
is the pure-PyTorch ``reference`` backend on the CPU in float32. Dropout is off (probabilities 0)
so both sides compute the same function; hard negatives are fixed.

Tolerances (relative error ||gpu - cpu|| / ||cpu||, float64), or 1.25x the distance of the reference
path run on the GPU in the same precision where that is larger (see _compare):
  float32 fast path: 1e-4 for losses/outputs and for every parameter group's gradient;
  bfloat16 autocast:  3e-2 for losses/outputs, 6e-2 for gradients (bf16 has an 8-bit mantissa).
"""
import copy

import pytest
import torch

from blip_fast import use_backend
from blip_fast.models import BLIP_ITM, BLIP_NLVR, BLIP_Pretrain
from conftest import rel_err
from test_models import random_tokens

pytestmark = pytest.mark.gpu

IMG = 64
VIT = {"embed_dim": 128, "depth": 2, "num_heads": 2}  # head dim 64 as the real models
MED = {
    "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 128,
    "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
    "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "vocab_size": 30524,
    "encoder_width": 128, "add_cross_attention": True,
}
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 6e-2)}
GROUPS = ("visual_encoder.", "text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.",
          "cls_head.", "temp")


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 means float32: no TF32 in cuBLAS or cuDNN (the patch-embedding convolution)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run(model, device, dtype, backend, fn):
    with use_backend(backend), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        outs = fn(model, device)
    loss = sum(o.float().sum() for o in outs)
    loss.backward()
    grads = {g: [p.grad.double().flatten() for n, p in model.named_parameters()
                 if n.startswith(g) and p.grad is not None] for g in GROUPS}
    return [o.detach().double().cpu() for o in outs], {g: torch.cat(v).cpu() for g, v in grads.items() if v}


def _compare(build, fn, dtype):
    """Fast path on the GPU against the reference path on the CPU in float32.

    The bound is TOL[dtype], or 1.25x the distance of the reference path itself run on the GPU in
    the same precision where that is larger (e.g. cuBLAS summation order through 8 layers): the
    fast path must be no less accurate than the reference path on the same hardware.
    """
    torch.manual_seed(0)
    cpu_model = build()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    gpu_ref_model = copy.deepcopy(cpu_model).cuda()
    ref_out, ref_grads = _run(cpu_model, torch.device("cpu"), torch.float32, "reference", fn)
    out, grads = _run(gpu_model, torch.device("cuda"), dtype, "auto", fn)
    base_out, base_grads = _run(gpu_ref_model, torch.device("cuda"), dtype, "reference", fn)
    tol_out, tol_grad = TOL[dtype]
    report = []
    for i, (a, b, c) in enumerate(zip(out, ref_out, base_out)):
        err, base = rel_err(a, b), rel_err(c, b)
        report.append(f"output {i}: fast {err:.2e}, gpu reference {base:.2e}")
        assert err < max(tol_out, 1.25 * base), report
    assert grads.keys() == ref_grads.keys()
    for g in grads:
        err, base = rel_err(grads[g], ref_grads[g]), rel_err(base_grads[g], ref_grads[g])
        report.append(f"grad {g}: fast {err:.2e}, gpu reference {base:.2e}")
        assert err < max(tol_grad, 1.25 * base), report
    print("\n".join(report))
    return cpu_model, gpu_model


def _inputs(device, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMG, IMG, generator=g).to(device)
    tokens = random_tokens(batch, 30, seed=seed)
    return images, tokens.__class__(tokens.input_ids.to(device), tokens.attention_mask.to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pretrain(dtype):
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))

    def step(model, device):
        images, tokens = _inputs(device, 4)
        return model(images, tokens, alpha=0.4, hard_negatives=negatives)

    cpu_model, gpu_model = _compare(
        lambda: BLIP_Pretrain(med_config=MED, image_size=IMG, vit=VIT, embed_dim=32, queue_size=16), step, dtype)
    # the momentum update and the queues written by the step agree too
    for name in ("image_queue", "text_queue"):
        assert rel_err(getattr(gpu_model, name).cpu(), getattr(cpu_model, name)) < TOL[dtype][0]
    assert torch.equal(gpu_model.queue_ptr.cpu(), cpu_model.queue_ptr)
    for (n, a), b in zip(gpu_model.visual_encoder_m.named_parameters(), cpu_model.visual_encoder_m.parameters()):
        assert rel_err(a.detach().cpu(), b.detach()) < 1e-6, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["itm", "itc"])
def test_itm(dtype, head):
    def fwd(model, device):
        images, tokens = _inputs(device, 3)
        return [model(images, tokens, match_head=head)]

    _compare(lambda: BLIP_ITM(med_config=MED, image_size=IMG, vit=VIT, embed_dim=32), fwd, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nlvr(dtype):
    med = dict(MED, num_hidden_layers=8)

    def fwd(model, device):
        images, _ = _inputs(device, 4)
        _, tokens = _inputs(device, 2, seed=2)
        targets = torch.tensor([0, 1], device=device)
        return [model(images, tokens, targets, train=True), model(images, tokens, targets, train=False)]

    _compare(lambda: BLIP_NLVR(med_config=med, image_size=IMG, vit=VIT), fwd, dtype)


def test_pretrain_step_has_no_host_sync():
    """A bf16 training step on the fast path issues no host-device synchronisation."""
    torch.manual_seed(0)
    model = BLIP_Pretrain(med_config=MED, image_size=IMG, vit=VIT, embed_dim=32, queue_size=16).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, tokens = _inputs(torch.device("cuda"), 4)
    for step in range(3):  # the first steps compile kernels and warm allocators
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sum(model(images, tokens, alpha=0.4))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
