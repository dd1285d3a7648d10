"""Generation: the fast decoding path (cross K/V once, in-place cache, device-side search, the
fixed-shape step that CUDA graphs capture) gives the same tokens as the original algorithm and as
plain recomputation with transformers-4.15 search semantics, in float32."""
import pytest
import torch

from blip_fast.generation import GenerationConfig, generate, reference_search
from blip_fast.generation import logits as lp
from blip_fast.generation.search import make_search
from blip_fast.generation.weights import decoding_copy
from blip_fast.models.med import BertLMHeadModel, load_med_config
from conftest import TINY_MED, rel_err

PROMPT = torch.tensor([30522, 1037, 3861, 1997])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny ops gain nothing from threads; on a busy 2-core machine, spinning threads cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decoder():
    """A tiny decoder whose captions end at different lengths (some reach max_length)."""
    torch.manual_seed(0)
    model = BertLMHeadModel(load_med_config(TINY_MED)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
        model.cls.predictions.bias[102] += 6  # makes [SEP] a frequent choice
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(4))


CONFIGS = {
    "greedy": GenerationConfig(num_beams=1),
    "beam3": GenerationConfig(num_beams=3),
    "beam3_repetition": GenerationConfig(num_beams=3, repetition_penalty=1.5),
    "beam3_early_stopping": GenerationConfig(num_beams=3, early_stopping=True),
    "beam2_length_penalty": GenerationConfig(num_beams=2, length_penalty=0.6),
    "beam5_short": GenerationConfig(num_beams=5, max_length=20, min_length=12),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_and_original_decoding_match_recompute(decoder, images, name):
    config = CONFIGS[name]
    ref = generate(decoder, images, PROMPT, config, decoding="recompute")
    lengths = (ref != 0).sum(1)
    if name in ("greedy", "beam3"):  # the fixture exercises finished and unfinished rows
        assert (lengths < config.max_length).any() and (lengths == config.max_length).any()
    for kwargs in ({"decoding": "original"}, {"decoding": "fast"}, {"decoding": "fast", "static_cache": True}):
        out = generate(decoder, images, PROMPT, config, **kwargs)
        assert out.shape == ref.shape and torch.equal(out, ref), kwargs


@pytest.mark.parametrize("config", [
    GenerationConfig(num_beams=1, do_sample=True, repetition_penalty=1.1, max_length=16),
    GenerationConfig(num_beams=1, do_sample=True, top_k=0, top_p=0.5, max_length=16)])
def test_sampling_draws_the_same_tokens_from_the_same_seed(decoder, images, config):
    images = images[:3]  # each step sorts the whole vocabulary (top-p): keep it short on the CPU
    outs = []
    for kwargs in ({"decoding": "recompute"}, {"decoding": "fast"}, {"decoding": "fast", "static_cache": True}):
        outs.append(generate(decoder, images, PROMPT, config, generator=torch.Generator().manual_seed(5), **kwargs))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    other = generate(decoder, images, PROMPT, config, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other, outs[0])


def test_cross_attention_keys_values_are_computed_once_per_generation(decoder, images):
    """Fast: each layer projects the 6 images once (beams share them). Original: the image
    embeddings repeated per beam are projected again at every step."""
    calls = []
    hooks = [layer.crossattention.self.key.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
             for layer in decoder.bert.encoder.layer]
    try:
        config = GenerationConfig(num_beams=3, max_length=12, min_length=12)
        generate(decoder, images, PROMPT, config, decoding="fast")
        assert calls == [6] * len(decoder.bert.encoder.layer)
        calls.clear()
        generate(decoder, images, PROMPT, config, decoding="original")
        steps = config.max_length - len(PROMPT)
        assert calls == [18] * len(decoder.bert.encoder.layer) * steps
    finally:
        for h in hooks:
            h.remove()


# -- the vectorised search against the per-input loop, on synthetic logits -----------------------
def _table_model(vocab, seed, quantize):
    """Deterministic logits from (last token, position): many steps, frequent end tokens, ties."""
    g = torch.Generator().manual_seed(seed)
    by_token = torch.randn(vocab, vocab, generator=g) * 2
    by_pos = torch.randn(64, vocab, generator=g)
    if quantize:  # coarse values: exact ties between continuations and hypotheses
        by_token, by_pos = (by_token * 2).round() / 2, (by_pos * 2).round() / 2
    return lambda ids, length: by_token[ids[:, length - 1]] + by_pos[length]


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_beam_search_matches_the_loop(seed):
    vocab, batch = 12, 5
    for quantize in (False, True):
        logits_of = _table_model(vocab, seed, quantize)
        for config in (GenerationConfig(num_beams=3, max_length=14, min_length=4, eos_token_id=3),
                       GenerationConfig(num_beams=4, max_length=10, min_length=0, eos_token_id=3,
                                        repetition_penalty=1.3, length_penalty=1.4),
                       GenerationConfig(num_beams=2, max_length=12, min_length=2, eos_token_id=3, early_stopping=True),
                       GenerationConfig(num_beams=1, max_length=12, min_length=3, eos_token_id=3)):
            prompt = torch.randint(4, vocab, (batch, 2), generator=torch.Generator().manual_seed(seed))
            rows = prompt.repeat_interleave(config.rows_per_input, 0)
            ref = reference_search(lambda ids: logits_of(ids, ids.shape[1]), lambda idx: None, rows, config, batch)
            search = make_search(config, batch, torch.device("cpu"))
            search.reset(rows)
            while True:
                search.update(logits_of(search.ids, search.host_len))
                search.host_len += 1
                if search.done_on_host:
                    break
            out = search.result()
            assert out.shape == ref.shape and torch.equal(out, ref), (seed, quantize, config)


# -- logits processing against transformers' processors --------------------------------------------
def test_logits_processing_matches_transformers():
    from transformers.generation.logits_process import (MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 7), generator=g)
    assert torch.equal(lp.repetition_penalty(scores.clone(), ids, 1.3),
                       RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))
    buffer = torch.cat([ids, torch.randint(0, 50, (4, 5), generator=g)], dim=1)  # 5 positions past the length
    assert torch.equal(lp.repetition_penalty(scores.clone(), buffer, 1.3, torch.tensor([7])),
                       lp.repetition_penalty(scores.clone(), ids, 1.3))
    assert torch.equal(lp.min_length(scores.clone(), 7, 10, 3), MinLengthLogitsProcessor(10, 3)(ids, scores.clone()))
    assert torch.equal(lp.min_length(scores.clone(), torch.tensor([7]), 10, 3), lp.min_length(scores.clone(), 7, 10, 3))
    assert torch.equal(lp.min_length(scores.clone(), torch.tensor([10]), 10, 3), scores)
    assert torch.equal(lp.top_k_filter(scores, 5), TopKLogitsWarper(5)(ids, scores.clone()))
    assert torch.equal(lp.top_p_filter(scores, 0.7), TopPLogitsWarper(0.7)(ids, scores.clone()))
    probs = torch.softmax(scores, -1)
    assert torch.equal(lp.draw_token(probs, torch.Generator().manual_seed(3)),
                       torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1))


