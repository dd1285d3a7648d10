"""One-process behaviour of blip_fast.distributed and blip_fast.parallel: identities without a
process group, seeding and RNG state, the FSDP sharding plan, training-state files, errors.
(The multi-process behaviour is in test_distributed.py.)"""
import os

import pytest
import torch

from blip_fast import distributed as bdist
from blip_fast import parallel
from blip_fast.checkpoint import CheckpointError
from blip_fast.models import BLIP_Pretrain
from blip_fast.parallel.fsdp import group_by_shared_params
from test_distributed import build, global_batch


def test_collectives_are_identities_without_a_process_group(monkeypatch):
    assert not bdist.is_dist_avail_and_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    assert bdist.concat_all_gather(x) is x
    assert bdist.all_gather_with_grad(x) is x
    assert (bdist.get_rank(), bdist.get_world_size(), bdist.is_main_process()) == (0, 1, True)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = bdist.init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.backend, env.distributed, env.device) == (0, 1, None, False,
                                                                                    torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        bdist.init_distributed(device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            bdist.init_distributed(device="cuda")


def test_seed_and_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    assert bdist.seed_everything(5) == 5  # rank 0 of 1
    state = bdist.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand())
    bdist.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_negative_all_rank_is_the_default_computation_on_one_process():
    batch = global_batch(0, 4)
    losses = []
    for flag in (False, True):
        model = build(negative_all_rank=flag)
        torch.manual_seed(3)  # same dropout masks and hard-negative draws
        losses.append(torch.stack(model(batch[0], batch[1], alpha=0.4)))
    assert torch.equal(losses[0], losses[1])


def test_hard_negatives_never_pick_the_positive_at_an_offset():
    torch.manual_seed(0)
    sim = torch.full((3, 9), -50.0)
    sim[torch.arange(3), 4 + torch.arange(3)] = 50.0  # the positives (rank 1 of 3 with batch 3 + queue)
    for _ in range(20):
        neg_image, neg_text = BLIP_Pretrain.sample_hard_negatives(sim, sim, 9, offset=4)
        assert not torch.any(neg_image == 4 + torch.arange(3)) and not torch.any(neg_text == 4 + torch.arange(3))
        assert int(neg_image.max()) < 9


def test_fsdp_plan_keeps_tied_encoder_decoder_layers_in_one_unit():
    model = build()
    units = parallel.shard_plan(model)
    by_module = {id(m): unit for unit in units for m in unit}
    for i in range(2):
        unit = by_module[id(model.text_encoder.encoder.layer[i])]
        assert any(m is model.text_decoder.bert.encoder.layer[i] for m in unit) and len(unit) == 2
        assert len(by_module[id(model.text_encoder_m.encoder.layer[i])]) == 1
    text_unit = by_module[id(model.text_encoder)]
    assert any(m is model.text_decoder for m in text_unit)  # embeddings (= the LM head weight) shared
    for name in ("visual_encoder", "visual_encoder_m", "text_encoder_m"):
        assert len(by_module[id(getattr(model, name))]) == 1
    assert len(units) == 2 * 2 + 2 + 2 + 4  # ViT blocks x2 towers, tied layer pairs, momentum layers, towers
    # Units that share a parameter are nested (FSDP gives it to the inner one), never siblings.
    def contains(outer, inner):
        return any(m is i or any(c is i for c in m.modules()) for m in outer for i in inner)

    params = [{id(p) for m in unit for p in m.parameters()} for unit in units]
    for i in range(len(units)):
        for j in range(i + 1, len(units)):
            if params[i] & params[j]:
                assert contains(units[i], units[j]) or contains(units[j], units[i]), (units[i], units[j])
    assert [p for p in model.parameters() if p.dim() == 0] == [model.temp]  # replicated, not sharded


def test_group_by_shared_params():
    a, b, c = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    c.weight = a.weight
    assert group_by_shared_params([a, b, c]) == [[a, c], [b]]
    assert group_by_shared_params([a, b, c], exclude={id(a.weight)}) == [[a], [b], [c]]


def test_wrap_model_rejects_bad_arguments():
    model = build()
    with pytest.raises(RuntimeError, match="init_distributed"):
        parallel.wrap_model(model, "ddp", "cpu")
    with pytest.raises(ValueError, match="strategy"):
        parallel.wrap_model(model, "zero3", "cpu")
    with pytest.raises(ValueError, match="mixed_precision"):
        parallel.wrap_model(model, "none", "cpu", mixed_precision="int8")
    assert parallel.wrap_model(model, "none", "cpu") is model
    assert parallel.strategy_of(model) == "none" and parallel.unwrap_model(model) is model


def _train_step(model, opt, step):
    images, text, _ = global_batch(step, 4)
    loss = sum(model(images, text, alpha=0.4))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@pytest.mark.parametrize("sharded", [False, True])
def test_training_state_round_trip_on_one_process(tmp_path, sharded):
    path = str(tmp_path / ("state" if sharded else "state.pt"))
    model = build(seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _train_step(model, opt, 0)
    parallel.save_training_state(path, model, opt, {"step": 1, "note": "x"}, sharded=sharded)
    assert os.path.isdir(path) == sharded
    parallel.save_training_state(path, model, opt, {"step": 2}, sharded=sharded)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no temporary left

    fresh = build(seed=9)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    extra = parallel.load_training_state(path, fresh, fresh_opt)
    assert extra == {"step": 2}
    for key, value in model.state_dict().items():  # weights, momentum weights, queues, pointer
        assert torch.equal(fresh.state_dict()[key], value), key
    assert int(fresh.queue_ptr) == int(model.queue_ptr) != 0
    torch.manual_seed(11)
    resumed = _train_step(fresh, fresh_opt, 2)
    torch.manual_seed(11)
    assert torch.equal(resumed, _train_step(model, opt, 2))


def test_training_state_errors(tmp_path):
    model = build()
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="load_checkpoint"):
        parallel.load_training_state(tmp_path / "weights.pth", model)
    with pytest.raises(CheckpointError, match="no training state"):
        parallel.load_training_state(tmp_path / "missing.pt", model)
    parallel.save_training_state(tmp_path / "model_only.pt", model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(CheckpointError, match="optimizer=None"):
        parallel.load_training_state(tmp_path / "model_only.pt", model, opt)
    assert parallel.load_training_state(tmp_path / "model_only.pt", build(seed=3)) == {}


def test_clip_grad_norm_matches_torch_and_grad_sync_is_a_no_op_on_one_process():
    model = build()
    images, text, _ = global_batch(0, 4)
    with parallel.grad_sync(model, enabled=False):
        sum(model(images, text, alpha=0.4)).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = parallel.clip_grad_norm_(model, 0.1)
    for p, g in zip([p for p in model.parameters() if p.grad is not None], grads):
        p.grad.copy_(g)
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    torch.testing.assert_close(norm, expected)
    assert norm > 0.1
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()
                                                  if p.grad is not None]))
    torch.testing.assert_close(total, torch.tensor(0.1), rtol=1e-4, atol=0)


def test_public_names():
    for name in parallel.__all__:
        assert hasattr(parallel, name)


def test_rank_zero_logging(capsys):
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        bdist.setup_logging(logging.INFO)
        bdist.setup_logging(logging.INFO)  # idempotent: one handler
        assert sum(getattr(h, "_blip_fast_rank_handler", False) for h in root.handlers) == 1
        bdist.log_rank0(logging.getLogger("blip_fast.test"), "hello %d", 7)
        assert "[rank 0] blip_fast.test: hello 7" in capsys.readouterr().err
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
