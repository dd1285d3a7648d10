"""transformers' BLIP classes <-> blip_fast models: configs, weights and outputs, both ways.

test_fidelity.py checks the key mapping of BlipForImageTextRetrieval state dicts and the decoder
numerics; here whole models are converted (sizes from the BlipConfig), exported, saved as
transformers folders and reloaded, for every transformers class with a blip_fast counterpart.
"""
import pytest
import torch

import blip_fast
from blip_fast import CheckpointError
from blip_fast.interop import from_transformers, load_transformers_blip, save_transformers, to_transformers
from blip_fast.models import BLIP_ITM, BLIP_VQA, BLIP_Decoder, BLIP_Pretrain, VisionTextDualEncoder
from conftest import TINY_MED, TINY_VIT, rel_err
from test_fidelity import IMG, TOL, W, hf_config
from test_models import random_tokens

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipModel)


def randomise(model, seed):
    """Random values everywhere (transformers initialises BLIP's ViT at std 1e-10, blip_fast biases at
    zero and LayerNorms at one: too uniform to catch a swapped key), the logit scale kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in ("logit_scale", "temp"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _features(out):
    """transformers 4 returns a tensor from get_*_features, 5 an output whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _inputs(seed=1, batch=3):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG), random_tokens(batch, 20, lengths=[20, 9, 4][:batch])


def _assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_itm_from_transformers_builds_the_model_from_the_config():
    torch.manual_seed(0)
    hf = randomise(BlipForImageTextRetrieval(hf_config()), 0)
    model, report = from_transformers(hf, return_report=True)
    assert type(model) is BLIP_ITM and not model.training
    assert not report.missing_keys and not report.unexpected_keys
    assert model.init_args["vit"] == {"embed_dim": W, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "patch_size": 16}
    assert model.vision_proj.out_features == 16 and model.text_encoder.config.encoder_width == W
    images, tokens = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask).itm_score
        assert rel_err(model(images, tokens, match_head="itm"), ref) < TOL


def test_itm_export_outputs_and_round_trip(tmp_path):
    torch.manual_seed(5)
    ours = randomise(BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16), 5)
    hf = to_transformers(ours)
    assert type(hf).__name__ == "BlipForImageTextRetrieval"
    images, tokens = _inputs(2)
    with torch.no_grad():
        for head, use_itm in (("itm", True), ("itc", False)):
            ref = hf(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask,
                     use_itm_head=use_itm).itm_score
            assert rel_err(ours(images, tokens, match_head=head), ref) < TOL
    _assert_same_state(from_transformers(hf), ours)

    folder = save_transformers(ours, tmp_path / "hf_itm")
    reloaded = BlipForImageTextRetrieval.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = reloaded(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask).itm_score
        assert rel_err(ours(images, tokens, match_head="itm"), ref) < TOL
    _assert_same_state(from_transformers(folder), ours)


def test_blip_model_loads_into_the_dual_encoder_with_equal_outputs():
    torch.manual_seed(6)
    hf = randomise(BlipModel(hf_config()), 6)
    ours = from_transformers(hf)
    assert type(ours) is VisionTextDualEncoder
    assert (ours.vision_pooler, ours.text_pooler, ours.visual_projection.bias) == ("cls_post_norm", "pooler", None)
    images, tokens = _inputs(3)
    with torch.no_grad():
        ref = hf(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask,
                 return_loss=True)
        out = ours(images, tokens.input_ids, tokens.attention_mask, return_loss=True)
        for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds", "loss"):
            assert rel_err(getattr(out, name), getattr(ref, name)) < TOL, name
        assert rel_err(ours.get_image_features(images), _features(hf.get_image_features(pixel_values=images))) < TOL
        text_ref = _features(hf.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
        assert rel_err(ours.get_text_features(tokens.input_ids, tokens.attention_mask), text_ref) < TOL
    back = to_transformers(ours).state_dict()
    for key, value in hf.state_dict().items():
        assert torch.equal(back[key], value), key


def test_conditional_generation_to_blip_decoder_and_back():
    torch.manual_seed(7)
    hf = randomise(BlipForConditionalGeneration(hf_config()), 7)
    model = from_transformers(hf)
    assert type(model) is BLIP_Decoder
    images, tokens = _inputs(4)
    labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask, labels=labels)
        out = model.text_decoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=model.visual_encoder(images), labels=labels, output_logits=True)
        assert rel_err(out.logits, ref.logits) < TOL and rel_err(out.loss, ref.loss) < TOL
    for key, value in to_transformers(model).state_dict().items():
        assert torch.equal(value, hf.state_dict()[key]), key
    # The same weights into a model holding more (BLIP_Pretrain): what fits, the rest reported.
    pretrain = BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16, queue_size=8)
    report = load_transformers_blip(pretrain, hf, strict=False)
    assert not report.unexpected_keys and "itm_head.weight" in report.missing_keys
    assert all(not k.startswith(("visual_encoder.", "text_decoder.")) for k in report.missing_keys)
    exported, export_report = to_transformers(pretrain, "BlipForConditionalGeneration", return_report=True)
    assert "visual_encoder_m.cls_token" in export_report.dropped and "temp" in export_report.dropped
    assert torch.equal(exported.text_decoder.cls.predictions.bias, hf.text_decoder.cls.predictions.bias)