# -- autocast: the low-precision copy ---------------------------------------------------------------
def test_decoding_copy_reproduces_autocast_and_follows_updates():
    torch.manual_seed(0)
    model = BertLMHeadModel(load_med_config(TINY_MED)).eval()
    ids, image = torch.randint(1000, 2000, (2, 6)), torch.randn(2, 5, 32)

    def autocast_logits(module):  # a fresh autocast region: autocast's own cast cache starts empty
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(ids, encoder_hidden_states=image).logits

    copy = decoding_copy(model, torch.bfloat16)
    attention = copy.bert.encoder.layer[0].attention.self
    assert attention.query.weight.dtype == torch.bfloat16 and attention.fused_qkv[0].shape == (96, 32)
    assert copy.bert.encoder.layer[0].crossattention.self.fused_qkv is None
    assert copy.bert.embeddings.word_embeddings.weight is model.bert.embeddings.word_embeddings.weight
    assert model.bert.encoder.layer[0].attention.self.fused_qkv is None  # the original is untouched
    # the stacked projection computes the same products: equal up to the GEMM's summation order
    assert rel_err(autocast_logits(copy).float(), autocast_logits(model).float()) < 1e-2
    attention.fused_qkv, fused = None, attention.fused_qkv
    assert torch.equal(autocast_logits(copy), autocast_logits(model))  # weights cast once = autocast's casts
    attention.fused_qkv = fused
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.key.weight.mul_(2)  # an in-place update (an optimizer step)
    assert decoding_copy(model, torch.bfloat16) is copy
    assert torch.equal(fused[0][32:64], model.bert.encoder.layer[0].attention.self.key.weight.bfloat16())
    fp32 = decoding_copy(model, torch.float32)  # same dtype: linear weights shared, not copied
    assert fp32.bert.encoder.layer[1].output.dense.weight is model.bert.encoder.layer[1].output.dense.weight
    model.cls.predictions.transform.dense.weight = torch.nn.Parameter(torch.randn(32, 32))  # a new tensor
    assert decoding_copy(model, torch.bfloat16) is not copy


