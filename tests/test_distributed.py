"""Data-parallel pretraining on CPU process groups (gloo, 2 processes): queues, gradients and
parameters against one process over the global batch, DDP and FSDP2, gradient accumulation and
clipping, and resuming from training-state checkpoints. Plus the one-process behaviour of the
helpers.

Exact comparisons need the two runs to compute the same function:
- dropout is off where a 2-rank run is compared with a 1-process run (the ranks draw their
  dropout masks from their own generators, the single process from one);
- every rank has the same number of caption tokens, so the mean of the per-rank LM losses (what
  data parallelism optimises) equals the token mean over the global batch;
- ``negative_all_rank=True``: with the original's rank-local in-batch keys, N ranks of batch B are
  *not* the same computation as one process on N*B (each rank contrasts against its own batch and
  the queue), so that mode is checked for its own invariants instead (identical gradients,
  queues and pointers on every rank, queues holding the rank-ordered global features);
- SGD in the parity test: Adam divides by the gradient's magnitude, which turns the float
  round-off of gradients that are zero in exact arithmetic (attention key biases: softmax is
  shift-invariant) into full-size updates.
"""
import os

import pytest
import torch

import blip_fast
from blip_fast import distributed as bdist
from blip_fast import parallel
from blip_fast.models import BLIP_Pretrain
from blip_fast.tokenizer import TokenizedText
from conftest import TINY_MED, TINY_VIT
from dist_utils import run_workers

