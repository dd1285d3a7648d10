"""Behaviour of the models on the reference path (tiny sizes): losses, heads, masks, queues,
hard negatives, Grad-CAM capture, activation checkpointing, cached decoding, clear errors."""
import pytest
import torch

import blip_fast
from blip_fast.models import BLIP_ITM, BLIP_NLVR, BLIP_Pretrain, BertLMHeadModel, load_med_config
from blip_fast.tokenizer import TokenizedText
from conftest import TINY_MED, TINY_MED_NLVR, TINY_VIT, rel_err

IMG = 32


def random_tokens(batch, length, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    ids[:, 0] = 101
    lengths = lengths or [length - i % 3 for i in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n - 1] = 102
        ids[i, n:] = 0
    return TokenizedText(ids, mask)


def tiny_pretrain(**kw):
    torch.manual_seed(0)
    return BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16,
                         queue_size=kw.pop("queue_size", 8), **kw)


def test_pretrain_forward_backward_finite():
    model = tiny_pretrain()
    images = torch.randn(4, 3, IMG, IMG)
    losses = model(images, random_tokens(4, 30), alpha=0.4)
    assert all(l.dim() == 0 and torch.isfinite(l) for l in losses)
    sum(losses).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.visual_encoder_m.parameters())


def test_queue_wraps_around_without_divisibility():
    model = tiny_pretrain(queue_size=10).eval()
    feats = [torch.nn.functional.normalize(torch.randn(4, 16), dim=-1) for _ in range(3)]
    for f in feats:
        model._dequeue_and_enqueue(f, f)
    # 12 columns written into 10: the last two of the third batch wrapped to 0 and 1.
    assert int(model.queue_ptr) == 2
    assert torch.equal(model.image_queue[:, 0:2], feats[2][2:].T)
    assert torch.equal(model.image_queue[:, 8:10], feats[2][:2].T)
    assert torch.equal(model.text_queue[:, 4:8], feats[1].T)
    with pytest.raises(ValueError, match="queue_size"):
        model._dequeue_and_enqueue(torch.randn(11, 16), torch.randn(11, 16))


def test_momentum_update_and_temp_clamp():
    model = tiny_pretrain()
    with torch.no_grad():
        for p in model.visual_encoder.parameters():
            p.add_(1.0)
        model.temp.fill_(2.0)
    before = [p.clone() for p in model.visual_encoder_m.parameters()]
    model(torch.randn(2, 3, IMG, IMG), random_tokens(2, 30), alpha=0.4)
    after = list(model.visual_encoder_m.parameters())
    online = list(model.visual_encoder.parameters())
    for b, a, p in zip(before, after, online):
        assert torch.allclose(a, 0.995 * b + 0.005 * p, atol=1e-6)
    assert model.temp.item() == pytest.approx(0.5)


def test_decoder_shares_all_but_self_attention():
    model = tiny_pretrain()
    enc, dec = model.text_encoder, model.text_decoder.bert
    assert enc.encoder.layer[0].crossattention.self.key.weight is dec.encoder.layer[0].crossattention.self.key.weight
    assert enc.encoder.layer[1].output.LayerNorm.bias is dec.encoder.layer[1].output.LayerNorm.bias
    assert enc.embeddings.word_embeddings.weight is model.text_decoder.cls.predictions.decoder.weight
    assert enc.encoder.layer[0].attention.self.query.weight is not dec.encoder.layer[0].attention.self.query.weight


def test_hard_negatives_vectorised_draw_matches_per_row_loop():
    """One multinomial call over all rows consumes the CPU generator like the original's loop."""
    sim = torch.randn(6, 6 + 8)
    w = torch.softmax(sim[:, :6], dim=1) + 1e-4
    w.fill_diagonal_(0)
    torch.manual_seed(3)
    looped = [torch.multinomial(w[b], 1).item() for b in range(6)]
    torch.manual_seed(3)
    vectorised, _ = BLIP_Pretrain.sample_hard_negatives(sim, sim, 6)
    assert vectorised.tolist() == looped
    assert all(i != b for b, i in enumerate(looped))


def test_pretrain_with_fixed_negatives_is_deterministic():
    model = tiny_pretrain().eval()
    images, tokens = torch.randn(3, 3, IMG, IMG), random_tokens(3, 30)
    negatives = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(images, tokens, alpha=0.4, hard_negatives=negatives)
    model.load_state_dict(state)
    b = model(images, tokens, alpha=0.4, hard_negatives=negatives)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_strings_and_pretokenised_captions_agree(blip_tokenizer):
    torch.manual_seed(0)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, tokenizer=blip_tokenizer).eval()
    captions = ["a dog running on the beach", "two cats on a red sofa"]
    images = torch.randn(2, 3, IMG, IMG)
    tokens = blip_fast.tokenize(blip_tokenizer, captions, padding="max_length", max_length=35)
    for head in ("itm", "itc"):
        assert torch.equal(model(images, captions, match_head=head), model(images, tokens, match_head=head))


def test_itm_heads_shapes_and_itc_is_cosine():
    torch.manual_seed(0)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()
    images = torch.randn(3, 3, IMG, IMG)
    tokens = random_tokens(3, 35)
    assert model(images, tokens, match_head="itm").shape == (3, 2)
    sim = model(images, tokens, match_head="itc")
    assert sim.shape == (3, 3) and sim.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="match_head"):
        model(images, tokens, match_head="xyz")


