"""torch.distributed helpers: process-group setup from torchrun, the feature all-gathers of the ITC
queues, per-rank seeding and RNG state, rank-0 logging.

Everything here degrades to the single-process behaviour when no process group is initialised:
the all-gathers are the identity, the rank is 0 and the world size 1.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist

Tensor = torch.Tensor

__all__ = [
    "is_dist_avail_and_initialized", "get_world_size", "get_rank", "get_local_rank", "is_main_process",
    "barrier", "DistEnv", "init_distributed", "destroy_distributed", "concat_all_gather", "all_gather_with_grad",
    "seed_everything", "rng_state", "set_rng_state", "setup_logging", "log_rank0",
]


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if is_dist_avail_and_initialized():
        dist.barrier()


# -- process group -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, the
    ``device`` it computes on and the process-group ``backend`` (None when not distributed)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Union[str, torch.device, None] = None, backend: Optional[str] = None,
                     timeout: Optional[datetime.timedelta] = None) -> DistEnv:
    """Initialise the default process group from torchrun's environment and pick this rank's device.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT`` through the
    ``env://`` method). ``device``: ``'cuda'`` (rank ``LOCAL_RANK``'s GPU), ``'cpu'``, or None for
    CUDA when available. ``backend``: default ``nccl`` on CUDA, ``gloo`` on the CPU. Without
    ``WORLD_SIZE`` (a plain ``python train.py``) nothing is initialised and a one-process
    :class:`DistEnv` is returned, so one script runs both ways. Calling it again returns the
    current state.
    """
    local_rank = get_local_rank()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed(device='cuda') but CUDA is not available; pass device='cpu' "
                               "(gloo) or run on a machine with GPUs")
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                                   f"visible: launch at most that many processes per node "
                                   f"(torchrun --nproc_per_node)")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if is_dist_avail_and_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    if "WORLD_SIZE" not in os.environ:
        return DistEnv(0, 1, local_rank, device, None)
    if "RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE is set but RANK is not: launch with torchrun (or set RANK, LOCAL_RANK, "
                           "MASTER_ADDR and MASTER_PORT for every process)")
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: Dict[str, Any] = {"backend": backend, "init_method": "env://", "world_size": world_size,
                              "rank": int(os.environ["RANK"])}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this GPU (eager NCCL init)
    dist.init_process_group(**kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def destroy_distributed() -> None:
    """Tear the default process group down (no-op when there is none)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


# -- all-gathers ---------------------------------------------------------------------------------
# torch >= 2.12 renames the single-tensor collectives; the old names warn there and are all 2.11 has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_into(out: Tensor, tensor: Tensor) -> None:
    if dist.get_backend() == "gloo":
        dist.all_gather(list(out.chunk(get_world_size(), dim=0)), tensor)  # supported by every gloo build
    else:
        _all_gather_single(out, tensor)


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` ``(B, ...)`` from every rank along dim 0 -> ``(world * B, ...)``.

    Rank ``r``'s rows are ``[r * B, (r + 1) * B)``. No gradient flows back. Every rank must pass
    the same shape (use ``drop_last=True`` in the data loader). Without an initialised process
    group this is the identity (the original requires one even for a single process).
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
    _all_gather_into(out, tensor)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.world_size = get_world_size()
        ctx.rank = get_rank()
        tensor = tensor.contiguous()
        out = tensor.new_empty((ctx.world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
        _all_gather_into(out, tensor)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        if dist.get_backend() != "gloo":
            out = grad.new_empty((grad.shape[0] // ctx.world_size,) + tuple(grad.shape[1:]))
            _reduce_scatter_single(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter; same result, more traffic
        return grad.chunk(ctx.world_size, dim=0)[ctx.rank].clone()


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """All-gather along dim 0 that keeps gradients: ``(B, ...)`` -> ``(world * B, ...)``.

    A loss on any rank that uses rank ``r``'s rows sends its gradient back to rank ``r`` (summed
    over ranks, as BLIP's ``GatherLayer`` and open_clip's ``gather_with_grad``). With the data
    parallel gradient average this gives the gradient of the mean of the per-rank losses.
    Identity without a process group.
    """
    if get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


# -- seeding and RNG state -----------------------------------------------------------------------
def seed_everything(seed: int, per_rank: bool = True) -> int:
    """Seed ``random``, NumPy and torch (CPU and every GPU); returns the seed used.

    With ``per_rank`` each rank gets ``seed + rank`` (different dropout masks, augmentations and
    hard-negative draws per rank, reproducible run to run). Build the model with ``per_rank=False``
    (or rely on :func:`blip_fast.parallel.wrap_model`, which broadcasts rank 0's weights and queues)
    so every rank starts from the same weights.
    """
    seed = int(seed) + (get_rank() if per_rank else 0)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def rng_state() -> Dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU, the current CUDA device) as tensors and
    plain containers (loadable with ``torch.load(weights_only=True)``)."""
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_python_random_state(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _as_python_random_state(state: Any) -> tuple:
    # torch.load turns the inner tuple into a list only for some pickle protocols; be tolerant.
    version, internal, gauss = state
    return version, tuple(internal), gauss


# -- logging -------------------------------------------------------------------------------------
class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_rank()
        return True


def setup_logging(level: int = logging.INFO, all_ranks: bool = False,
                  fmt: str = "%(asctime)s [rank %(rank)d] %(name)s: %(message)s") -> None:
    """Log to stderr at ``level`` on rank 0 and at WARNING on the other ranks (every rank at
    ``level`` with ``all_ranks``); each line carries its rank. Call after :func:`init_distributed`."""
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_blip_fast_rank_handler", False)]:
        root.removeHandler(old)
    handler._blip_fast_rank_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if all_ranks or is_main_process() else max(level, logging.WARNING))


def log_rank0(logger: logging.Logger, msg: str, *args: Any, level: int = logging.INFO) -> None:
    """``logger.log(level, msg, *args)`` on rank 0 only."""
    if is_main_process():
        logger.log(level, msg, *args)
