"""The vision-text dual encoder: API, CLIP loss (single process, simulated ranks, two gloo
processes), BLIP towers, and training on a small synthetic task."""
import importlib.util
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import blip_fast
from blip_fast.models import BLIP_ITM, BLIP_Pretrain, VisionTextDualEncoder, clip_loss
from blip_fast.models.dual_encoder import DualEncoderOutput, clip_loss_local
from conftest import TINY_MED, TINY_VIT, rel_err
from test_models import IMG, random_tokens


def tiny_dual(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return VisionTextDualEncoder(vit=TINY_VIT, image_size=IMG, med_config=TINY_MED, projection_dim=16, **kw)


def test_outputs_are_shaped_like_clip_output():
    model = tiny_dual().eval()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert not hasattr(model.text_model.encoder.layer[0], "crossattention")
    images, tokens = torch.randn(3, 3, IMG, IMG), random_tokens(2, 12)
    with torch.no_grad():
        out = model(images, tokens.input_ids, tokens.attention_mask)
    assert isinstance(out, DualEncoderOutput) and out.loss is None
    assert out.logits_per_image.shape == (3, 2) and torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3))
    assert out.vision_model_output.last_hidden_state.shape == (3, 5, 32)
    assert out.text_model_output.pooler_output.shape == (2, 32)
    with torch.no_grad():
        image_features = model.get_image_features(images)
        text_features = model.get_text_features(tokens.input_ids, tokens.attention_mask)
    assert torch.allclose(F.normalize(image_features, dim=-1), out.image_embeds, atol=1e-6)
    expected = model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    assert rel_err(out.logits_per_image, expected) < 1e-6
    as_tuple = model(images, tokens.input_ids, tokens.attention_mask, return_dict=False)
    assert len(as_tuple) == 6 and isinstance(as_tuple[-1], tuple)  # no loss; nested outputs as tuples
    with pytest.raises(ValueError, match="pairs images with texts"):
        model(images, tokens.input_ids, tokens.attention_mask, return_loss=True)


def test_clip_loss_is_the_symmetric_cross_entropy():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(14.0)
    logits = scale * img @ txt.t()
    labels = torch.arange(6)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert rel_err(clip_loss(img, txt, scale), ref) < 1e-6


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_give_the_global_loss_and_gradient(world):
    """open_clip's local loss with gather_with_grad: the mean over ranks of each rank's loss (its rows
    against every rank's columns) is the loss of one process holding the global batch, and so is the
    gradient DDP averages. The gather is simulated by concatenation, which carries the gradient back to
    every rank's features as the all-gather's backward (all-reduce, then this rank's slice) does."""
    torch.manual_seed(2)
    batch, dim = 4, 8
    img = torch.randn(world * batch, dim, requires_grad=True)
    txt = torch.randn(world * batch, dim, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    g_img, g_txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    global_loss = clip_loss(g_img, g_txt, scale)
    global_grads = torch.autograd.grad(global_loss, (img, txt, scale))

    n_img, n_txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    local = [clip_loss_local(n_img[r * batch:(r + 1) * batch], n_txt[r * batch:(r + 1) * batch], n_img, n_txt,
                             scale, rank=r) for r in range(world)]
    mean_loss = torch.stack(local).mean()
    grads = torch.autograd.grad(mean_loss, (img, txt, scale))
    assert rel_err(mean_loss, global_loss) < 1e-6
    for g, ref in zip(grads, global_grads):
        assert rel_err(g, ref) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_dual(seed=0).eval().set_backend("reference")  # no dropout: deterministic forwards
        torch.manual_seed(10)
        images, tokens = torch.randn(world * 2, 3, IMG, IMG), random_tokens(world * 2, 12, seed=3)
        part = slice(2 * rank, 2 * rank + 2)
        loss = model(images[part], tokens.input_ids[part], tokens.attention_mask[part], return_loss=True).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        dist.all_reduce(grads)  # what DDP does, then divides by the world size
        dist.all_reduce(loss.detach())
        if rank == 0:
            torch.save({"loss": loss.detach() / world, "grads": grads / world}, result_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    world, result = 2, tmp_path / "result.pt"
    mp.start_processes(_gloo_worker, args=(world, _free_port(), str(result)), nprocs=world, start_method="spawn")
    got = torch.load(result)
    model = tiny_dual(seed=0).eval().set_backend("reference")
    torch.manual_seed(10)
    images, tokens = torch.randn(world * 2, 3, IMG, IMG), random_tokens(world * 2, 12, seed=3)
    loss = model(images, tokens.input_ids, tokens.attention_mask, return_loss=True).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert rel_err(got["loss"], loss) < 1e-5
    assert rel_err(got["grads"], grads) < 1e-4


def test_from_blip_towers_reproduce_itc_and_temperature():
    torch.manual_seed(4)
    itm = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16).eval()
    dual, report = VisionTextDualEncoder.from_blip(itm, return_report=True)
    dual.eval()
    assert report.initialized_keys == ["logit_scale"] and dual.visual_projection.bias is not None
    assert any(".crossattention." in k for k in report.dropped)
    images, tokens = torch.randn(3, 3, IMG, IMG), random_tokens(3, 35, lengths=[35, 12, 5])
    with torch.no_grad():
        out = dual(images, tokens.input_ids, tokens.attention_mask)
        assert rel_err(out.image_embeds @ out.text_embeds.t(), itm(images, tokens, match_head="itc")) < 1e-5
    pretrain = BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16, queue_size=8)
    with torch.no_grad():
        pretrain.temp.fill_(0.05)
    from_state = VisionTextDualEncoder.from_blip(pretrain.state_dict(), vit=TINY_VIT, med_config=TINY_MED,
                                                 image_size=2 * IMG)
    assert math.isclose(from_state.logit_scale.item(), math.log(20.0), rel_tol=1e-6)
    assert from_state.vision_model.pos_embed.shape[1] == 17


