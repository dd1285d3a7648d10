"""Whole-step CUDA graphs: capture forward, backward and the optimiser step once, replay them.

A BLIP training step launches thousands of small kernels; at the batch sizes that fit one GPU the
host cannot issue them as fast as the GPU runs them. Replaying the captured step issues all of
them with one call. The numbers are the eager step's: the same kernels run on the same memory.

What capture needs, checked up front with errors that say the fix:

* every tensor input has a fixed shape, dtype and device (pad captions to a fixed length, keep the
  batch size; a changed shape raises);
* the optimiser updates on the device: ``AdamW(..., capturable=True)`` (also ``Adam``, ``SGD``
  without that flag);
* values that change between steps are tensors (pass ``alpha`` as a 0-d CUDA tensor: a Python
  float is baked into the graph);
* no host synchronisation inside the step (``blip_fast`` models have none: tests/test_gpu_parity.py
  checks it);
* under ``torch.distributed`` (one GPU per process, NCCL >= 2.9.6): the step's collectives (queue
  all-gathers, DDP's gradient all-reduce) are captured too. DDP must then be built on
  :func:`capture_stream` (``wrap_model(..., cuda_graph=True)``) and run
  :data:`DDP_CAPTURE_WARMUP` eager steps first, and every rank captures and replays the same graph;
* random numbers come from torch's CUDA generator (dropout, ``torch.multinomial``), which CUDA
  graphs advance on every replay; a kernel that would draw a dropout seed on the host during
  capture (and so replay one mask forever) raises instead.

Example::

    step = CUDAGraphStep(train_step, image, tokens, alpha)   # train_step(image, tokens, alpha) -> losses
    for image, tokens in loader:
        alpha.fill_(current_alpha)
        losses = step(image, tokens, alpha)                  # static output tensors, overwritten each replay
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["CUDAGraphStep", "check_capturable_optimizer", "capture_stream", "DDP_CAPTURE_WARMUP"]

# DDP settles its buckets and finishes its logging within its first 10 iterations; a capture must
# come after them (PyTorch's notes on CUDA graphs with DistributedDataParallel).
DDP_CAPTURE_WARMUP = 11

_CAPTURE_STREAMS: dict = {}


def capture_stream(device: torch.device | int | None = None) -> torch.cuda.Stream:
    """The side stream on which graphs are warmed up and captured, one per device.

    DDP creates its gradient hooks (AccumulateGrad nodes) on the stream current at construction;
    built on this stream, its backward stays off the legacy default stream, which a capture may not
    touch."""
    index = device if isinstance(device, int) else getattr(device, "index", None)
    if index is None:
        index = torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _CAPTURE_STREAMS[index]


def _flatten(obj: Any, path: str = "input") -> List[Tuple[str, Any]]:
    """Leaves of tensors / dataclasses of tensors / tuples and lists, with their paths."""
    if isinstance(obj, Tensor):
        return [(path, obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = []
        for f in dataclasses.fields(obj):
            out += _flatten(getattr(obj, f.name), f"{path}.{f.name}")
        return out
    if isinstance(obj, (tuple, list)):
        out = []
        for i, x in enumerate(obj):
            out += _flatten(x, f"{path}[{i}]")
        return out
    return [(path, obj)]


def check_capturable_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``optimizer`` can be captured in a CUDA graph (state updated on the device)."""
    for group in optimizer.param_groups:
        if "capturable" in group and not group["capturable"]:
            raise ValueError(
                f"{type(optimizer).__name__} keeps its step count on the host and cannot be captured in a "
                f"CUDA graph. Fix: build it with capturable=True, e.g. torch.optim.AdamW(params, lr=..., "
                f"capturable=True)")
        if group.get("differentiable"):
            raise ValueError("differentiable optimisers cannot be captured; build it with differentiable=False")


