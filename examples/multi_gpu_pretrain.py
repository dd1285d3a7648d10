"""BLIP pretraining on several GPUs (or CPU processes) with torchrun: DDP or FSDP2, bf16, gradient
accumulation, clipping, per-rank data sharding and seeding, checkpoint and resume.

Synthetic data (random images, random pre-tokenised captions) stands in for a real dataset::

    torchrun --standalone --nproc_per_node=4 examples/multi_gpu_pretrain.py --strategy ddp
    torchrun --standalone --nproc_per_node=2 examples/multi_gpu_pretrain.py --device cpu --tiny --steps 4
    python examples/multi_gpu_pretrain.py --device cpu --tiny --steps 4        # one process, same script

Run it again with the same ``--ckpt`` and a larger ``--steps``: it resumes where the last run stopped.
"""
import argparse
import logging
import os

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import blip_fast
from blip_fast import distributed as bdist
from blip_fast import parallel
from blip_fast.tokenizer import TokenizedText

logger = logging.getLogger("pretrain")
TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_MED = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "vocab_size": 30524, "encoder_width": 64, "add_cross_attention": True, "max_position_embeddings": 64,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0}


def synthetic_dataset(n: int, image_size: int, length: int = 30) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (n, length), generator=g)
    lengths = torch.randint(10, length, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(n), lengths - 1] = 102
    return TensorDataset(torch.randn(n, 3, image_size, image_size, generator=g), ids * mask, mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "none"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU)")
    p.add_argument("--batch", type=int, default=4, help="images per rank per micro-step")
    p.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps in total")
    p.add_argument("--ckpt", default="ckpt_example", help="training-state path (resumed when present)")
    args = p.parse_args()

    env = bdist.init_distributed(args.device)
    bdist.setup_logging()
    strategy = args.strategy if env.distributed else "none"
    mixed_precision = "bf16" if env.device.type == "cuda" else None
    image_size = 64 if args.tiny else 224

    bdist.seed_everything(0, per_rank=False)  # identical initial weights and queues on every rank
    model = blip_fast.blip_pretrain(image_size=image_size, queue_size=1024 if args.tiny else 57600,
                                    **({"vit": TINY_VIT, "med_config": TINY_MED} if args.tiny else {}))
    model = parallel.wrap_model(model, strategy, env.device, mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    start = 0
    ckpt = args.ckpt + ("" if strategy == "fsdp" else ".pt")
    if os.path.exists(ckpt):
        extra = parallel.load_training_state(ckpt, model, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        start = extra["step"]
        bdist.log_rank0(logger, "resumed from %s at step %d", ckpt, start)
    else:
        bdist.seed_everything(0)  # per rank: dropout masks and hard-negative draws differ across ranks

    dataset = synthetic_dataset(args.batch * args.accum * env.world_size * max(args.steps, 1), image_size)
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, drop_last=True)
    batches = iter(loader)
    for step in range(start, args.steps):
        sampler.set_epoch(step)  # a real loop sets the epoch once per pass over the data
        for micro in range(args.accum):
            try:
                image, ids, mask = next(batches)
            except StopIteration:
                batches = iter(loader)
                image, ids, mask = next(batches)
            text = TokenizedText(ids.to(env.device), mask.to(env.device))
            with parallel.grad_sync(model, enabled=micro == args.accum - 1):
                with parallel.autocast(env.device, mixed_precision):
                    loss_ita, loss_itm, loss_lm = model(image.to(env.device), text, alpha=0.4)
                ((loss_ita + loss_itm + loss_lm) / args.accum).backward()
        grad_norm = parallel.clip_grad_norm_(model, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bdist.log_rank0(logger, "step %d: ita %.3f itm %.3f lm %.3f grad-norm %.3f", step, loss_ita.item(),
                        loss_itm.item(), loss_lm.item(), grad_norm.item())
    parallel.save_training_state(ckpt, model, optimizer, {"step": args.steps, "scheduler": scheduler.state_dict()})
    bdist.log_rank0(logger, "saved %s", ckpt)
    bdist.destroy_distributed()


if __name__ == "__main__":
    main()