def test_nlvr_train_and_eval():
    torch.manual_seed(0)
    model = BLIP_NLVR(med_config=TINY_MED_NLVR, image_size=IMG, vit=TINY_VIT)
    images, targets = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1])
    loss = model(images, random_tokens(2, 12), targets, train=True)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.text_encoder.encoder.layer[7].crossattention.output.merge_layer.weight.grad is not None
    model.eval()
    assert model(images, random_tokens(2, 12), targets, train=False).shape == (2, 2)
    with pytest.raises(ValueError, match="2 images per sentence"):
        model(images[:3], random_tokens(2, 12), targets)


def test_vit_attention_maps_and_gradients():
    torch.manual_seed(0)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()
    images = torch.randn(2, 3, IMG, IMG, requires_grad=True)
    emb = model.visual_encoder(images, register_blk=1)
    emb.sum().backward()
    attn = model.visual_encoder.blocks[1].attn
    assert attn.get_attention_map().shape == (2, 2, 5, 5)
    assert attn.get_attn_gradients().shape == (2, 2, 5, 5)
    assert model.visual_encoder.blocks[0].attn.get_attention_map() is None


def test_cross_attention_save_attention_for_gradcam():
    torch.manual_seed(0)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()
    layer = model.text_encoder.encoder.layer[1].crossattention.self
    layer.save_attention = True
    out = model(torch.randn(2, 3, IMG, IMG), random_tokens(2, 35), match_head="itm")
    out[:, 1].sum().backward()
    assert layer.get_attention_map().shape == (2, 2, 35, 5)
    assert layer.get_attn_gradients().shape == (2, 2, 35, 5)


def test_vit_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    from blip_fast.models.vit import create_vit
    plain, _ = create_vit(TINY_VIT, IMG)
    ckpt, _ = create_vit(TINY_VIT, IMG, use_grad_checkpointing=True, ckpt_layer=1)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, IMG, IMG)
    for m in (plain, ckpt):
        m(x).pow(2).sum().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n


def test_bert_checkpointing_with_dropout_replays_masks():
    torch.manual_seed(0)
    config = load_med_config(TINY_MED)
    model = BertLMHeadModel(config).train()
    tokens = random_tokens(2, 10)
    image = torch.randn(2, 5, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        if enable:
            model.gradient_checkpointing_enable()
        torch.manual_seed(1)
        out = model(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image,
                    labels=tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100))
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = BertLMHeadModel(load_med_config(TINY_MED)).eval()
    tokens = random_tokens(2, 8, lengths=[8, 8])
    image = torch.randn(2, 5, 32)
    full = model(tokens.input_ids, encoder_hidden_states=image).logits
    past, steps = None, []
    for t in range(8):
        out = model(tokens.input_ids[:, t:t + 1], attention_mask=torch.ones(2, t + 1, dtype=torch.long),
                    encoder_hidden_states=image, past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_lm_loss_reductions_and_output_attentions():
    torch.manual_seed(0)
    model = BertLMHeadModel(load_med_config(TINY_MED)).eval()
    tokens = random_tokens(3, 9)
    labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
    kw = dict(attention_mask=tokens.attention_mask, encoder_hidden_states=torch.randn(3, 5, 32))
    mean = model(tokens.input_ids, labels=labels, **kw).loss
    per_seq = model(tokens.input_ids, labels=labels, reduction="none", **kw).loss
    assert per_seq.shape == (3,)
    assert mean.item() == pytest.approx(per_seq.sum().item() / (labels[:, 1:] != -100).sum().item(), rel=1e-5)
    out = model(tokens.input_ids, output_attentions=True, **kw)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 2, 9, 9)
    assert out.cross_attentions[0].shape == (3, 2, 9, 5)
    # causal: no attention to later positions
    assert out.attentions[0][0, 0].triu(1).abs().max() == 0


def test_bad_inputs_give_clear_errors():
    torch.manual_seed(0)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT).eval()
    tokens = random_tokens(2, 35)
    with pytest.raises(ValueError, match="image size"):
        model(torch.randn(2, 3, 48, 48), tokens)
    with pytest.raises(TypeError, match="float64"):
        model(torch.randn(2, 3, IMG, IMG, dtype=torch.float64), tokens)
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        model(torch.randn(2, 3, IMG, IMG), random_tokens(3, 35))
    with pytest.raises(ValueError, match="max_length=35"):
        model(torch.randn(2, 3, IMG, IMG), random_tokens(2, 40))
    with pytest.raises(ValueError, match="position embeddings"):
        model.text_encoder(random_tokens(1, 80).input_ids, mode="text")
    with pytest.raises(ValueError, match="vit must be"):
        BLIP_ITM(med_config=TINY_MED, vit="huge")


@pytest.mark.slow
def test_base_size_pretrain_forward_backward_batch_2():
    torch.manual_seed(0)
    model = BLIP_Pretrain(image_size=224, vit="base", queue_size=16)
    images = torch.randn(2, 3, 224, 224)
    losses = model(images, random_tokens(2, 30), alpha=0.4)
    assert all(torch.isfinite(l) for l in losses)
    sum(losses).backward()
    assert torch.isfinite(model.visual_encoder.blocks[0].attn.qkv.weight.grad).all()
    assert torch.isfinite(model.text_decoder.bert.encoder.layer[0].attention.self.query.weight.grad).all()