class CUDAGraphStep:
    """Capture ``step_fn(*inputs)`` (forward + backward + optimiser step) in one CUDA graph.

    Args:
        step_fn: runs one full training step on its arguments (forward, ``backward``, optimiser
            step, no ``zero_grad``) and returns tensors (the losses).
        *example_inputs: tensors (or :class:`~blip_fast.tokenizer.TokenizedText`, tuples of them,
            0-d tensors for changing scalars) with the shapes of every later call.
        warmup: eager steps run on :func:`capture_stream` before capture (cuBLAS / autotuning /
            lazy state such as optimiser moments are created there). They are real training steps.
            A step through DDP needs at least :data:`DDP_CAPTURE_WARMUP`.
        optimizer: the optimiser stepped inside ``step_fn``; checked for ``capturable=True``.

    Gradients: before capture every parameter's ``.grad`` is set to None, so the captured
    backward allocates them from the graph's pool and each replay recomputes them from scratch
    (the graph never accumulates across replays). Do not call ``zero_grad`` between replays.

    Calling the object copies the inputs into the captured buffers, replays, and returns the
    captured outputs (the same tensors every time: clone them to keep a step's value).
    """

    def __init__(self, step_fn: Callable[..., Any], *example_inputs: Any, warmup: int = 3,
                 optimizer: torch.optim.Optimizer | None = None,
                 params: Sequence[torch.nn.Parameter] = ()):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; run the eager step on the CPU instead")
        if optimizer is not None:
            check_capturable_optimizer(optimizer)
        leaves = _flatten(list(example_inputs))
        for path, leaf in leaves:
            if isinstance(leaf, Tensor):
                if leaf.device.type != "cuda":
                    raise ValueError(f"{path} is on {leaf.device}: CUDA-graph inputs must be CUDA tensors "
                                     f"(move the batch with .to('cuda', non_blocking=True) before the step)")
            elif isinstance(leaf, (float, int, bool)) and not isinstance(leaf, bool):
                raise TypeError(
                    f"{path} is a Python {type(leaf).__name__} ({leaf!r}): it would be baked into the graph. "
                    f"Fix: pass a 0-d CUDA tensor and update it in place (t.fill_(value)) before each call")
        self._step_fn = step_fn
        self._device = next((leaf.device for _, leaf in leaves if isinstance(leaf, Tensor)), None)
        self._params = list(params) or ([p for g in optimizer.param_groups for p in g["params"]]
                                        if optimizer is not None else [])
        self._static_inputs = [(path, leaf.clone() if isinstance(leaf, Tensor) else leaf)
                               for path, leaf in leaves]
        self._structure = example_inputs
        self._graph = torch.cuda.CUDAGraph()
        self._outputs = self._capture(warmup)

    # ------------------------------------------------------------------------------------------
    def _rebuild(self, obj: Any, it) -> Any:
        if isinstance(obj, Tensor):
            return next(it)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return type(obj)(**{f.name: self._rebuild(getattr(obj, f.name), it) for f in dataclasses.fields(obj)})
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._rebuild(x, it) for x in obj)
        next(it)
        return obj

    def _static_args(self) -> List[Any]:
        it = iter(leaf for _, leaf in self._static_inputs)
        return [self._rebuild(x, it) for x in self._structure]

    def _capture(self, warmup: int) -> Any:
        args = self._static_args()
        side = capture_stream(self._device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                for p in self._params:
                    p.grad = None
                self._step_fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for p in self._params:
            p.grad = None
        with torch.cuda.graph(self._graph, stream=side):
            outputs = self._step_fn(*args)
        return outputs

    def __call__(self, *inputs: Any) -> Any:
        leaves = _flatten(list(inputs))
        if len(leaves) != len(self._static_inputs):
            raise ValueError(f"the step was captured with {len(self._static_inputs)} input tensors/values, "
                             f"got {len(leaves)}")
        for (path, new), (_, static) in zip(leaves, self._static_inputs):
            if isinstance(static, Tensor):
                if not isinstance(new, Tensor) or new.shape != static.shape or new.dtype != static.dtype:
                    got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, Tensor) else repr(new)
                    raise ValueError(
                        f"{path}: captured as {tuple(static.shape)} {static.dtype}, got {got}. A CUDA graph "
                        f"replays fixed shapes: pad to the captured shape (fixed batch size, captions padded "
                        f"to max_length) or capture another CUDAGraphStep for this shape")
                static.copy_(new, non_blocking=True)
            elif new != static:
                raise ValueError(f"{path}: captured with {static!r}, got {new!r}; pass it as a tensor to vary it")
        self._graph.replay()
        return self._outputs
