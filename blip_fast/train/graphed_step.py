"""The job's forward + backward replayed as one CUDA graph (``cuda_graph: true``).

Eagerly, a BLIP_Pretrain step on one GPU is bound by the host issuing its kernels (see
benchmarks/RESULTS.md "Fast path"); replaying the captured forward and backward issues them all with
one call. The optimiser step stays outside the graph: the job decides after the step's one host
synchronisation whether the losses and gradients are finite, and only then clips and steps (a
non-finite step is skipped and its queue columns restored, exactly as in eager mode).

Capture runs a few warm-up steps; they would enqueue features and advance the momentum encoders and
the random generators, so the model's whole state and the generators are put back afterwards:
capturing has no effect on training.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, List

import torch

from ..cuda_graph import CUDAGraphStep
from ..tokenizer import TokenizedText

Tensor = torch.Tensor


def grad_norm(params: List[Tensor]) -> Tensor:
    """The global L2 norm of the parameters' gradients (0-d float32; 0 when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def forward_backward(model: torch.nn.Module, params: List[Tensor], images: Tensor, text: TokenizedText,
                     alpha, autocast: Callable[[], ContextManager]) -> Tensor:
    """One step's losses and gradients (gradients written to ``p.grad``); returns float32
    ``[loss_ita, loss_itm, loss_lm, grad_norm]``, no host synchronisation."""
    with autocast():
        loss_ita, loss_itm, loss_lm = model(images, text, alpha)
        loss = loss_ita + loss_itm + loss_lm
    loss.backward()
    return torch.stack([loss_ita.detach().float(), loss_itm.detach().float(), loss_lm.detach().float(),
                        grad_norm(params)])


class GraphedForwardBackward:
    """``__call__(images, text, alpha) -> [loss_ita, loss_itm, loss_lm, grad_norm]`` by graph replay.

    ``images``: float ``(B, 3, S, S)`` normalised, ``text``: :class:`TokenizedText` ``(B, L)``, both on
    the GPU with the captured shapes; ``alpha``: a Python float (copied into a device scalar). The
    gradients land in the parameters' ``.grad`` (tensors owned by the graph: do not set them to None).
    """

    def __init__(self, model: torch.nn.Module, params: List[Tensor], images: Tensor, text: TokenizedText,
                 alpha: float, autocast: Callable[[], ContextManager], warmup: int = 2):
        self.model, self.params = model, params
        self.alpha = torch.tensor(float(alpha), device=images.device)

        def step(images: Tensor, text: TokenizedText, alpha: Tensor) -> Tensor:
            return forward_backward(model, params, images, text, alpha, autocast)

        with _state_preserved(model):
            self._graph = CUDAGraphStep(step, images, text, self.alpha, warmup=warmup, params=params)

    def __call__(self, images: Tensor, text: TokenizedText, alpha: float) -> Tensor:
        self.alpha.fill_(float(alpha))
        return self._graph(images, text, self.alpha).clone()


@contextlib.contextmanager
def _state_preserved(model: torch.nn.Module):
    """Put back the model's parameters and buffers (queues, queue pointer, momentum encoders) and the
    CPU and CUDA generators after the block."""
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(saved[k])
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng)
