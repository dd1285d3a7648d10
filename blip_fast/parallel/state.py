"""Training-state checkpoints that work for plain, DDP and FSDP2 models: save and resume the model
(online and momentum encoders, ITC queues and their pointer: all in the state dict), the
optimizer, whatever the loop adds (scheduler state, step, data position) and every rank's RNG
state.

Two layouts, both keyed by parameter names (so a checkpoint moves between strategies and world
sizes):

* **full** (one file, the default for DDP / one process): rank 0 gathers everything to the CPU and
  writes ``{'model', 'optimizer', 'extra', 'rng', ...}`` with ``torch.save`` to a temporary file
  that ``os.replace`` puts in place (a crash never leaves a half-written checkpoint). Its
  ``'model'`` entry is a plain state dict with the original BLIP key names, so
  :func:`blip_fast.load_checkpoint` (and the original code) read it too.
* **sharded** (a directory, the default for FSDP): ``torch.distributed.checkpoint`` writes each
  rank's shards in parallel (no rank holds the full model), plus ``extra.pt`` and one
  ``rng_rank{r}.pt`` per rank; written to ``<path>.tmp`` and renamed into place at the end.

Everything is read back with ``torch.load(weights_only=True)``: ``extra`` may hold tensors,
numbers, strings and containers of them (state dicts of torch schedulers qualify).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint import CheckpointError
from ..distributed import barrier, get_rank, get_world_size, is_dist_avail_and_initialized, rng_state, set_rng_state
from ._common import is_fsdp, unwrap_model

logger = logging.getLogger("blip_fast.parallel")

FORMAT = "blip_fast.training_state"
VERSION = 1
PathLike = Union[str, os.PathLike]


def save_training_state(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        extra: Optional[Dict[str, Any]] = None, *, sharded: Optional[bool] = None,
                        rng: bool = True) -> None:
    """Save a resumable training state; every rank must call it (it is collective).

    ``model``: the model as returned by :func:`wrap_model` (plain, DDP or FSDP). ``optimizer``:
    its optimizer (or None). ``extra``: the loop's own state, e.g.
    ``{'step': step, 'scheduler': scheduler.state_dict()}``. ``sharded``: a directory written with
    ``torch.distributed.checkpoint`` (default for FSDP) or one file (default otherwise).
    ``rng``: also save every rank's RNG state (restored by :func:`load_training_state`).
    """
    path = os.fspath(path)
    module = unwrap_model(model)
    if sharded is None:
        sharded = is_fsdp(model)
    meta = {"format": FORMAT, "version": VERSION, "layout": "sharded" if sharded else "full",
            "world_size": get_world_size(), "extra": dict(extra or {})}
    if sharded:
        _save_sharded(path, module, optimizer, meta, rng)
    else:
        _save_full(path, module, optimizer, meta, rng)
    logger.info("saved training state to %s (%s)", path, meta["layout"])


def load_training_state(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        *, strict: bool = True, rng: bool = True) -> Dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into ``model`` (and ``optimizer``) on every
    rank; collective. Either layout loads into any strategy. Returns the saved ``extra`` dict.

    ``rng``: restore this rank's RNG state (skipped, with a warning, when the world size changed:
    the draws of a different number of ranks cannot be continued).
    """
    path = os.fspath(path)
    module = unwrap_model(model)
    if os.path.isdir(path):
        meta = _load_sharded(path, module, optimizer, strict, rng)
    elif os.path.isfile(path) or get_rank() != 0:
        meta = _load_full(path, module, optimizer, strict, rng)
    else:
        raise CheckpointError(f"no training state at {path!r} (neither a file nor a directory)")
    logger.info("loaded training state from %s (%s)", path, meta["layout"])
    return meta["extra"]