def test_captions_as_strings(blip_tokenizer):
    model = tiny_dual(tokenizer=blip_tokenizer).eval()
    captions = ["a dog on the beach", "two cats"]
    tokens = blip_tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        a = model.get_text_features(captions)
        b = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    assert torch.equal(a, b)


def _example():
    """examples/train_dual_encoder.py, the script the GPU run uses, imported as a module."""
    path = Path(__file__).resolve().parent.parent / "examples" / "train_dual_encoder.py"
    spec = importlib.util.spec_from_file_location("train_dual_encoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dual_encoder_trains_on_a_synthetic_task():
    example = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        model = example.build("tiny", seed=0)
        data = example.PairedPatterns(num_classes=16, image_size=IMG, seed=1)
        result = example.train(model, data, steps=120, batch_size=8, lr=2e-3, warmup=12, backend="reference")
        accuracy = example.retrieval_accuracy(model, data)
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 1.9 and last < 0.6 * first, losses  # ln(8) = 2.08 at chance
    assert accuracy >= 0.3, accuracy  # chance: 1/16
    assert result["backends"]["attention"] == {"reference": 4}
    assert model.logit_scale.item() <= math.log(100) + 1e-6


def test_dual_encoder_learns_the_built_in_synthetic_scenes(blip_tokenizer):
    example = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = example.build("tiny", seed=0)
        data = example.SceneBatches(4096, 32, seed=1, eval_size=128)
        result = example.train(model, data, steps=150, batch_size=32, lr=2e-3, warmup=15)
        accuracy = example.retrieval_accuracy(model, data)  # held-out; the GPU run at base size measures it
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 3.3 and last < first - 0.3 and last < math.log(32) - 0.15, losses  # ln(32): chance
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.gpu
def test_fast_path_on_cuda_matches_reference_and_trains_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 means float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_dual(seed=7).cuda().eval()
    images, tokens = torch.randn(4, 3, IMG, IMG, device="cuda"), random_tokens(4, 16).to("cuda")
    with torch.no_grad():
        with blip_fast.use_backend("reference"):
            ref = model(images, tokens.input_ids, tokens.attention_mask, return_loss=True)
        out = model(images, tokens.input_ids, tokens.attention_mask, return_loss=True)
    assert rel_err(out.logits_per_image, ref.logits_per_image) < 1e-3 and rel_err(out.loss, ref.loss) < 1e-3
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(images, tokens.input_ids, tokens.attention_mask, return_loss=True).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