def test_question_answering_to_blip_vqa_and_back():
    torch.manual_seed(12)
    hf = randomise(BlipForQuestionAnswering(hf_config()), 12)
    model = from_transformers(hf)
    assert type(model) is BLIP_VQA
    images, tokens = _inputs(7)
    answers = random_tokens(3, 6, lengths=[6, 4, 3], seed=1)
    with torch.no_grad():
        states = model.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                    encoder_hidden_states=model.visual_encoder(images)).last_hidden_state
        ref_states = hf.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                     encoder_hidden_states=hf.vision_model(pixel_values=images).last_hidden_state
                                     ).last_hidden_state
        assert rel_err(states, ref_states) < TOL
        # No encoder_attention_mask: transformers 5.x's BlipTextLMHeadModel gives other logits with the
        # question mask than without it on the unpadded question (a masking bug there); blip_fast's agree.
        logits = model.text_decoder(answers.input_ids, attention_mask=answers.attention_mask,
                                    encoder_hidden_states=states, output_logits=True).logits
        ref_logits = hf.text_decoder(input_ids=answers.input_ids, attention_mask=answers.attention_mask,
                                     encoder_hidden_states=ref_states).logits
        assert rel_err(logits, ref_logits) < TOL
    for key, value in to_transformers(model).state_dict().items():
        assert torch.equal(value, hf.state_dict()[key]), key


def test_pretrain_exports_its_retrieval_part():
    torch.manual_seed(8)
    model = randomise(BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16, queue_size=8), 8)
    hf = to_transformers(model)
    assert type(hf).__name__ == "BlipForImageTextRetrieval"
    images, tokens = _inputs(5)
    with torch.no_grad():
        ids = tokens.input_ids.clone()
        ids[:, 0] = model.enc_token_id
        cls = model.text_encoder(ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=model.visual_encoder(images)).last_hidden_state[:, 0]
        ref = hf(input_ids=ids, pixel_values=images, attention_mask=tokens.attention_mask).itm_score
        assert rel_err(model.itm_head(cls), ref) < TOL


def test_position_embedding_resized_when_the_image_size_changes():
    torch.manual_seed(9)
    hf = BlipForImageTextRetrieval(hf_config())
    model, report = from_transformers(hf, image_size=2 * IMG, return_report=True)
    assert report.interpolated == {"visual_encoder.pos_embed": (5, 17)}
    assert model.visual_encoder.pos_embed.shape[1] == 17


def test_layout_and_export_errors_name_the_fix():
    torch.manual_seed(10)
    hf_model = BlipModel(hf_config())
    itm = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16)
    with pytest.raises(CheckpointError, match="VisionTextDualEncoder"):
        load_transformers_blip(itm, hf_model)
    dual = VisionTextDualEncoder(vit=TINY_VIT, image_size=IMG, med_config=TINY_MED, projection_dim=16)
    with pytest.raises(ValueError, match="BlipModel cannot express"):
        to_transformers(dual)
    with pytest.raises(TypeError, match="lacks"):
        to_transformers(itm, "BlipForConditionalGeneration")
    with pytest.raises(CheckpointError, match="strict=False"):
        load_transformers_blip(BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16,
                                             queue_size=8), BlipForImageTextRetrieval(hf_config()))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_converted_dual_encoder_runs_on_the_op_backends(backend):
    torch.manual_seed(11)
    hf = randomise(BlipModel(hf_config()), 11)
    ours = from_transformers(hf)
    images, tokens = _inputs(6)
    with torch.no_grad():
        ref = hf(input_ids=tokens.input_ids, pixel_values=images, attention_mask=tokens.attention_mask)
        with blip_fast.use_backend(backend):
            out = ours(images, tokens.input_ids, tokens.attention_mask)
    assert rel_err(out.logits_per_image, ref.logits_per_image) < TOL
