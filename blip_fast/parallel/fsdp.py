"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the BLIP models.

The sharding plan, innermost first:

1. every transformer block (ViT ``Block``, MED ``BertLayer``) is a unit. Blocks that share
   parameters go into one unit: BLIP ties each decoder layer to the encoder layer of the same
   index (everything but the self-attention), so ``text_encoder.encoder.layer[i]`` and
   ``text_decoder.bert.encoder.layer[i]`` are sharded together (``fully_shard([enc_i, dec_i])``)
   and their shared tensors stay one tensor;
2. every tower (``VisionTransformer``, ``BertModel``, ``BertLMHeadModel``) takes what its blocks
   left (patch/position/word embeddings, final norms, the LM head); towers that share parameters
   (the text encoder and decoder share the embeddings, which the LM head's output layer also
   uses) form one unit;
3. the root takes the rest (projections, ITM head). Scalar parameters (``temp``), which
   ``fully_shard`` cannot shard, stay replicated: their gradient is averaged over ranks by a hook.

Frozen units (the momentum encoders run under ``no_grad`` only) always reshard after forward.
:class:`~blip_fast.models.BLIP_Pretrain`'s in-place parameter updates (temperature clamp, momentum
update) run in a hook before FSDP gathers anything, on each rank's shards; parameters updated
through gathered copies would be lost when FSDP frees them.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Dict, List, Optional, Sequence, Set

import torch
import torch.distributed as dist
import torch.nn as nn

from ..distributed import get_world_size
from ..models.med import BertLayer, BertLMHeadModel, BertModel
from ..models.vit import Block, VisionTransformer

BLOCK_TYPES = (Block, BertLayer)
TOWER_TYPES = (VisionTransformer, BertModel, BertLMHeadModel)


def _fsdp_api():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"strategy='fsdp' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is "
                           f"torch {torch.__version__}: upgrade torch or use strategy='ddp'") from exc
    return fully_shard, MixedPrecisionPolicy, FSDPModule


def group_by_shared_params(modules: Sequence[nn.Module], exclude: Set[int] = frozenset()) -> List[List[nn.Module]]:
    """Partition ``modules`` so that modules sharing a parameter (by identity, ignoring the ids in
    ``exclude``) are in one group; groups keep the order of their first module."""
    parent = list(range(len(modules)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: Dict[int, int] = {}
    for i, module in enumerate(modules):
        for p in module.parameters():
            if id(p) in exclude:
                continue
            j = owner.setdefault(id(p), i)
            if j != i:
                parent[find(i)] = find(j)
    groups: Dict[int, List[nn.Module]] = {}
    for i, module in enumerate(modules):
        groups.setdefault(find(i), []).append(module)
    return list(groups.values())


def _outermost(modules: List[nn.Module]) -> List[nn.Module]:
    inner = {id(child) for m in modules for child in m.modules() if child is not m}
    return [m for m in modules if id(m) not in inner]


def _trainable(modules: Sequence[nn.Module]) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def shard_plan(model: nn.Module) -> List[List[nn.Module]]:
    """The FSDP units of ``model`` below the root, innermost first (each a list of modules sharded
    together). See the module docstring."""
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    units = group_by_shared_params(blocks)
    in_blocks = {id(p) for m in blocks for p in m.parameters()}
    towers = _outermost([m for m in model.modules() if isinstance(m, TOWER_TYPES) and m is not model])
    units += group_by_shared_params(towers, exclude=in_blocks)
    return units


def scalar_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() == 0]


def _average_grad_hook(param: torch.Tensor) -> None:
    # A replicated parameter's gradient, averaged like FSDP's reduce-scatter does for the others.
    # Re-averaging an already averaged part during accumulation changes nothing (it is equal on
    # every rank), so this is right with and without gradient sync.
    dist.all_reduce(param.grad)
    param.grad.div_(get_world_size())


def _pre_forward_updates_hook(module: nn.Module, args, kwargs) -> None:
    _, _, FSDPModule = _fsdp_api()
    # A forward without backward (evaluation) can leave units gathered; the updates must see shards.
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    module.pre_forward_updates()


def apply_fsdp(model: nn.Module, mixed_precision: Optional[torch.dtype] = None,
               reshard_after_forward: bool = True, forward_prefetch: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2 following :func:`shard_plan`; returns it (now also an
    ``FSDPModule``). Parameters must already be on their device and equal on every rank.

    ``mixed_precision``: parameter dtype for compute and all-gathers (e.g. ``torch.bfloat16``);
    gradients are reduced in float32 and the sharded master weights stay float32.
    ``reshard_after_forward``: for trainable units (False keeps them gathered from forward to
    backward: more memory, fewer all-gathers). ``forward_prefetch``: each block's all-gather is
    issued when the previous block of its tower starts (overlaps communication with compute).
    """
    fully_shard, MixedPrecisionPolicy, FSDPModule = _fsdp_api()
    # BertLayer returns its self-attention keys/values (views, kept for cached decoding); nothing
    # modifies them in place, so FSDP's warning about view outputs does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    mp_policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    scalars = scalar_params(model)
    kwargs = {"mp_policy": mp_policy}
    if scalars:
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise RuntimeError(f"this torch ({torch.__version__}) has no fully_shard(ignored_params=...), needed "
                               f"for the model's scalar parameters (temp): upgrade torch or use strategy='ddp'")
        kwargs["ignored_params"] = set(scalars)
    units = shard_plan(model)
    for unit in units:
        reshard = reshard_after_forward if _trainable(unit) else True
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=reshard, **kwargs)
    fully_shard(model, **kwargs)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad_hook)
    if forward_prefetch:
        _chain_forward_prefetch(model)
    if hasattr(model, "pre_forward_updates") and hasattr(model, "param_updates_in_forward"):
        model.param_updates_in_forward = False
        model.register_forward_pre_hook(_pre_forward_updates_hook, prepend=True, with_kwargs=True)
    assert isinstance(model, FSDPModule)
    return model


def _chain_forward_prefetch(model: nn.Module) -> None:
    """Within each ViT, prefetch block i+1's parameters when block i starts its forward."""
    for vit in (m for m in model.modules() if isinstance(m, VisionTransformer)):
        blocks = list(vit.blocks)
        for current, following in zip(blocks, blocks[1:]):
            if hasattr(current, "set_modules_to_forward_prefetch"):
                current.set_modules_to_forward_prefetch([following])
