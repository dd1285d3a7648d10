"""BLIP_Decoder, BLIP_Retrieval, BLIP_VQA and BLIP_Base (tiny sizes, reference path) against the
original's formulas written out here: losses, queues, hard negatives, answer ranking, features."""
import pytest
import torch
import torch.nn.functional as F

import blip_fast
from blip_fast.models import BLIP_VQA, BLIP_Base, BLIP_Decoder, BLIP_Retrieval
from blip_fast.tokenizer import TokenizedText
from conftest import TINY_MED, TINY_VIT, rel_err
from test_models import IMG, random_tokens

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# -- BLIP_Decoder --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    return BLIP_Decoder(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()


def test_decoder_loss_matches_original_formula(captioner):
    tokens = random_tokens(3, 12, lengths=[12, 9, 6])
    imgs = images(3)
    with torch.no_grad(), blip_fast.use_backend("reference"):
        loss = captioner(imgs, tokens)
        ids = tokens.input_ids.clone()
        ids[:, 0] = 30522
        targets = ids.masked_fill(ids == 0, -100)
        targets[:, :4] = -100  # '[DEC] a picture of' gets no loss
        logits = captioner.text_decoder(ids, attention_mask=tokens.attention_mask,
                                        encoder_hidden_states=captioner.visual_encoder(imgs)).logits
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, 30524), targets[:, 1:].reshape(-1), label_smoothing=0.1)
    assert rel_err(loss, ref) < TOL


