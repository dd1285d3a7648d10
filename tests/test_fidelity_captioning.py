"""Captioning against transformers' port (``BlipForConditionalGeneration``, random weights from a
tiny config, converted with the documented key mapping): decoder logits and greedy tokens.

transformers 5's beam search normalises hypothesis lengths differently from 4.15 (what the original
BLIP called), so beam search is checked against the 4.15 loop in test_generation.py instead.
"""
import pytest
import torch

import blip_fast
from blip_fast.interop import from_transformers_blip
from blip_fast.models import BLIP_Decoder
from conftest import TINY_MED, TINY_VIT, rel_err
from test_models import IMG

transformers = pytest.importorskip("transformers")
from transformers import BlipConfig, BlipForConditionalGeneration  # noqa: E402

W = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    vision = dict(hidden_size=W, intermediate_size=4 * W, num_hidden_layers=2, num_attention_heads=2, image_size=IMG,
                  patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(vocab_size=30524, hidden_size=W, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                encoder_hidden_size=W, max_position_embeddings=64, layer_norm_eps=1e-12, hidden_act="gelu")
    torch.manual_seed(0)
    hf = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text)).eval()
    with torch.no_grad():
        for name, p in hf.vision_model.named_parameters():  # transformers initialises the ViT at std 1e-10
            if p.dim() > 1 or "embedding" in name:
                p.normal_(0, 0.5 if "patch" in name else 0.02)
        # peaked distributions and a frequent [SEP]: decisive, varied-length greedy captions
        for p in hf.text_decoder.parameters():
            p.mul_(6)
        hf.text_decoder.cls.predictions.bias[102] += 9
    ours = BLIP_Decoder(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()
    missing, unexpected = ours.load_state_dict(from_transformers_blip(hf.state_dict(), max_position_embeddings=64),
                                               strict=False)
    assert not missing and not unexpected
    return hf, ours


def test_decoder_logits_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    images = torch.randn(3, 3, IMG, IMG)
    ids = torch.randint(1000, 30000, (3, 9))
    ids[:, 0] = 30522
    with torch.no_grad(), blip_fast.use_backend("reference"):
        ref = hf(pixel_values=images, input_ids=ids).logits
        out = ours.text_decoder(ids, encoder_hidden_states=ours.visual_encoder(images)).logits
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("decoding", ["fast", "original"])
def test_greedy_captions_match_transformers_generate(pair, decoding):
    hf, ours = pair
    images = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor([[101, 1037, 3861, 1997, 102]] * 4)  # tokenizer('a picture of '); [SEP] is dropped
    with torch.no_grad():
        ref = hf.generate(pixel_values=images, input_ids=prompt.clone(), max_length=20, min_length=8, num_beams=1,
                          do_sample=False)
        out = ours.generate_ids(images, num_beams=1, max_length=20, min_length=8, decoding=decoding)
    assert (ref != 0).sum(1).min() < 20 and len(set(map(tuple, ref.tolist()))) == 4  # varied, some end early
    assert out.shape == ref.shape and torch.equal(out, ref)
