"""Float32 fidelity of the reference path with the original BLIP numerics.

The oracle is transformers' port of BLIP (``BlipForImageTextRetrieval``, ``BlipTextLMHeadModel``),
which reproduces the original modules; weights are random, converted with the documented key
mapping, inputs are fresh random tensors. The pretraining losses are checked against the
original's formulas written out here on top of those towers, with the negatives fixed.
"""
import pytest
import torch
import torch.nn.functional as F

import blip_fast
from blip_fast.interop import from_transformers_blip, to_transformers_blip
from blip_fast.models import BLIP_ITM, BLIP_NLVR, BLIP_Pretrain, BertLMHeadModel, load_med_config
from conftest import TINY_MED, rel_err
from test_models import IMG, random_tokens

transformers = pytest.importorskip("transformers")
from transformers import BlipConfig, BlipForImageTextRetrieval  # noqa: E402
from transformers.models.blip.modeling_blip_text import BlipTextConfig, BlipTextLMHeadModel  # noqa: E402

W = 32
TOL = 1e-5


def hf_config():
    vision = dict(hidden_size=W, intermediate_size=4 * W, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMG, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(vocab_size=30524, hidden_size=W, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                encoder_hidden_size=W, max_position_embeddings=64, layer_norm_eps=1e-12, hidden_act="gelu",
                label_smoothing=0.1)  # the original BLIP decoder smooths by 0.1
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16)


@pytest.fixture(scope="module")
def itm_pair():
    torch.manual_seed(0)
    hf = BlipForImageTextRetrieval(hf_config()).eval()
    ours = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit={"embed_dim": W, "depth": 2, "num_heads": 2},
                    embed_dim=16).eval()
    missing, unexpected = ours.load_state_dict(from_transformers_blip(hf.state_dict(), max_position_embeddings=64),
                                             strict=False)
    assert not missing and not unexpected
    return hf, ours


def test_key_mapping_round_trips(itm_pair):
    hf, ours = itm_pair
    back = to_transformers_blip(ours.state_dict())
    hf_state = hf.state_dict()
    assert set(back) - {k for k in back if k.endswith("position_ids")} <= set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_itm_and_itc_match_transformers_port(itm_pair, backend):
    hf, ours = itm_pair
    torch.manual_seed(1)
    images = torch.randn(3, 3, IMG, IMG)
    tokens = random_tokens(3, 35, lengths=[35, 12, 5])
    with torch.no_grad(), blip_fast.use_backend(backend):
        vit_ref = hf.vision_model(pixel_values=images).last_hidden_state
        assert rel_err(ours.visual_encoder(images), vit_ref) < TOL
        text_ref = hf.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        text = ours.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, mode="text").last_hidden_state
        assert rel_err(text, text_ref) < TOL
        itm_ref = hf(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask,
                     use_itm_head=True).itm_score
        assert rel_err(ours(images, tokens, match_head="itm"), itm_ref) < TOL
        itc_ref = hf(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask,
                     use_itm_head=False).itm_score
        assert rel_err(ours(images, tokens, match_head="itc"), itc_ref) < TOL