def test_decoder_generation_modes_agree(captioner):
    imgs = images(2, seed=3)
    for kwargs in ({"num_beams": 3}, {"num_beams": 1}, {"sample": True}):
        outs = [captioner.generate_ids(imgs, max_length=12, min_length=6, decoding=d, **kwargs,
                                       generator=torch.Generator().manual_seed(0))
                for d in ("fast", "original")]
        assert torch.equal(outs[0], outs[1]), kwargs
        assert outs[0][:, :4].tolist() == [[30522, 1037, 3861, 1997]] * 2
    # sampling applies the original's hard-coded repetition penalty 1.1 unless one is given
    a = captioner.generate_ids(imgs, sample=True, max_length=12, generator=torch.Generator().manual_seed(1))
    b = captioner.generate_ids(imgs, sample=True, max_length=12, repetition_penalty=1.1,
                               generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_decoder_captions_strip_the_prompt(blip_tokenizer):
    torch.manual_seed(0)
    model = BLIP_Decoder(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, tokenizer=blip_tokenizer).eval()
    assert model.prompt_ids().tolist() == [30522, 1037, 3861, 1997] and model.prompt_length == 4
    imgs = images(2)
    ids = model.generate_ids(imgs, max_length=12, min_length=5)
    captions = model.generate(imgs, max_length=12, min_length=5)
    assert captions == [blip_tokenizer.decode(i, skip_special_tokens=True)[len("a picture of "):] for i in ids]
    other = BLIP_Decoder(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, tokenizer=blip_tokenizer,
                         prompt="a photo of a ")
    assert other.prompt_ids().tolist() == [30522] + blip_tokenizer("a photo of a ").input_ids[1:-1]


# -- BLIP_Base -----------------------------------------------------------------------------------------
def test_feature_extractor_modes():
    torch.manual_seed(0)
    model = BLIP_Base(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()
    imgs, tokens = images(2), random_tokens(2, 9, lengths=[9, 5])
    with torch.no_grad():
        assert torch.equal(model(imgs, None, mode="image"), model.visual_encoder(imgs))
        text = model(imgs, tokens, mode="text")
        assert torch.equal(text, model.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                                    mode="text").last_hidden_state)
        multi = model(imgs, tokens, mode="multimodal")
        ids = tokens.input_ids.clone()
        ids[:, 0] = 30523
        ref = model.text_encoder(ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=model.visual_encoder(imgs)).last_hidden_state
        assert torch.equal(multi, ref) and multi.shape == (2, 9, 32)
    with pytest.raises(ValueError, match="mode"):
        model(imgs, tokens, mode="fusion")


# -- BLIP_Retrieval ------------------------------------------------------------------------------------
def tiny_retrieval(**kw):
    torch.manual_seed(0)
    return BLIP_Retrieval(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16, queue_size=8, **kw)


def test_retrieval_losses_match_original_formulas():
    model = tiny_retrieval().eval()
    B, alpha = 4, 0.4
    imgs, tokens = images(B), random_tokens(B, 35, lengths=[35, 20, 11, 6])
    idx = torch.tensor([7, 3, 7, 5])  # two pairs of the same image
    with torch.no_grad():
        model.idx_queue[0, :3] = torch.tensor([3, 9, 7])  # queue entries of the same images
    neg_img, neg_txt = torch.tensor([1, 0, 3, 2]), torch.tensor([3, 2, 1, 0])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():  # the original's forward, step by step
        temp = state["temp"].clamp(0.001, 0.5)
        online, momentum = model._momentum_params()
        for p, p_m in zip(online, momentum):
            p_m.data = p_m.data * 0.995 + p.data * 0.005
        img = model.visual_encoder(imgs)
        img_feat = F.normalize(model.vision_proj(img[:, 0]), dim=-1)
        txt_feat = F.normalize(model.text_proj(model.text_encoder(
            tokens.input_ids, attention_mask=tokens.attention_mask, mode="text").last_hidden_state[:, 0]), dim=-1)
        idx_all = torch.cat([idx.view(1, -1), state["idx_queue"]], dim=1)
        pos = (idx.view(-1, 1) == idx_all).float()
        targets = pos / pos.sum(1, keepdim=True)
        img_m = F.normalize(model.vision_proj_m(model.visual_encoder_m(imgs)[:, 0]), dim=-1)
        txt_m = F.normalize(model.text_proj_m(model.text_encoder_m(
            tokens.input_ids, attention_mask=tokens.attention_mask, mode="text").last_hidden_state[:, 0]), dim=-1)
        img_all = torch.cat([img_m.t(), state["image_queue"]], dim=1)
        txt_all = torch.cat([txt_m.t(), state["text_queue"]], dim=1)
        t_i2t = alpha * F.softmax(img_m @ txt_all / temp, dim=1) + (1 - alpha) * targets
        t_t2i = alpha * F.softmax(txt_m @ img_all / temp, dim=1) + (1 - alpha) * targets
        l_i2t = -torch.sum(F.log_softmax(img_feat @ txt_all / temp, dim=1) * t_i2t, dim=1).mean()
        l_t2i = -torch.sum(F.log_softmax(txt_feat @ img_all / temp, dim=1) * t_t2i, dim=1).mean()
        ref_ita = (l_i2t + l_t2i) / 2
        enc_ids = tokens.input_ids.clone()
        enc_ids[:, 0] = 30523
        ids_all = torch.cat([enc_ids, enc_ids, enc_ids[neg_txt]])
        att_all = torch.cat([tokens.attention_mask, tokens.attention_mask, tokens.attention_mask[neg_txt]])
        cls = model.text_encoder(ids_all, attention_mask=att_all,
                                 encoder_hidden_states=torch.cat([img, img[neg_img], img])).last_hidden_state[:, 0]
        ref_itm = F.cross_entropy(model.itm_head(cls), torch.tensor([1] * B + [0] * 2 * B))

    model.load_state_dict(state)
    with torch.no_grad(), blip_fast.use_backend("reference"):
        ita, itm = model(imgs, tokens, alpha, idx, hard_negatives=(neg_img, neg_txt))
    assert rel_err(ita, ref_ita) < TOL and rel_err(itm, ref_itm) < TOL
    assert model.idx_queue[0, :B].tolist() == idx.tolist() and int(model.ptr_queue) == B
    assert rel_err(model.image_queue[:, :B], img_m.t()) < 1e-6


def test_retrieval_negatives_avoid_the_same_image_and_train():
    model = tiny_retrieval()
    imgs, tokens = images(4), random_tokens(4, 35)
    idx = torch.tensor([1, 1, 2, 2])
    sims = torch.randn(4, 4)
    same = idx.view(-1, 1) == idx.view(1, -1)
    for seed in range(5):
        torch.manual_seed(seed)
        neg_img, neg_txt = model.sample_hard_negatives(sims, sims.t(), same)
        assert not same[torch.arange(4), neg_img].any() and not same[torch.arange(4), neg_txt].any()
    ita, itm = model(imgs, tokens, 0.4, idx)
    (ita + itm).backward()
    assert model.visual_encoder.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in model.visual_encoder_m.parameters())
    with pytest.raises(ValueError, match="no hard negative"):
        model(imgs, tokens, 0.4, torch.tensor([5, 5, 5, 5]))


def _all_rank_worker(rank: int, path: str, results) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        model = tiny_retrieval(negative_all_rank=True).eval()  # no dropout: comparable with the formula
        batches = [(images(2, seed=10 + r), random_tokens(2, 35, seed=20 + r), torch.tensor([2 * r, 2 * r + 1]))
                   for r in range(2)]
        imgs, tokens, idx = batches[rank]
        # global indices: image of rank 1 for rank 0's texts and the reverse; texts likewise
        negatives = (torch.tensor([2, 3]), torch.tensor([3, 2])) if rank == 0 else (torch.tensor([1, 0]),
                                                                                     torch.tensor([0, 1]))
        _, itm = model(imgs, tokens, 0.4, idx, hard_negatives=negatives)
        itm.backward()
        grad = model.visual_encoder.patch_embed.proj.weight.grad.clone()
        with torch.no_grad():  # the formula with the other rank's batch rebuilt locally
            emb = torch.cat([model.visual_encoder(b[0]) for b in batches])
            ids = torch.cat([b[1].input_ids for b in batches])
            ids[:, 0] = 30523
            att = torch.cat([b[1].attention_mask for b in batches])
            mine = slice(2 * rank, 2 * rank + 2)
            all_ids = torch.cat([ids[mine], ids[mine], ids[negatives[1]]])
            all_att = torch.cat([att[mine], att[mine], att[negatives[1]]])
            all_emb = torch.cat([emb[mine], emb[negatives[0]], emb[mine]])
            cls = model.text_encoder(all_ids, attention_mask=all_att,
                                     encoder_hidden_states=all_emb).last_hidden_state[:, 0]
            ref = F.cross_entropy(model.itm_head(cls), torch.tensor([1, 1, 0, 0, 0, 0]))
        results[rank] = (itm.item(), ref.item(), grad)
    finally:
        dist.destroy_process_group()


