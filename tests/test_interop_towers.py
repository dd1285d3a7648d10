"""Starting the towers from bert-base-uncased-layout BERT and timm / DeiT / JAX ViT weights.

BERT: tiny transformers BertModel / BertLMHeadModel with random weights are the source and the
oracle. timm: timm is not a test dependency, so the state dicts are built here key by key in
timm's layout (the names in blip_fast/interop/timm_vit.py), and the oracle is timm's ViT forward
written out below; the test at the end uses real timm where it is installed.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip_fast import CheckpointError
from blip_fast.interop import load_bert_weights, load_pretrained_towers, load_timm_vit
from blip_fast.models import BertLMHeadModel, BertModel, BLIP_Pretrain, VisionTransformer, load_med_config
from conftest import TINY_MED, TINY_VIT, rel_err
from test_models import IMG, random_tokens

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BERT_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64, vocab_size=30522)


def hf_bert(cls_name="BertModel", seed=0, **kw):
    torch.manual_seed(seed)
    config = transformers.BertConfig(**BERT_SIZES, **kw)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


# -- BERT ------------------------------------------------------------------------------------------
def test_bert_into_the_text_encoder_matches_bert_and_initialises_cross_attention():
    hf = hf_bert("BertModel")
    torch.manual_seed(1)
    ours = BertModel(load_med_config(TINY_MED), add_pooling_layer=False).eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    report = load_bert_weights(ours, hf.state_dict(), fold_token_type_embeddings=True)

    cross = [k for k in ours.state_dict() if ".crossattention." in k]
    assert sorted(report.initialized_keys) == sorted(cross) and not report.unexpected_keys
    assert report.resized == {"embeddings.word_embeddings.weight": ((30522, 32), (30524, 32))}
    assert "embeddings.token_type_embeddings.weight" in report.dropped and "pooler.dense.weight" in report.dropped
    state = ours.state_dict()
    for key in cross:  # re-initialised as BERT's init: fresh normal(0, 0.02) weights, zero biases, unit LN
        if key.endswith("LayerNorm.weight"):
            assert torch.equal(state[key], torch.ones_like(state[key]))
        elif key.endswith("bias"):
            assert torch.equal(state[key], torch.zeros_like(state[key]))
        else:
            assert not torch.equal(state[key], before[key]) and abs(state[key].std().item() - 0.02) < 0.01
    new_rows = state["embeddings.word_embeddings.weight"][30522:]
    assert not torch.equal(new_rows, before["embeddings.word_embeddings.weight"][30522:])

    tokens = random_tokens(3, 20, lengths=[20, 9, 4])
    with torch.no_grad():
        ref = hf(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        out = ours(tokens.input_ids, attention_mask=tokens.attention_mask, mode="text").last_hidden_state
        assert rel_err(out, ref) < TOL
        # Without folding (the original's behaviour) BLIP's BERT is BERT without token-type embeddings.
        load_bert_weights(ours, hf.state_dict())
        hf.embeddings.token_type_embeddings.weight.zero_()
        ref = hf(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        out = ours(tokens.input_ids, attention_mask=tokens.attention_mask, mode="text").last_hidden_state
        assert rel_err(out, ref) < TOL


def test_bert_lm_head_into_the_decoder_with_legacy_names():
    hf = hf_bert("BertLMHeadModel", seed=2, is_decoder=True)
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hf.state_dict().items() if k != "cls.predictions.decoder.bias"}
    torch.manual_seed(3)
    ours = BertLMHeadModel(load_med_config(TINY_MED)).eval()
    report = load_bert_weights(ours, legacy, fold_token_type_embeddings=True)
    assert all(".crossattention." in k for k in report.initialized_keys) and report.initialized_keys
    assert set(report.resized) == {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
                                   "cls.predictions.decoder.weight"}
    pred = ours.cls.predictions
    assert pred.decoder.weight is ours.bert.embeddings.word_embeddings.weight and pred.decoder.bias is pred.bias
    assert torch.equal(pred.bias[30522:], torch.zeros(2))
    tokens = random_tokens(3, 16, lengths=[16, 9, 4])
    with torch.no_grad():
        ref = hf(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
        out = ours(tokens.input_ids, attention_mask=tokens.attention_mask, mode="text", output_logits=True).logits
    assert rel_err(out[..., :30522], ref) < TOL


def test_bert_without_lm_head_initialises_the_decoder_head_and_rejects_other_sizes():
    hf = hf_bert("BertModel", seed=4)
    ours = BertLMHeadModel(load_med_config(TINY_MED))
    with torch.no_grad():
        ours.cls.predictions.bias.fill_(3.0)
    report = load_bert_weights(ours, hf)
    assert "cls.predictions.transform.dense.weight" in report.initialized_keys
    assert torch.equal(ours.cls.predictions.bias, torch.zeros(30524))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_bert_weights(BertModel(load_med_config(dict(TINY_MED, max_position_embeddings=32))), hf)
    with pytest.raises(CheckpointError, match="not a BERT state dict"):
        load_bert_weights(ours, {"foo.weight": torch.zeros(2)})


# -- timm ViT --------------------------------------------------------------------------------------
def timm_vit_state_dict(embed_dim=32, depth=2, grid=2, num_classes=10, distilled=False, seed=0):
    """A state dict in timm's VisionTransformer / DeiT layout, every key spelt out."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"cls_token": r(1, 1, embed_dim), "pos_embed": r(1, 1 + int(distilled) + grid * grid, embed_dim),
          "patch_embed.proj.weight": r(embed_dim, 3, 16, 16), "patch_embed.proj.bias": r(embed_dim)}
    if distilled:
        sd["dist_token"] = r(1, 1, embed_dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(embed_dim), b + "norm1.bias": r(embed_dim),
                   b + "attn.qkv.weight": r(3 * embed_dim, embed_dim), b + "attn.qkv.bias": r(3 * embed_dim),
                   b + "attn.proj.weight": r(embed_dim, embed_dim), b + "attn.proj.bias": r(embed_dim),
                   b + "norm2.weight": 1 + r(embed_dim), b + "norm2.bias": r(embed_dim),
                   b + "mlp.fc1.weight": r(4 * embed_dim, embed_dim), b + "mlp.fc1.bias": r(4 * embed_dim),
                   b + "mlp.fc2.weight": r(embed_dim, 4 * embed_dim), b + "mlp.fc2.bias": r(embed_dim)})
    sd.update({"norm.weight": 1 + r(embed_dim), "norm.bias": r(embed_dim),
               "head.weight": r(num_classes, embed_dim), "head.bias": r(num_classes)})
    if distilled:
        sd.update({"head_dist.weight": r(num_classes, embed_dim), "head_dist.bias": r(num_classes)})
    return sd