def test_fast_generation_under_autocast_matches_the_original_algorithm(decoder, images):
    config = GenerationConfig(num_beams=3, max_length=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = generate(decoder, images, PROMPT, config, decoding="fast")
        original = generate(decoder, images, PROMPT, config, decoding="original")
    assert fast.shape[0] == 6 and fast.dtype == torch.long
    # bf16 rounding may flip near-ties between the two orders of computation; nearly all tokens agree
    if fast.shape == original.shape:
        assert (fast == original).float().mean() > 0.9


# -- the cache and the folded cross-attention ----------------------------------------------------
def test_static_cache_steps_and_folded_cross_attention_match_a_full_forward(decoder):
    from blip_fast.models.kv_cache import DecoderKVCache
    torch.manual_seed(2)
    ids = torch.randint(1000, 2000, (6, 9))
    ids[:, 0] = 30522
    image = torch.randn(2, 5, 32)  # 3 consecutive rows per image
    with torch.no_grad():
        full = decoder(ids, encoder_hidden_states=image.repeat_interleave(3, 0)).logits
        kv = decoder.bert.precompute_cross_kv(image)
        cache = DecoderKVCache(2, 6, 2, 16, 12, torch.device("cpu"), torch.float32, static=True)
        steps = [decoder(ids[:, :4], past_key_values=cache, encoder_kv=kv).logits]
        for t in range(4, 9):
            steps.append(decoder(ids[:, t:t + 1], past_key_values=cache, encoder_kv=kv).logits)
    assert int(cache.position) == 9
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    with torch.no_grad():  # attention maps of the folded cross-attention come back per row
        ref = decoder(ids, encoder_hidden_states=image.repeat_interleave(3, 0), output_attentions=True)
        out = decoder(ids, encoder_kv=kv, output_attentions=True)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(out.cross_attentions, ref.cross_attentions))
    assert out.cross_attentions[0].shape == (6, 2, 9, 5)


def test_clear_errors():
    model = BertLMHeadModel(load_med_config(TINY_MED)).eval()
    image = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="max_length"):
        generate(model, image, PROMPT, GenerationConfig(max_length=4))
    with pytest.raises(ValueError, match="decoding"):
        generate(model, image, PROMPT, GenerationConfig(), decoding="greedy")
    with pytest.raises(ValueError, match="num_beams=1"):
        generate(model, image, PROMPT, GenerationConfig(num_beams=2, do_sample=True))
    with pytest.raises(ValueError, match="position embeddings"):
        generate(model, image, PROMPT, GenerationConfig(max_length=100))
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, image, PROMPT, GenerationConfig(max_length=8), cuda_graph=True)
    with pytest.raises(ValueError, match="multiple of the image batch"):
        model(torch.randint(1000, 2000, (3, 4)), encoder_kv=model.bert.precompute_cross_kv(image))


