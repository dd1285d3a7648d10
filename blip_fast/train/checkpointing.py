"""Job checkpoints: written atomically, read with ``weights_only=True``.

A job checkpoint is a dict with the original BLIP keys (``model``: the BLIP_Pretrain state dict,
momentum encoders and queues included; ``optimizer``; ``config``; ``epoch``: the last completed
epoch, -1 before the first ends) and the job's own: ``position`` (where to continue: epoch, batch
within it, global step), ``rng`` (each rank's generator states), ``world_size``, ``stats``.
``blip_fast.load_checkpoint`` and the original BLIP loaders read its ``model`` as any BLIP
checkpoint.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Dict, Optional

import torch

from ..checkpoint import read_checkpoint

logger = logging.getLogger("blip_fast.train")

FORMAT = "blip_fast.pretrain/1"
LAST = "checkpoint_last.pth"


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``: a
    reader (or a resumed run after a crash) sees the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """``--resume`` value -> checkpoint path. ``''``: none; ``'last'``: ``output_dir``'s
    checkpoint_last.pth (must exist); ``'auto'``: it if it exists, else None; else a path."""
    if not resume:
        return None
    last = os.path.join(output_dir, LAST)
    if resume == "auto":
        return last if os.path.isfile(last) else None
    if resume == "last":
        if not os.path.isfile(last):
            raise FileNotFoundError(f"--resume: no {LAST} in {output_dir!r}; pass a checkpoint path, or "
                                    f"--resume auto to start fresh when there is none")
        return last
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
    return resume


def read_job_checkpoint(path: str) -> Dict[str, Any]:
    """A job checkpoint, memory-mapped (tensors are read as they are copied into the model)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: let the general reader explain
        ckpt = read_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a blip_fast pretraining checkpoint (format {ckpt.get('format')!r}); "
                         f"to start from a BLIP checkpoint's weights use pretrained={path} instead of --resume")
    return ckpt
