"""Data-parallel training of the BLIP models on torch.distributed: DDP and FSDP2 wrapping,
gradient accumulation and clipping, and resumable training-state checkpoints.

Typical use under ``torchrun`` (see README "Multi-GPU training")::

    env = blip_fast.distributed.init_distributed()
    model = parallel.wrap_model(blip_fast.blip_pretrain(...), "ddp", env.device, mixed_precision="bf16")
    with parallel.autocast(env.device, "bf16"):
        loss = sum(model(image, text, alpha=0.4))
    loss.backward()
    parallel.clip_grad_norm_(model, 1.0)
    parallel.save_training_state("ckpt.pt", model, optimizer, {"step": step})
"""
from ._common import STRATEGIES, autocast, is_fsdp, strategy_of, unwrap_model
from .fsdp import apply_fsdp, shard_plan
from .grads import clip_grad_norm_, grad_sync
from .state import atomic_torch_save, load_training_state, save_training_state
from .wrap import sync_module_state, wrap_model

__all__ = [
    "STRATEGIES", "wrap_model", "unwrap_model", "strategy_of", "is_fsdp", "autocast", "apply_fsdp", "shard_plan",
    "sync_module_state", "grad_sync", "clip_grad_norm_", "save_training_state", "load_training_state",
    "atomic_torch_save",
]
