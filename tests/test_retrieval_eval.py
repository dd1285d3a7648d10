"""Retrieval evaluation: recall@K on known answers, ITC ranking + ITM re-ranking against a per-query
loop written like BLIP's evaluation(), and ``blip-fast eval`` on a tiny checkpoint."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blip_fast import BLIP_ITM
from blip_fast.data import normalize_images
from blip_fast.evaluation import (evaluate_retrieval, recall_at_k, retrieval_scores, retrieval_set_from_json,
                                  retrieval_set_synthetic)
from blip_fast.tokenizer import tokenize
from blip_fast.train import commands

from conftest import TINY_MED, TINY_VIT


def test_recall_at_k_on_a_known_answer():
    # 3 images, 5 texts; image 0 has texts 0,1; image 1 has 2; image 2 has 3,4
    img2txt, txt2img = [[0, 1], [2], [3, 4]], [0, 0, 1, 2, 2]
    i2t = np.array([
        [0.1, 0.9, 0.0, 0.2, 0.3],   # best: text 1 (a match) -> rank 0
        [0.8, 0.1, 0.7, 0.0, 0.2],   # text 2 ranks 2nd -> rank 1
        [0.9, 0.8, 0.7, 0.6, 0.1],   # texts 3 (4th) and 4 (5th) -> rank 3
    ])
    t2i = np.array([
        [0.9, 0.0, 0.1],  # image 0 first
        [0.1, 0.5, 0.4],  # image 0 last -> rank 2
        [0.0, 0.2, 0.3],  # image 1 second -> rank 1
        [0.0, 0.1, 0.9],  # first
        [0.9, 0.8, 0.1],  # last -> rank 2
    ])
    m = recall_at_k(i2t, t2i, img2txt, txt2img, ks=(1, 2, 4))
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r2"] == pytest.approx(200 / 3) and m["txt_r4"] == 100
    assert m["img_r1"] == pytest.approx(40) and m["img_r2"] == pytest.approx(60) and m["img_r4"] == 100
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    perfect = recall_at_k(np.eye(4), np.eye(4), [[i] for i in range(4)], list(range(4)))
    assert all(perfect[f"{d}_r{k}"] == 100 for d in ("txt", "img") for k in (1, 5, 10))
    with pytest.raises(ValueError, match="texts x images"):
        recall_at_k(i2t, i2t, img2txt, txt2img)


def _tiny_itm(seed=0):
    torch.manual_seed(seed)
    return BLIP_ITM(image_size=32, vit=dict(TINY_VIT, patch_size=16), med_config=TINY_MED, embed_dim=16).eval()


@torch.no_grad()
def _original_style_scores(model, rset, k):
    """Scores computed one query at a time, following BLIP's evaluation() line by line."""
    images = normalize_images(torch.stack([rset.load_image(i) for i in range(rset.num_images)]))
    image_feats = model.visual_encoder(images)
    image_embeds = F.normalize(model.vision_proj(image_feats[:, 0, :]), dim=-1)
    text = tokenize(model.tokenizer, rset.texts, padding="max_length", max_length=35)
    out = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode="text")
    text_embeds = F.normalize(model.text_proj(out.last_hidden_state[:, 0, :]))
    text_ids = text.input_ids.clone()
    text_ids[:, 0] = model.tokenizer.enc_token_id
    sims = image_embeds @ text_embeds.t()
    i2t = torch.full((rset.num_images, len(rset.texts)), -100.0)
    for i, s in enumerate(sims):
        topk_sim, topk_idx = s.topk(k=k, dim=0)
        enc = image_feats[i].repeat(k, 1, 1)
        o = model.text_encoder(text_ids[topk_idx], attention_mask=text.attention_mask[topk_idx],
                               encoder_hidden_states=enc, encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long),
                               return_dict=True)
        i2t[i, topk_idx] = model.itm_head(o.last_hidden_state[:, 0, :])[:, 1] + topk_sim
    t2i = torch.full((len(rset.texts), rset.num_images), -100.0)
    for t, s in enumerate(sims.t()):
        topk_sim, topk_idx = s.topk(k=k, dim=0)
        enc = image_feats[topk_idx]
        o = model.text_encoder(text_ids[t].repeat(k, 1), attention_mask=text.attention_mask[t].repeat(k, 1),
                               encoder_hidden_states=enc, encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long),
                               return_dict=True)
        t2i[t, topk_idx] = model.itm_head(o.last_hidden_state[:, 0, :])[:, 1] + topk_sim
    return sims, i2t, t2i


def test_itc_ranking_and_itm_reranking_match_the_original_procedure(blip_tokenizer):
    model = _tiny_itm()
    model.tokenizer = blip_tokenizer
    rset = retrieval_set_synthetic(12, 32, seed=0, max_objects=1)
    got = retrieval_scores(model, rset, torch.device("cpu"), k_test=4, batch_size=5, itm_batch=7)
    sims, i2t, t2i = _original_style_scores(model, rset, 4)
    assert torch.allclose(got["sims"], sims, atol=1e-5)
    assert torch.allclose(got["i2t"], i2t, atol=1e-4) and torch.allclose(got["t2i"], t2i, atol=1e-4)
    assert (got["i2t"] == -100).sum(1).tolist() == [12 - 4] * 12  # only the top k are re-scored
    m = evaluate_retrieval(model, rset, torch.device("cpu"), k_test=4)
    assert m["num_images"] == m["num_texts"] == 12 and m["chance_r1"] == pytest.approx(100 / 12)
    assert 0 <= m["txt_r1"] <= m["txt_r5"] <= m["txt_r10"] <= 100 and "itc_img_r1" in m


def test_eval_cli_on_json_data_with_an_unreadable_image(tmp_path, blip_tokenizer):
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 40), color).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ann = [{"image": "0.png", "caption": ["a red picture", "red!"]}, {"image": "1.png", "caption": "green"},
           {"image": "broken.png", "caption": "broken"}, {"image": "2.png", "caption": ["blue", "Blue."]},
           {"image": "1.png", "caption": "more green"}]
    ann_file = tmp_path / "test.json"
    ann_file.write_text(json.dumps(ann))
    rset = retrieval_set_from_json(str(ann_file), str(tmp_path), 32)
    assert rset.num_images == 4 and len(rset.texts) == 7 and rset.img2txt[1] == [2, 6]
    ckpt = tmp_path / "itm.pth"
    torch.save({"model": _tiny_itm().state_dict()}, ckpt)
    cfg = tmp_path / "model.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump({"dataset": "synthetic", "vit": dict(TINY_VIT, patch_size=16), "image_size": 32,
                                   "med_config": TINY_MED, "embed_dim": 16, "batch_size": 4, "queue_size": 8}))
    out = tmp_path / "metrics.json"
    rc = commands.eval_main(["--checkpoint", str(ckpt), "--config", str(cfg), "--ann-file", str(ann_file),
                             "--image-root", str(tmp_path), "--k-test", "3", "--num-workers", "0", "--device", "cpu",
                             "--output", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["num_images"] == 3 and m["num_texts"] == 6 and m["skipped_images"] == 1 and m["k_test"] == 3
    assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "itc_txt_r1", "r_mean"} <= set(m)
