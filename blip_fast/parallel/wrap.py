"""``wrap_model``: put a BLIP model on its device and make it data parallel (DDP or FSDP2)."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import get_world_size, is_dist_avail_and_initialized
from ._common import STRATEGIES, broadcast_tensors, mixed_precision_dtype
from .fsdp import apply_fsdp

logger = logging.getLogger("blip_fast.parallel")


def sync_module_state(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters (online and momentum) and buffers (the ITC queues
    and their pointer). No-op when not distributed."""
    broadcast_tensors(model.parameters(), src)
    broadcast_tensors(model.buffers(), src)


def wrap_model(model: nn.Module, strategy: str = "ddp", device: Union[str, torch.device, None] = None,
               mixed_precision: Optional[str] = None, *, static_graph: bool = False, bucket_cap_mb: float = 25.0,
               reshard_after_forward: bool = True, forward_prefetch: bool = True,
               sync_module_states: bool = True, cuda_graph: bool = False, **ddp_kwargs: Any) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it for data-parallel training.

    Args:
        strategy: ``'none'`` (one process, or each rank on its own), ``'ddp'``
            (``DistributedDataParallel``: gradient buckets all-reduced while backward runs) or
            ``'fsdp'`` (FSDP2 ``fully_shard`` per block, see :mod:`blip_fast.parallel.fsdp`).
        device: where to compute (default: the current CUDA device, else the CPU).
        mixed_precision: ``'bf16'``, ``'fp16'`` or None. FSDP: parameters are gathered and used in
            that dtype, gradients reduced in float32, sharded master weights stay float32. DDP /
            none: parameters stay float32; either way run the forward under
            :func:`blip_fast.parallel.autocast` with the same value.
        static_graph, bucket_cap_mb, ddp_kwargs: passed to DDP.
        reshard_after_forward, forward_prefetch: FSDP options (see :func:`apply_fsdp`).
        sync_module_states: first give every rank rank 0's weights, momentum weights and queues
            (so ranks seeded differently start identical).
        cuda_graph: the training step will be captured in a CUDA graph with DDP's gradient
            all-reduce inside it (see :mod:`blip_fast.cuda_graph`): DDP is built on the capture
            stream. Not available with FSDP, whose collectives are issued from host-side hooks.

    DDP is built with ``find_unused_parameters=False``: every trainable parameter of the BLIP
    models receives a gradient each step (the momentum encoders are frozen, so DDP ignores them),
    and with ``broadcast_buffers=False``: the queues are updated identically on every rank from
    all-gathered features, so nothing is broadcast per step.
    Returns the wrapped model (``DistributedDataParallel``, the FSDP-sharded model itself, or the
    model); :func:`unwrap_model` gives back the BLIP model.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    mp_dtype = mixed_precision_dtype(mixed_precision)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if cuda_graph and (strategy == "fsdp" or device.type != "cuda"):
        raise ValueError(f"cuda_graph=True needs strategy 'ddp' or 'none' on a CUDA device, got {strategy!r} on "
                         f"{device}. Fix: run FSDP (or the CPU) eagerly, cuda_graph=False")
    if strategy != "none" and not is_dist_avail_and_initialized():
        raise RuntimeError(f"strategy={strategy!r} needs an initialised process group: call "
                           f"blip_fast.distributed.init_distributed() first (launch with torchrun), "
                           f"or use strategy='none'")
    model.to(device)
    if strategy == "none":
        return model
    if sync_module_states and get_world_size() > 1:
        sync_module_state(model)
    if strategy == "ddp":
        if cuda_graph:
            from ..cuda_graph import capture_stream
            stream = capture_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                wrapped = _wrap_ddp(model, device, static_graph, bucket_cap_mb, **ddp_kwargs)
            torch.cuda.current_stream(device).wait_stream(stream)
            return wrapped
        return _wrap_ddp(model, device, static_graph, bucket_cap_mb, **ddp_kwargs)
    return apply_fsdp(model, mp_dtype, reshard_after_forward=reshard_after_forward,
                      forward_prefetch=forward_prefetch)


def _wrap_ddp(model: nn.Module, device: torch.device, static_graph: bool, bucket_cap_mb: float,
              **kwargs: Any) -> DistributedDataParallel:
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    options = dict(device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False,
                   static_graph=static_graph, gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb)
    # torch >= 2.13 renames broadcast_buffers; the queues were synchronised above either way.
    options["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    options.update(kwargs)
    return DistributedDataParallel(model, **options)