def test_retrieval_negative_all_rank_across_two_processes(tmp_path):
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_all_rank_worker, args=(str(tmp_path / "pg"), results), nprocs=2)
        results = dict(results)
    for rank in range(2):
        itm, ref, _ = results[rank]
        assert abs(itm - ref) < 1e-5 * abs(ref)
    # the negatives' image embeddings were gathered with their gradient (backward all-reduces it)
    assert all(torch.isfinite(results[r][2]).all() and results[r][2].abs().sum() > 0 for r in range(2))


# -- BLIP_VQA ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vqa():
    torch.manual_seed(0)
    model = BLIP_VQA(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()
    with torch.no_grad():  # peaked answer distributions, so that the ranking is not a coin toss
        for p in model.text_decoder.parameters():
            p.mul_(4)
    return model


def answers(n, length, seed):
    tokens = random_tokens(n, length, lengths=[length - i % 3 for i in range(n)], seed=seed)
    ids = tokens.input_ids.clone()
    ids[:, 0] = 30522
    return TokenizedText(ids, tokens.attention_mask)


def test_vqa_train_loss_matches_original_formula(vqa):
    imgs, questions = images(2), random_tokens(2, 10, lengths=[10, 6])
    ans, n, weights = answers(3, 5, seed=1), [2, 1], torch.tensor([0.6, 0.4, 1.0])
    with torch.no_grad(), blip_fast.use_backend("reference"):
        loss = vqa(imgs, questions, ans, n=n, weights=weights, train=True)
        states, q_atts = vqa.encode_questions(imgs, questions)
        rep = [0, 0, 1]
        logits = vqa.text_decoder(ans.input_ids, attention_mask=ans.attention_mask, encoder_hidden_states=states[rep],
                                  encoder_attention_mask=q_atts[rep]).logits
        targets = ans.input_ids.masked_fill(ans.input_ids == 0, -100)
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, 30524), targets[:, 1:].reshape(-1), label_smoothing=0.1,
                                    reduction="none").view(3, -1)
        ref = (weights * per_token.sum(1)).sum() / 2
    assert rel_err(loss, ref) < TOL


def test_vqa_rank_matches_original_formula(vqa):
    imgs, questions = images(3, seed=2), random_tokens(3, 8, lengths=[8, 6, 4], seed=3)
    candidates, k = answers(10, 4, seed=4), 4
    with torch.no_grad(), blip_fast.use_backend("reference"):
        picked = vqa(imgs, questions, candidates, train=False, inference="rank", k_test=k)
        states, q_atts = vqa.encode_questions(imgs, questions)
        first = vqa.text_decoder(torch.full((3, 1), 30522), encoder_hidden_states=states,
                                 encoder_attention_mask=q_atts).logits[:, 0]
        _, topk = F.softmax(first, 1).index_select(1, candidates.input_ids[:, 1]).topk(k, dim=1)
        ids = candidates.input_ids[topk.reshape(-1)]
        atts = candidates.attention_mask[topk.reshape(-1)]
        # the original tiles the question states k times instead of sharing their keys/values
        out = vqa.text_decoder(ids, attention_mask=atts, encoder_hidden_states=states.repeat_interleave(k, 0),
                               encoder_attention_mask=q_atts.repeat_interleave(k, 0),
                               labels=ids.masked_fill(ids == 0, -100), reduction="none")
        scores = -out.loss.view(3, k)
        ref = topk[torch.arange(3), scores.argmax(1)]
        shared_kv = vqa.text_decoder.bert.precompute_cross_kv(states)
        fast_scores = -vqa.text_decoder(ids, attention_mask=atts, encoder_kv=shared_kv, encoder_attention_mask=q_atts,
                                        labels=ids.masked_fill(ids == 0, -100), reduction="none").loss.view(3, k)
    assert torch.equal(picked, ref)
    assert rel_err(fast_scores, scores) < TOL


def test_vqa_generate_answers_agree_across_decodings(vqa):
    imgs, questions = images(2, seed=5), random_tokens(2, 8, lengths=[8, 5], seed=6)
    with torch.no_grad():
        states, _ = vqa.encode_questions(imgs, questions)
        config = blip_fast.GenerationConfig(max_length=10, min_length=1, num_beams=3)
        bos = torch.tensor([30522])
        outs = [blip_fast.generation.generate(vqa.text_decoder, states, bos, config, decoding=d)
                for d in ("fast", "original", "recompute")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert outs[0][:, 0].tolist() == [30522, 30522] and outs[0].shape[1] <= 10