def test_decoder_lm_loss_and_logits_match_transformers_port():
    torch.manual_seed(2)
    cfg = hf_config().text_config
    hf = BlipTextLMHeadModel(cfg).eval()
    ours = BertLMHeadModel(load_med_config(TINY_MED)).eval()
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    state["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    tokens = random_tokens(3, 20, lengths=[20, 9, 4])
    labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
    image = torch.randn(3, 5, W)
    with torch.no_grad():
        ref = hf(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image,
                 labels=labels, reduction="mean")
        out = ours(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image,
                   labels=labels, output_logits=True)
        assert rel_err(out.logits, ref.logits) < TOL
        assert rel_err(out.loss, ref.loss) < TOL
        ref_none = hf(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                      encoder_hidden_states=image, labels=labels, reduction="none").loss
        out_none = ours(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image,
                        labels=labels, reduction="none").loss
        assert rel_err(out_none, ref_none) < TOL


def test_nlvr_twin_reduces_to_single_cross_attention(itm_pair):
    """With duplicated weights and the averaging merge, two identical images give the single-image
    encoder's output: the twin path computes exactly the original's per-layer formula."""
    _, itm = itm_pair
    med = dict(TINY_MED, num_hidden_layers=8)
    torch.manual_seed(3)
    single = BLIP_ITM(med_config=med, image_size=IMG, vit={"embed_dim": W, "depth": 2, "num_heads": 2}).eval()
    twin = BLIP_NLVR(med_config=med, image_size=IMG, vit={"embed_dim": W, "depth": 2, "num_heads": 2}).eval()
    state = single.state_dict()
    from blip_fast.models.blip_nlvr import duplicate_cross_attention_keys
    duplicate_cross_attention_keys(state)
    twin.load_state_dict(state, strict=False)
    with torch.no_grad():
        eye = torch.eye(W)
        for layer in twin.text_encoder.encoder.layer[6:]:
            merge = layer.crossattention.output.merge_layer
            merge.weight.copy_(torch.cat([eye, eye], dim=1) / 2)
            merge.bias.zero_()
    images = torch.randn(2, 3, IMG, IMG)
    tokens = random_tokens(2, 12, lengths=[12, 7])
    with torch.no_grad():
        embeds = single.visual_encoder(images)
        ids = tokens.input_ids.clone()
        ids[:, 0] = 30523
        ref = single.text_encoder(ids, attention_mask=tokens.attention_mask, encoder_hidden_states=embeds)
        out = twin.text_encoder(ids, attention_mask=tokens.attention_mask, encoder_hidden_states=[embeds, embeds])
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < TOL


def test_pretrain_losses_match_original_formulas():
    torch.manual_seed(4)
    model = BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit={"embed_dim": W, "depth": 2, "num_heads": 2},
                          embed_dim=16, queue_size=8).eval()
    B, alpha = 4, 0.4
    images, tokens = torch.randn(B, 3, IMG, IMG), random_tokens(B, 30, lengths=[30, 20, 11, 6])
    neg_img, neg_txt = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():  # the original's forward, step by step, on a copy of the state
        temp = state["temp"].clamp(0.001, 0.5)
        model.load_state_dict(state)
        online, momentum = model._momentum_params()
        for p, p_m in zip(online, momentum):
            p_m.data = p_m.data * 0.995 + p.data * 0.005
        img = model.visual_encoder(images)
        img_feat = F.normalize(model.vision_proj(img[:, 0]), dim=-1)
        txt_feat = F.normalize(model.text_proj(model.text_encoder(
            tokens.input_ids, attention_mask=tokens.attention_mask, mode="text").last_hidden_state[:, 0]), dim=-1)
        img_m = F.normalize(model.vision_proj_m(model.visual_encoder_m(images)[:, 0]), dim=-1)
        txt_m = F.normalize(model.text_proj_m(model.text_encoder_m(
            tokens.input_ids, attention_mask=tokens.attention_mask, mode="text").last_hidden_state[:, 0]), dim=-1)
        img_all = torch.cat([img_m.t(), state["image_queue"]], dim=1)
        txt_all = torch.cat([txt_m.t(), state["text_queue"]], dim=1)
        targets = torch.zeros(B, B + 8)
        targets.fill_diagonal_(1)
        t_i2t = alpha * F.softmax(img_m @ txt_all / temp, dim=1) + (1 - alpha) * targets
        t_t2i = alpha * F.softmax(txt_m @ img_all / temp, dim=1) + (1 - alpha) * targets
        l_i2t = -torch.sum(F.log_softmax(img_feat @ txt_all / temp, dim=1) * t_i2t, dim=1).mean()
        l_t2i = -torch.sum(F.log_softmax(txt_feat @ img_all / temp, dim=1) * t_t2i, dim=1).mean()
        ref_ita = (l_i2t + l_t2i) / 2
        enc_ids = tokens.input_ids.clone()
        enc_ids[:, 0] = 30523
        ids_all = torch.cat([enc_ids, enc_ids, enc_ids[neg_txt]])
        att_all = torch.cat([tokens.attention_mask, tokens.attention_mask, tokens.attention_mask[neg_txt]])
        img_all_itm = torch.cat([img, img[neg_img], img])
        cls = model.text_encoder(ids_all, attention_mask=att_all, encoder_hidden_states=img_all_itm,
                                 encoder_attention_mask=torch.ones(3 * B, img.shape[1], dtype=torch.long)
                                 ).last_hidden_state[:, 0]
        ref_itm = F.cross_entropy(model.itm_head(cls), torch.tensor([1] * B + [0] * 2 * B))
        dec_ids = tokens.input_ids.clone()
        dec_ids[:, 0] = 30522
        logits = model.text_decoder(dec_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=img,
                                    output_logits=True).logits
        labels = dec_ids.masked_fill(dec_ids == 0, -100)
        ref_lm = F.cross_entropy(logits[:, :-1].reshape(-1, 30524), labels[:, 1:].reshape(-1), label_smoothing=0.1)

    model.load_state_dict(state)
    with torch.no_grad(), blip_fast.use_backend("reference"):
        ita, itm, lm = model(images, tokens, alpha=alpha, hard_negatives=(neg_img, neg_txt))
    assert rel_err(ita, ref_ita) < TOL and rel_err(itm, ref_itm) < TOL and rel_err(lm, ref_lm) < TOL
    assert rel_err(model.image_queue[:, :B], img_m.t()) < 1e-6 and int(model.queue_ptr) == B