# -- GPU: CUDA graphs ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_graph_decoding_matches_eager(decoder, images, dtype):
    dec, img = decoder.cuda(), images.cuda()
    try:
        for config in (CONFIGS["beam3"], CONFIGS["greedy"], CONFIGS["beam3_repetition"]):
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                eager = generate(dec, img, PROMPT, config, cuda_graph=False, static_cache=True)
                graph = generate(dec, img, PROMPT, config, cuda_graph=True)
                again = generate(dec, img, PROMPT, config, cuda_graph=True)  # replays the cached graph
                if dtype is None:
                    ref = generate(dec, img, PROMPT, config, decoding="recompute")
                    assert torch.equal(eager.cpu(), ref.cpu())
            assert torch.equal(graph, eager) and torch.equal(again, eager)
    finally:
        decoder.cpu()


@pytest.mark.gpu
def test_base_size_cuda_graph_captions_match_the_original_algorithm():
    """ViT-B/16 at 384 and the BERT-base decoder (random weights made decisive), float32: the fast
    path with CUDA graphs gives the original algorithm's tokens, batch 1 and 4, beam and greedy."""
    from blip_fast.models import blip_decoder
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = blip_decoder(image_size=384).eval()
    with torch.no_grad():
        for p in model.text_decoder.parameters():
            p.mul_(3)
        model.text_decoder.cls.predictions.bias[102] += 6
    try:
        for batch in (1, 4):
            gen = torch.Generator("cuda").manual_seed(batch)
            images = torch.randn(batch, 3, 384, 384, device="cuda", generator=gen)
            for num_beams in (3, 1):
                fast = model.generate_ids(images, num_beams=num_beams)
                again = model.generate_ids(images, num_beams=num_beams)  # graph replays
                original = model.generate_ids(images, num_beams=num_beams, decoding="original")
                assert torch.equal(fast, original) and torch.equal(again, original), (batch, num_beams)
    finally:
        model.release_generation_cache()


class _EmulatedCapture(torch.utils._python_dispatch.TorchDispatchMode):
    """What a CUDA graph capture does on the CPU: Python runs, in-place writes do not happen."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.endswith("_") and not name.startswith("_"):
            return args[0]
        return func(*args, **(kwargs or {}))


class _EmulatedGraph:
    instances = []

    def __init__(self):
        self.fn, self.replays = None, 0
        _EmulatedGraph.instances.append(self)

    def __call__(self):  # CUDAGraphStep's replay
        self.replays += 1
        self.fn()


def test_graph_driver_warm_up_capture_and_replays_on_cpu(decoder, images, monkeypatch):
    """The capture/replay sequence of the fast path, emulated: the warm-up is a real step, the
    capture changes nothing, every later step is a replay, and the tokens are the eager ones."""
    import contextlib
    from blip_fast.generation import engine

    recorded = {}

    @contextlib.contextmanager
    def graph(g):
        with _EmulatedCapture():
            yield
        g.fn = recorded["fn"]

    def capture(self, name, fn):  # engine._FastDecoding._capture with the emulated CUDA pieces
        fn()  # the warm-up
        recorded["fn"] = fn
        g = _EmulatedGraph()
        with graph(g):
            fn()
        self.graphs[name] = g

    monkeypatch.setattr(engine._FastDecoding, "_capture", capture)
    for config in (CONFIGS["beam3"], CONFIGS["greedy"]):
        ref = generate(decoder, images, PROMPT, config, decoding="recompute")
        compute = engine._compute_decoder(decoder, images.device)
        session = engine._FastDecoding(compute, config, 6, images, False, (6 * config.rows_per_input, 4),
                                       torch.float32, static=True)
        _EmulatedGraph.instances.clear()
        for _ in range(2):  # the second generation replays both graphs from the start
            with torch.no_grad():
                session.load(images, None, PROMPT.repeat(6 * config.rows_per_input, 1), None)
                assert torch.equal(session.run(use_graph=True), ref)
        first, step = _EmulatedGraph.instances
        steps = ref.shape[1] - 4 - 1
        assert first.replays == 1 and step.replays == 2 * steps - 1