IMG, LEN, EMBED = 32, 16, 16
MED_NO_DROPOUT = dict(TINY_MED, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build(negative_all_rank=False, dropout=True, queue_size=10, seed=0, **kw):
    torch.manual_seed(seed)
    return BLIP_Pretrain(med_config=TINY_MED if dropout else MED_NO_DROPOUT, image_size=IMG, vit=TINY_VIT,
                         embed_dim=EMBED, queue_size=queue_size, negative_all_rank=negative_all_rank, **kw)


def global_batch(step, n, lengths=(12, 9)):
    """Images, captions (token counts cycling through ``lengths``) and fixed hard negatives."""
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(n, 3, IMG, IMG, generator=g)
    ids = torch.randint(1000, 30000, (n, LEN), generator=g)
    ids[:, 0] = 101
    mask = torch.zeros(n, LEN, dtype=torch.long)
    for i in range(n):
        length = lengths[i % len(lengths)]
        mask[i, :length] = 1
        ids[i, length - 1] = 102
        ids[i, length:] = 0
    neg_image = (torch.arange(n) + 1 + torch.randint(0, n - 1, (n,), generator=g)) % n
    neg_text = (torch.arange(n) + 1 + torch.randint(0, n - 1, (n,), generator=g)) % n
    return images, TokenizedText(ids, mask), (neg_image, neg_text)


def shard(batch, rank, world, device="cpu"):
    images, text, (neg_image, neg_text) = batch
    rows = slice(rank * images.shape[0] // world, (rank + 1) * images.shape[0] // world)
    return (images[rows].to(device), TokenizedText(text.input_ids[rows], text.attention_mask[rows]).to(device),
            (neg_image[rows].to(device), neg_text[rows].to(device)))


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(parallel.unwrap_model(model),
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- DDP / FSDP == one process over the global batch -----------------------------------------------
PER_RANK, MICRO, STEPS, CLIP = 2, 2, 2, 0.5


def parity_run(model, wrapped, rank, world, device="cpu"):
    """STEPS optimizer steps of MICRO accumulated micro-batches; clipped; SGD with momentum."""
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses, norms = [], []
    for step in range(STEPS):
        for micro in range(MICRO):
            batch = global_batch(step * MICRO + micro, PER_RANK * 2)
            images, text, negatives = shard(batch, rank if world > 1 else 0, world, device)
            with parallel.grad_sync(wrapped, enabled=micro == MICRO - 1):
                loss_ita, loss_itm, loss_lm = wrapped(images, text, alpha=0.4, hard_negatives=negatives)
                ((loss_ita + loss_itm + loss_lm) / MICRO).backward()
            local = torch.stack([loss_ita, loss_itm, loss_lm]).detach()
            if world > 1:
                torch.distributed.all_reduce(local)
                local /= world
            losses.append(local)
        clip = parallel.clip_grad_norm_ if world > 1 else torch.nn.utils.clip_grad_norm_
        norms.append(clip(wrapped.parameters(), CLIP))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.stack(losses).cpu(), torch.stack(norms).cpu()


def _parity_worker(rank, world, device="cpu"):
    if device == "cuda":
        device = f"cuda:{rank}"
        exact_gpu_math()
    results = {}
    for strategy in ("ddp", "fsdp"):
        model = build(negative_all_rank=True, dropout=False)
        bdist.seed_everything(0)  # per rank: wrap_model must give every rank rank 0's weights and queues
        wrapped = parallel.wrap_model(model, strategy, device)
        losses, norms = parity_run(model, wrapped, rank, world, device)
        enc = model.text_encoder.encoder.layer[1].crossattention.self.query.weight
        dec = model.text_decoder.bert.encoder.layer[1].crossattention.self.query.weight
        results[strategy] = {"losses": losses, "norms": norms, "state": full_state(wrapped), "tied": enc is dec,
                             "master_dtypes": {p.dtype for p in wrapped.parameters()},
                             "queues": (model.image_queue.cpu(), model.text_queue.cpu(), model.queue_ptr.cpu())}
    # FSDP with activation checkpointing (ViT blocks and BERT layers recomputed in backward)
    model = build(negative_all_rank=True, dropout=False, vit_grad_ckpt=True, vit_ckpt_layer=2)
    model.text_encoder.gradient_checkpointing_enable()
    results["fsdp_checkpointing"] = parity_run(model, parallel.wrap_model(model, "fsdp", device), rank, world, device)[0]
    # bf16 FSDP: parameters gathered in bf16, float32 master weights and gradients
    model = build(negative_all_rank=True, dropout=False)
    wrapped = parallel.wrap_model(model, "fsdp", device, mixed_precision="bf16")
    images, text, negatives = shard(global_batch(0, 4), rank, world, device)
    with parallel.autocast(device, "bf16"):
        losses = wrapped(images, text, alpha=0.4, hard_negatives=negatives)
    sum(losses).backward()
    results["bf16"] = {"losses": torch.stack(losses).detach().float().cpu(),
                       "dtypes": {(p.dtype, p.grad.dtype) for p in wrapped.parameters() if p.requires_grad}}
    # the momentum update refuses online/momentum pairs that are not sharded alike
    from blip_fast.models.momentum import _local_shards
    sharded = model.visual_encoder.blocks[0].attn.qkv.weight
    try:
        _local_shards([sharded], [sharded.full_tensor()])
        results["mismatch_error"] = None
    except RuntimeError as exc:
        results["mismatch_error"] = str(exc)
    return results


def exact_gpu_math():
    """float32 everywhere on the GPU (no TF32) and the reference op backend, so that a 2-GPU run
    and a 1-GPU run differ by float32 reassociation only."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    blip_fast.set_backend("reference")


def check_parity(results, device, tol):
    reference = build(negative_all_rank=True, dropout=False).to(device)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_losses, ref_norms = parity_run(reference, reference, 0, 1, device)
    ref_state = {k: v.cpu() for k, v in reference.state_dict().items()}
    initial = {k: v.cpu() for k, v in initial.items()}
    for strategy in ("ddp", "fsdp"):
        out = results[0][strategy]
        assert out["tied"], f"{strategy}: the decoder's cross-attention is no longer the encoder's"
        assert out["master_dtypes"] == {torch.float32}
        torch.testing.assert_close(out["losses"], ref_losses, rtol=tol, atol=tol / 10, msg=strategy)
        torch.testing.assert_close(out["norms"], ref_norms, rtol=tol, atol=tol / 10, msg=strategy)
        state = out["state"]
        assert sorted(state) == sorted(ref_state)
        assert torch.equal(state["queue_ptr"], ref_state["queue_ptr"]) and int(state["queue_ptr"]) != 0
        torch.testing.assert_close(state["image_queue"], ref_state["image_queue"], rtol=0, atol=tol / 10)
        torch.testing.assert_close(state["text_queue"], ref_state["text_queue"], rtol=0, atol=tol / 10)
        keys = [k for k, v in ref_state.items() if v.is_floating_point()]
        global_err = ((flat(state[k] for k in keys) - flat(ref_state[k] for k in keys)).norm()
                      / flat(ref_state[k] for k in keys).norm()).item()
        assert global_err < tol / 10, (strategy, global_err)
        worst = max((state[k] - ref_state[k]).abs().max().item() for k in keys)
        assert worst < 2 * tol, (strategy, worst)
        # ... and the differences are round-off next to what training changed
        moved = (flat(ref_state[k] for k in keys) - flat(initial[k] for k in keys)).norm()
        assert (flat(state[k] for k in keys) - flat(ref_state[k] for k in keys)).norm() < 1e-3 * moved
        for a, b in zip(results[0][strategy]["queues"], results[1][strategy]["queues"]):
            assert torch.equal(a, b)  # queues and pointer identical on every rank
    return initial, ref_state


def test_ddp_and_fsdp_match_one_process_over_the_global_batch():
    results = run_workers(_parity_worker, 2, timeout=240)
    check_parity(results, "cpu", tol=1e-5)
    torch.testing.assert_close(results[0]["fsdp_checkpointing"], results[0]["fsdp"]["losses"], rtol=1e-6, atol=1e-6)
    bf16 = results[0]["bf16"]
    assert bf16["dtypes"] == {(torch.float32, torch.float32)}
    assert torch.isfinite(bf16["losses"]).all()
    torch.testing.assert_close(bf16["losses"], results[0]["fsdp"]["losses"][0], rtol=0.05, atol=0.05)
    assert "not sharded alike" in results[0]["mismatch_error"]


@pytest.mark.gpu
def test_nccl_ddp_and_fsdp_match_one_gpu_over_the_global_batch():
    """The same on 2 GPUs with NCCL (reduce-scatter in the gather-with-grad, FSDP on CUDA, bf16 FSDP)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_workers(_parity_worker, 2, "cuda", device="cuda", timeout=300)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    exact_gpu_math()
    try:
        check_parity(results, "cuda", tol=1e-4)
    finally:
        blip_fast.set_backend(None)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    bf16 = results[0]["bf16"]
    assert bf16["dtypes"] == {(torch.float32, torch.float32)} and torch.isfinite(bf16["losses"]).all()
    torch.testing.assert_close(bf16["losses"], results[0]["fsdp"]["losses"][0], rtol=0.05, atol=0.05)


def _graphed_ddp_worker(rank, world):
    """Three steps through DDP, eagerly and replayed as one CUDA graph (queue all-gathers and the
    gradient all-reduce captured), from the same start and seeds."""
    import contextlib

    from blip_fast.cuda_graph import DDP_CAPTURE_WARMUP
    from blip_fast.train.graphed_step import GraphedForwardBackward, forward_backward

    device = torch.device("cuda", rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    for graphed in (False, True):
        model = build(dropout=False, queue_size=10)
        wrapped = parallel.wrap_model(model, "ddp", device, cuda_graph=graphed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        bdist.seed_everything(1)  # per rank: the hard-negative draws
        graph, values = None, []
        for step in range(3):
            images, text, _ = shard(global_batch(step, 4), rank, world, device)
            if graphed:
                if graph is None:  # warm-up and capture leave no trace on the model or the generators
                    graph = GraphedForwardBackward(wrapped, params, images, text, 0.4, contextlib.nullcontext,
                                                   warmup=DDP_CAPTURE_WARMUP)
                values.append(graph(images, text, 0.4))
            else:
                opt.zero_grad(set_to_none=True)
                values.append(forward_backward(wrapped, params, images, text, 0.4, contextlib.nullcontext))
            opt.step()
        out[graphed] = {"values": torch.stack(values).cpu(), "params": flat(params).cpu(),
                        "queue": model.image_queue.cpu(), "ptr": int(model.queue_ptr)}
    return out


@pytest.mark.gpu
def test_nccl_ddp_step_replayed_as_a_cuda_graph_matches_eager():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_workers(_graphed_ddp_worker, 2, device="cuda", timeout=300)
    for rank, out in enumerate(results):
        eager, graph = out[False], out[True]
        torch.testing.assert_close(graph["values"], eager["values"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        torch.testing.assert_close(graph["params"], eager["params"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        torch.testing.assert_close(graph["queue"], eager["queue"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        assert graph["ptr"] == eager["ptr"] == 2  # 3 steps of global batch 4 into a queue of 10
    assert torch.equal(results[0][True]["params"], results[1][True]["params"]), "graphed ranks diverged"


def test_cuda_graph_wrapping_needs_ddp_on_a_gpu():
    with pytest.raises(ValueError, match="cuda_graph=True needs strategy 'ddp' or 'none' on a CUDA device"):
        parallel.wrap_model(build(), "none", "cpu", cuda_graph=True)


# -- the original semantics (rank-local negatives): invariants --------------------------------------
def _ddp_default_worker(rank, world, tmp):
    out = {}
    # collectives
    x = torch.arange(6.0).view(3, 2) + 100 * rank
    out["gathered"] = bdist.concat_all_gather(x)
    x.requires_grad_(True)
    weight = torch.arange(12.0).view(6, 2) * (rank + 1)
    (bdist.all_gather_with_grad(x) * weight).sum().backward()
    out["gather_grad"] = x.grad
    # three steps of DDP, dropout on, sampled hard negatives, AdamW
    model = build(negative_all_rank=False, dropout=True, queue_size=10)
    bdist.seed_everything(0)
    wrapped = parallel.wrap_model(model, "ddp", "cpu")
    out["initial_queue"] = model.image_queue.clone()
    recorded = []
    enqueue = model._dequeue_and_enqueue

    def record(image_feat, text_feat):
        recorded.append(image_feat.clone())
        enqueue(image_feat, text_feat)

    model._dequeue_and_enqueue = record
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    out["grads"], out["ptr"] = [], []
    for step in range(3):
        images, text, _ = shard(global_batch(step, 6), rank, world)
        sum(wrapped(images, text, alpha=0.4)).backward()
        out["grads"].append(flat(p.grad for p in wrapped.parameters() if p.requires_grad))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["ptr"].append(int(model.queue_ptr))
    out["recorded"] = recorded
    out["image_queue"] = model.image_queue
    out["params"] = flat(model.parameters())
    out["momentum_grads"] = [p.grad for p in list(model.visual_encoder_m.parameters())
                             + list(model.text_encoder_m.parameters())]
    # The multi-GPU benchmark's worker, as torchrun runs it, on this group (tiny sizes, float32)
    from benchmarks import scaling
    scaling.run_worker(scaling.parse_args(["--worker", "--device", "cpu", "--tiny", "--batch", "2", "--steps", "2",
                                           "--warmup", "1", "--no-sync-steps", "1", "--dtype", "fp32",
                                           "--json", os.path.join(tmp, "scaling.json")]))
    return out


def test_ddp_original_semantics_identical_state_on_every_rank(tmp_path):
    r0, r1 = run_workers(_ddp_default_worker, 2, str(tmp_path), timeout=180)
    expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(6.0).view(3, 2) + 100])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    weight = torch.arange(12.0).view(6, 2)
    for rank, out in enumerate((r0, r1)):  # d/dx_r of sum_r' <gather(x), w * (r'+1)> = 3 * w[rows of r]
        assert torch.equal(out["gather_grad"], 3 * weight[3 * rank:3 * rank + 3])
    for a, b in zip(r0["grads"], r1["grads"]):
        assert torch.equal(a, b), "DDP gradients differ between ranks"
    assert torch.equal(r0["params"], r1["params"])
    assert r0["ptr"] == r1["ptr"] == [6, 2, 8]  # global batch 6 into a queue of 10: wraps at step 2
    assert torch.equal(r0["image_queue"], r1["image_queue"])
    assert torch.equal(r0["initial_queue"], r1["initial_queue"])  # rank 0's random queue everywhere
    # The queue holds the momentum features of every rank, rank-major, written with wrap-around.
    queue = r0["initial_queue"].clone()
    ptr = 0
    for step in range(3):
        feats = torch.cat([r0["recorded"][step], r1["recorded"][step]])
        for row in feats:
            queue[:, ptr] = row
            ptr = (ptr + 1) % 10
    assert torch.equal(r0["image_queue"], queue)
    # find_unused_parameters=False and no error: the frozen momentum encoders are outside DDP's buckets
    assert all(g is None for g in r0["momentum_grads"])
    bench = __import__("json").loads((tmp_path / "scaling.json").read_text())
    assert bench["world_size"] == 2 and bench["strategy"] == "ddp" and len(bench["per_rank_median_step_s"]) == 2
    assert bench["global_img_s"] > 0 and bench["no_sync_median_step_s"] > 0


# -- resume ----------------------------------------------------------------------------------------
RESUME_STEPS, SAVE_AFTER = 3, 2


def resume_run(strategy, rank, world, steps, seed, load_from=None, save_to=None):
    """Train ``steps`` steps (dropout on, sampled hard negatives, AdamW + warm-up schedule),
    optionally resuming from / saving to a training state; returns the per-step local losses."""
    model = build(negative_all_rank=False, dropout=True, seed=seed)
    bdist.seed_everything(seed)
    wrapped = parallel.wrap_model(model, strategy, "cpu")
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    start = 0
    if load_from is not None:
        extra = parallel.load_training_state(load_from, wrapped, opt)
        sched.load_state_dict(extra["scheduler"])
        start = extra["step"]
    losses = []
    for step in range(start, steps):
        images, text, _ = shard(global_batch(step, 6), rank, world)
        loss = sum(wrapped(images, text, alpha=0.4))
        loss.backward()
        parallel.clip_grad_norm_(wrapped, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if save_to is not None:
        parallel.save_training_state(save_to, wrapped, opt, {"step": steps, "scheduler": sched.state_dict()})
    return losses, full_state(wrapped)


def _resume_worker(rank, world, tmp):
    out = {}
    for strategy, path in (("ddp", os.path.join(tmp, "ddp.pt")), ("fsdp", os.path.join(tmp, "fsdp_ckpt"))):
        full, _ = resume_run(strategy, rank, world, RESUME_STEPS, seed=0)
        first, saved_state = resume_run(strategy, rank, world, SAVE_AFTER, seed=0, save_to=path)
        # A fresh model from another seed: everything must come from the checkpoint.
        second, _ = resume_run(strategy, rank, world, RESUME_STEPS, seed=123, load_from=path)
        out[strategy] = {"full": torch.stack(full), "resumed": torch.stack(first + second)}
        out[strategy + "_layout"] = os.path.isdir(path)
    # A full checkpoint written under DDP loads into an FSDP model (keys are parameter names).
    model = build(seed=7)
    wrapped = parallel.wrap_model(model, "fsdp", "cpu")
    parallel.load_training_state(os.path.join(tmp, "ddp.pt"), wrapped, rng=False)
    out["cross"] = full_state(wrapped)
    return out


def test_resume_from_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    results = run_workers(_resume_worker, 2, str(tmp_path), timeout=240)
    for rank, out in enumerate(results):
        for strategy in ("ddp", "fsdp"):
            assert torch.equal(out[strategy]["resumed"], out[strategy]["full"]), (rank, strategy, out[strategy])
        assert not out["ddp_layout"] and out["fsdp_layout"]  # one file vs a DCP directory
    assert not any(name.endswith((".tmp", ".old")) or ".tmp." in name for name in os.listdir(tmp_path))
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2 and saved["extra"]["step"] == SAVE_AFTER
    for key, value in saved["model"].items():
        assert torch.equal(results[0]["cross"][key], value), key
    # The file is an original-layout checkpoint too: blip_fast.load_checkpoint reads its 'model'.
    _, report = blip_fast.load_checkpoint(build(seed=5), str(tmp_path / "ddp.pt"))
    assert not report.missing_keys and not report.unexpected_keys
