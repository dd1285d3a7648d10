"""Process setup for the job: device, torch.distributed from torchrun's environment, model wrapping,
seeding and random-generator state.

One process per device: under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) the
process group starts with NCCL on GPUs and Gloo on CPUs, and each rank takes ``cuda:LOCAL_RANK``.
:func:`wrap_for_distributed` is the one place that decides how the model is replicated.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

logger = logging.getLogger("blip_fast.train")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: Optional[str]) -> torch.device:
    """``'cpu'``, ``'cuda'``, ``'cuda:1'`` or None/``'auto'`` (CUDA when present)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available in this process (torch {torch.__version__}); "
                           f"use --device cpu")
    return device


def init_runtime(device: Optional[str] = None, timeout_minutes: float = 30.0) -> Runtime:
    """Start torch.distributed when launched by torchrun (else a single process) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return Runtime(pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    base = pick_device(device)
    if base.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs: Dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return Runtime(dev, rank, world, local_rank, True)


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        if rt.device.type == "cuda":
            dist.barrier(device_ids=[rt.device.index])
        else:
            dist.barrier()


def wrap_for_distributed(model: nn.Module, rt: Runtime) -> nn.Module:
    """The model as the training step calls it: DDP across ranks, the model itself on one.

    ``broadcast_buffers=False``: the momentum encoders' queues are updated identically on every rank
    from all-gathered features, so there is nothing to broadcast per step; DDP still broadcasts every
    parameter and buffer from rank 0 once at construction.
    """
    if not rt.distributed:
        return model
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                               find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# -- random-generator state (saved in checkpoints; loadable with weights_only=True) ----------------
def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states: List[torch.Tensor] = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has CUDA generator states for %d device(s), this process sees %d: "
                           "CUDA generators not restored", len(cuda_states), torch.cuda.device_count())


def gather_objects(obj: Any, rt: Runtime) -> List[Any]:
    """``[obj from rank 0, obj from rank 1, ...]`` on every rank."""
    if not rt.distributed:
        return [obj]
    out: List[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out