def timm_forward_features(sd, images, num_heads=2):
    """timm's VisionTransformer.forward_features (class token, pre-LN blocks, eps 1e-6), written out."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    B, N, D = x.shape
    ln = lambda t, n: F.layer_norm(t, (D,), sd[n + ".weight"], sd[n + ".bias"], 1e-6)  # noqa: E731
    for i in range(sum(k.endswith("attn.qkv.weight") for k in sd)):
        b = f"blocks.{i}."
        q, k, v = F.linear(ln(x, b + "norm1"), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]) \
            .reshape(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // num_heads)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(x, "norm")


def test_timm_vit_loads_name_for_name_with_equal_outputs():
    sd = timm_vit_state_dict()
    vit = VisionTransformer(img_size=IMG, **TINY_VIT).eval()
    report = load_timm_vit(vit, {"model": sd})  # DeiT's release wraps the state dict in 'model'
    assert set(report.dropped) == {"head.weight", "head.bias"} and not report.interpolated
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert rel_err(vit(images), timm_forward_features(sd, images)) < TOL


def test_deit_distilled_drops_dist_token_and_pos_embed_resized():
    sd = timm_vit_state_dict(distilled=True, seed=1)
    vit = VisionTransformer(img_size=2 * IMG, **TINY_VIT).eval()
    report = load_timm_vit(vit, sd)
    assert {"dist_token", "pos_embed[:, 1]", "head_dist.weight"} <= set(report.dropped)
    assert report.interpolated == {"pos_embed": (5, 17)}
    assert torch.equal(vit.pos_embed[:, 0], sd["pos_embed"][:, 0])
    grid = sd["pos_embed"][:, 2:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.allclose(vit.pos_embed[:, 1:], resized)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_timm_features_blip_lacks_raise():
    vit = VisionTransformer(img_size=IMG, **TINY_VIT)
    with pytest.raises(CheckpointError, match="layer scale"):
        load_timm_vit(vit, dict(timm_vit_state_dict(), **{"blocks.0.ls1.gamma": torch.ones(32)}))
    with pytest.raises(CheckpointError, match="transformers' ViTModel"):
        load_timm_vit(vit, {"embeddings.patch_embeddings.projection.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_timm_vit(VisionTransformer(img_size=IMG, embed_dim=64, depth=2, num_heads=2), timm_vit_state_dict())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_timm_vit(VisionTransformer(img_size=IMG, embed_dim=32, depth=3, num_heads=2), timm_vit_state_dict())


def test_jax_npz_path(tmp_path):
    """The Google ViT .npz layout (what the original uses for ViT-L) through vit.load_npz_weights."""
    sd = timm_vit_state_dict(seed=2)
    D, n = 32, lambda t: t.numpy()  # noqa: E731
    w = {"embedding/kernel": n(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)), "embedding/bias": n(sd["patch_embed.proj.bias"]),
         "cls": n(sd["cls_token"]), "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
         "Transformer/encoder_norm/scale": n(sd["norm.weight"]), "Transformer/encoder_norm/bias": n(sd["norm.bias"]),
         "head/kernel": n(sd["head.weight"].T), "head/bias": n(sd["head.bias"])}
    for i in range(2):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = b + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = sd[t + "attn.qkv.weight"].chunk(3), sd[t + "attn.qkv.bias"].chunk(3)
        for j, name in enumerate(("query", "key", "value")):
            w[mha + name + "/kernel"] = n(qkv_w[j].T.reshape(D, 2, D // 2))
            w[mha + name + "/bias"] = n(qkv_b[j].reshape(2, D // 2))
        w[mha + "out/kernel"] = n(sd[t + "attn.proj.weight"].T.reshape(2, D // 2, D))
        w[mha + "out/bias"] = n(sd[t + "attn.proj.bias"])
        for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[b + ln + "/scale"], w[b + ln + "/bias"] = n(sd[t + ours + ".weight"]), n(sd[t + ours + ".bias"])
        for r in range(2):
            w[b + f"MlpBlock_3/Dense_{r}/kernel"] = n(sd[t + f"mlp.fc{r + 1}.weight"].T)
            w[b + f"MlpBlock_3/Dense_{r}/bias"] = n(sd[t + f"mlp.fc{r + 1}.bias"])
    path = tmp_path / "vit.npz"
    np.savez(path, **w)
    vit = VisionTransformer(img_size=IMG, **TINY_VIT).eval()
    report = load_timm_vit(vit, str(path))
    assert set(report.dropped) == {"head/bias", "head/kernel"}
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert rel_err(vit(images), timm_forward_features(sd, images)) < TOL


# -- both towers, as the original BLIP_Pretrain starts -----------------------------------------------
def test_pretrained_towers_fill_encoder_decoder_and_momentum_copies():
    torch.manual_seed(5)
    model = BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16, queue_size=8)
    bert = hf_bert("BertForMaskedLM", seed=6)
    reports = load_pretrained_towers(model, vit=timm_vit_state_dict(seed=3), bert=bert.state_dict())
    assert set(reports) == {"visual_encoder", "text_encoder", "text_decoder"}
    assert torch.equal(model.text_encoder.encoder.layer[0].attention.self.query.weight,
                       bert.state_dict()["bert.encoder.layer.0.attention.self.query.weight"])
    assert model.text_encoder.embeddings.word_embeddings.weight is model.text_decoder.cls.predictions.decoder.weight
    assert torch.equal(model.text_decoder.cls.predictions.transform.dense.weight,
                       bert.state_dict()["cls.predictions.transform.dense.weight"])
    for p, p_m in zip(*model._momentum_params()):
        assert torch.equal(p, p_m)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_real_timm_vit_and_deit(device, monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 means float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    torch.manual_seed(7)
    reference = TimmViT(img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    ours = VisionTransformer(img_size=IMG, **TINY_VIT).eval()
    report = load_timm_vit(ours, reference)
    assert set(report.dropped) == {"head.weight", "head.bias"}
    reference, ours = reference.to(device), ours.to(device)
    images = torch.randn(2, 3, IMG, IMG, device=device)
    with torch.no_grad():
        assert rel_err(ours(images), reference.forward_features(images)) < (TOL if device == "cpu" else 1e-3)
    deit = VisionTransformerDistilled(img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    report = load_timm_vit(VisionTransformer(img_size=2 * IMG, **TINY_VIT), deit.state_dict())
    assert "dist_token" in report.dropped and report.interpolated == {"pos_embed": (5, 17)}
    assert timm.__version__
