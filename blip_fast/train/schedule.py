"""BLIP's optimiser and schedules (``utils.py`` and ``pretrain.py`` of the original).

* AdamW over the trainable parameters, one group, ``lr=init_lr``, ``weight_decay`` for all.
* Learning rate: at the start of every epoch ``step_lr_schedule`` sets
  ``max(min_lr, init_lr * lr_decay_rate ** epoch)``; during epoch 0 ``warmup_lr_schedule`` then sets
  ``min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)`` before each step ``i``.
* Distillation weight: ``alpha * min(1, (epoch * steps_per_epoch + i) / (ramp_epochs * steps_per_epoch))``
  (``ramp_epochs = 2`` in BLIP's pretrain.py).

Both are pure functions of ``(epoch, i)``, which is what makes resuming exact.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .config import PretrainConfig


def warmup_lr(step: int, max_step: int, init_lr: float, max_lr: float) -> float:
    """The original ``warmup_lr_schedule``'s value."""
    return min(max_lr, init_lr + (max_lr - init_lr) * step / max_step)


def step_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    """The original ``step_lr_schedule``'s value."""
    return max(min_lr, init_lr * (decay_rate ** epoch))


def lr_at(cfg: PretrainConfig, epoch: int, i: int) -> float:
    """Learning rate of step ``i`` (0-based, within the epoch) of ``epoch``."""
    if epoch == 0:
        return warmup_lr(i, cfg.warmup_steps, cfg.warmup_lr, cfg.init_lr)
    return step_lr(epoch, cfg.init_lr, cfg.min_lr, cfg.lr_decay_rate)


def alpha_at(cfg: PretrainConfig, epoch: int, i: int, steps_per_epoch: int) -> float:
    """ITC distillation weight of step ``i`` of ``epoch`` (ramped up over ``alpha_ramp_epochs``)."""
    if cfg.alpha_ramp_epochs <= 0:
        return cfg.alpha
    return cfg.alpha * min(1.0, (epoch * steps_per_epoch + i) / (cfg.alpha_ramp_epochs * steps_per_epoch))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: PretrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW as the original (betas 0.9/0.999, eps 1e-8); the fused kernel on CUDA."""
    params = [p for p in params if p.requires_grad]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=cfg.init_lr, weight_decay=cfg.weight_decay, **kwargs)