# -- full: one file --------------------------------------------------------------------------------
def _gather_rng() -> Optional[List[Dict[str, Any]]]:
    state = rng_state()
    if not is_dist_avail_and_initialized():
        return [state]
    states: List[Any] = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def _save_full(path: str, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], meta: Dict[str, Any],
               rng: bool) -> None:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(module, options=options)
    optim_sd = get_optimizer_state_dict(module, optimizer, options=options) if optimizer is not None else None
    rng_states = _gather_rng() if rng else None
    if get_rank() == 0:
        payload = dict(meta, model=model_sd, optimizer=optim_sd, rng=rng_states)
        atomic_torch_save(payload, path)
    barrier()


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> Dict[str, Any]:
    from ..checkpoint import read_checkpoint
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a blip_fast training state (no format={FORMAT!r} entry); to load "
                              f"model weights only (e.g. an original BLIP checkpoint) use blip_fast.load_checkpoint")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer blip_fast (training-state version "
                              f"{payload['version']} > {VERSION}): upgrade blip_fast")
    return payload


def _load_full(path: str, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], strict: bool,
               rng: bool) -> Dict[str, Any]:
    distributed = is_dist_avail_and_initialized() and get_world_size() > 1
    payload: Dict[str, Any] = {}
    error: Optional[BaseException] = None
    if get_rank() == 0:
        try:
            payload = _read(path)
        except BaseException as exc:  # every rank must learn of it, not hang in the broadcast
            error = exc
    meta = {k: v for k, v in payload.items() if k not in ("model", "optimizer")}
    meta["has_optimizer"] = payload.get("optimizer") is not None
    if distributed:
        box = [meta if error is None else CheckpointError(f"rank 0 could not read {path}: {error}")]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], BaseException):
            raise error if error is not None else box[0]
        meta = box[0]
    elif error is not None:
        raise error
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointError(f"{path} holds no optimizer state; pass optimizer=None to load the model only")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=strict)
    set_model_state_dict(module, payload.get("model", {}), options=options)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, payload.get("optimizer") or {}, options=options)
    if rng and meta.get("rng") is not None and _same_world_size(meta, path):
        set_rng_state(meta["rng"][get_rank()])
    return meta


def _same_world_size(meta: Dict[str, Any], path: str) -> bool:
    if meta["world_size"] == get_world_size():
        return True
    logger.warning("%s was saved by %d rank(s), this run has %d: RNG states not restored", path,
                   meta["world_size"], get_world_size())
    return False


# -- sharded: torch.distributed.checkpoint directory --------------------------------------------
@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
        yield


def _save_sharded(path: str, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], meta: Dict[str, Any],
                  rng: bool) -> None:
    import torch.distributed.checkpoint as dcp

    tmp = path.rstrip("/") + ".tmp"
    if get_rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    state = {"model": get_model_state_dict(module)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(module, optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp, no_dist=not is_dist_avail_and_initialized())
    if rng:
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{get_rank()}.pt"))
    if get_rank() == 0:
        torch.save(dict(meta, has_optimizer=optimizer is not None, rng=rng), os.path.join(tmp, "extra.pt"))
    barrier()
    if get_rank() == 0:
        old = path.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        if os.path.exists(path):
            os.replace(path, old)  # a directory cannot replace a non-empty one: move it aside first
        os.replace(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    barrier()


def _load_sharded(path: str, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], strict: bool,
                  rng: bool) -> Dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    meta_path = os.path.join(path, "extra.pt")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is a directory without extra.pt: not a sharded blip_fast training state")
    meta = _read(meta_path)
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointError(f"{path} holds no optimizer state; pass optimizer=None to load the model only")
    state = {"model": get_model_state_dict(module)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(module, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=not is_dist_avail_and_initialized())
    options = StateDictOptions(strict=strict)
    set_model_state_dict(module, state["model"], options=options)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=options)
    rng_path = os.path.join(path, f"rng_rank{get_rank()}.pt")
    if rng and meta["rng"] and _same_world_size(meta, path):
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
    return meta
