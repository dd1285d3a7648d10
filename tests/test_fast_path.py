"""The fast path's exactness guarantees that the CPU can check: mixed precision keeps the
contrastive part in float32, and activation checkpointing replays the fused kernels' dropout."""
import copy

import pytest
import torch

from blip_fast import use_backend
from blip_fast.models import BertLMHeadModel, load_med_config
from conftest import TINY_MED, rel_err
from test_models import random_tokens, tiny_pretrain, IMG


def test_bf16_autocast_keeps_itc_in_float32():
    model = tiny_pretrain(queue_size=8).eval()
    model_bf16 = copy.deepcopy(model)
    images, tokens = torch.randn(4, 3, IMG, IMG), random_tokens(4, 30)
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
    ref = model(images, tokens, alpha=0.4, hard_negatives=negatives)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model_bf16(images, tokens, alpha=0.4, hard_negatives=negatives)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32 and torch.isfinite(a)
        assert rel_err(a, b) < 3e-2
    for name in ("image_queue", "text_queue", "temp"):
        assert getattr(model_bf16, name).dtype == torch.float32
    # the enqueued momentum features are unit vectors in float32
    ptr = int(model_bf16.queue_ptr)
    written = model_bf16.image_queue[:, ptr - 4:ptr]
    assert torch.allclose(written.norm(dim=0), torch.ones(4), atol=1e-5)
    sum(out).backward()
    assert all(torch.isfinite(p.grad).all() for p in model_bf16.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_checkpointed_decoder_replays_kernel_dropout(backend):
    """Recomputation in backward draws the same dropout masks, so gradients equal the plain run."""
    if backend == "triton":
        from blip_fast.ops import available_backends
        if available_backends().get("triton") is not None:
            pytest.skip(f"triton backend unavailable: {available_backends()['triton']}")
    torch.manual_seed(0)
    config = load_med_config(dict(TINY_MED, attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.2))
    model = BertLMHeadModel(config).train()
    tokens = random_tokens(2, 12)
    image = torch.randn(2, 5, 32)
    labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(1)
        with use_backend(backend):
            out = model(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image,
                        labels=labels)
            out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert rel_err(b, a) < 1e-6


def test_torch_compile_traces_the_pretraining_step_whole():
    """fullgraph=True: no graph break anywhere in forward (dispatch included); same numbers."""
    torch._dynamo.reset()
    model = tiny_pretrain(queue_size=8).eval()
    twin = copy.deepcopy(model)
    images, tokens = torch.randn(4, 3, IMG, IMG), random_tokens(4, 30)
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    ref = model(images, tokens, alpha=0.4, hard_negatives=negatives)
    out = compiled(images, tokens, alpha=0.4, hard_negatives=negatives)
    sum(ref).backward()
    sum(out).backward()
    for a, b in zip(out, ref):
        assert rel_err(a.detach(), b.detach()) < 1e-5
    for (n, a), b in zip(twin.named_parameters(), model.parameters()):
        if b.grad is not None:
            assert rel_err(a.grad, b.grad) < 1e-4, n
    assert torch.equal(twin.queue_ptr, model.queue_ptr)
    assert rel_err(twin.image_queue, model.image_queue) < 1e-6


@pytest.mark.parametrize("autocast", [False, True])
def test_vit_block_fused_residual_norm_is_the_original_block(autocast):
    """The ViT block hands its first residual add and norm2 to ops.add_layer_norm; on the
    reference path that is bit for bit the original ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``,
    in float32 and under bf16 autocast (where norm2's output is cast once, as the matmul would),
    forward and every gradient."""
    from blip_fast.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=4).train()
    block = vit.blocks[0]

    def original(x):
        x = x + block.drop_path(block.attn(block.norm1(x)))
        return x + block.drop_path(block.mlp(block.norm2(x)))

    x = torch.randn(3, 5, 48)
    results = []
    for fn in (block, original):
        xi = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        with use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(xi)
        out.float().pow(2).sum().backward()
        results.append((out, xi.grad, [p.grad.clone() for p in block.parameters()]))
    (out, gx, gp), (out_ref, gx_ref, gp_ref) = results
    assert out.dtype == out_ref.dtype and torch.equal(out, out_ref)
    assert torch.equal(gx, gx_ref)
    for g, g_ref in zip(gp, gp_ref):
        assert torch.equal(g, g_ref)


def test_vit_block_on_triton_matches_the_reference_block():
    """The same block with the Triton kernels (fused add + LayerNorm, attention, LayerNorm, GELU)
    against the reference path, float32. On the CPU interpreter only float32: its bfloat16 dots
    are not faithful (the bf16 autocast block runs on the device: tests/test_gpu_parity.py)."""
    pytest.importorskip("triton")
    from blip_fast.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=4).train()
    block = vit.blocks[0]
    x = torch.randn(3, 5, 48)
    results = {}
    for backend in ("triton", "reference"):
        xi = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = block(xi)
        out.pow(2).sum().backward()
        results[backend] = (out, xi.grad, [p.grad.clone() for p in block.parameters()])
    (out, gx, gp), (out_ref, gx_ref, gp_ref) = results["triton"], results["reference"]
    assert rel_err(out, out_ref) < 1e-5 and rel_err(gx, gx_ref) < 1e-5
    for g, g_ref in zip(gp, gp_ref):
        assert rel_err(g, g_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_vit_block_bf16_triton_matches_the_reference_block():
    """A ViT-B block at batch 8 under bf16 autocast: the Triton path (with the fused add +
    LayerNorm, which auto takes under BLIP_FAST_FUSED_ADD_LN=1) against the reference path."""
    pytest.importorskip("triton")
    from blip_fast.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=1, num_heads=12).cuda().train()
    block = vit.blocks[0]
    x = torch.randn(8, 197, 768, device="cuda")
    results = {}
    for backend in ("triton", "reference"):
        xi = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        with use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(xi)
        out.float().pow(2).sum().backward()
        results[backend] = (out, xi.grad, [p.grad.clone() for p in block.parameters()])
    (out, gx, gp), (out_ref, gx_ref, gp_ref) = results["triton"], results["reference"]
    assert rel_err(out, out_ref) < 1e-2 and rel_err(gx, gx_ref) < 2e-2
    for g, g_ref in zip(gp, gp_ref):
        assert rel_err(g, g_ref) < 3e-2
