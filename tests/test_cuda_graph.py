"""Whole-step CUDA graphs: replaying the captured pretraining step gives the eager step's numbers."""
import copy

import pytest
import torch

from blip_fast import use_backend
from blip_fast.cuda_graph import CUDAGraphStep
from blip_fast.models import BLIP_Pretrain
from test_gpu_parity import IMG, MED, VIT, _inputs


def test_needs_cuda_or_says_so():
    if torch.cuda.is_available():
        pytest.skip("the CPU-only message")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        CUDAGraphStep(lambda x: x, torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.parametrize("order", [None, ["sdpa", "reference"], ["reference"]], ids=["auto", "sdpa", "reference"])
def test_graphed_pretraining_steps_equal_eager_steps(order, monkeypatch):
    from blip_fast.ops import _dispatch
    if order is not None:
        monkeypatch.setattr(_dispatch, "AUTO_ORDER", order)
    torch.manual_seed(0)
    eager = BLIP_Pretrain(med_config=MED, image_size=IMG, vit=VIT, embed_dim=32, queue_size=16).cuda()
    graphed = copy.deepcopy(eager)
    negatives = (torch.tensor([1, 2, 3, 0], device="cuda"), torch.tensor([3, 0, 1, 2], device="cuda"))

    def make_step(model, opt):
        def step(image, tokens, alpha):
            with use_backend("auto"), torch.autocast("cuda", dtype=torch.bfloat16):
                losses = model(image, tokens, alpha=alpha, hard_negatives=negatives)
            sum(losses).backward()
            opt.step()
            return torch.stack(losses)
        return step

    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-4, capturable=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-4, capturable=True)
    batches = [_inputs(torch.device("cuda"), 4, seed=s) for s in range(1, 8)]
    alpha = torch.full((), 0.4, device="cuda")
    step_e = make_step(eager, opt_e)
    graph = CUDAGraphStep(make_step(graphed, opt_g), *batches[0], alpha, warmup=2, optimizer=opt_g)
    # the warm-up steps are real training steps: start the eager twin from where they left off
    eager.load_state_dict(graphed.state_dict())
    opt_e.load_state_dict(opt_g.state_dict())
    for i, (image, tokens) in enumerate(batches[2:]):
        alpha.fill_(0.3)
        opt_e.zero_grad(set_to_none=True)
        want = step_e(image, tokens, alpha).float()
        got = graph(image, tokens, alpha).float().clone()
        # The first replay starts from the eager step's state: the same kernels give the same
        # losses. Later steps may differ by kernel non-determinism (atomics in an attention
        # backward) carried through the updates.
        rtol = 1e-5 if i == 0 else 1e-3
        assert torch.allclose(got, want, rtol=rtol, atol=1e-6), (i, got, want)
    assert torch.equal(graphed.queue_ptr, eager.queue_ptr)
    with pytest.raises(ValueError, match="captured as"):
        graph(batches[0][0][:2], batches[0][1], alpha)
    with pytest.raises(TypeError, match="baked into the graph"):
        CUDAGraphStep(make_step(graphed, opt_g), *batches[0], 0.4, optimizer=opt_g)
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphStep(make_step(graphed, opt_g), *batches[0], alpha,
                      optimizer=torch.optim.AdamW(graphed.parameters(), lr=1e-4))
