"""Train blip_fast's VisionTextDualEncoder on synthetic image-caption data; print loss and throughput.

Two data sources:

- ``--data shapes`` (default): the built-in synthetic dataset of ``blip-fast pretrain``
  (:class:`blip_fast.data.SyntheticShapes`: rendered scenes of coloured shapes with captions that
  describe them), rendered and tokenised in data-loader workers; retrieval is measured on its
  held-out split (distinct captions).
- ``--data patterns`` (:class:`PairedPatterns`): each of ``num_classes`` classes has a fixed
  caption (random word-piece ids) and a fixed low-frequency image pattern; a sample is the pattern
  plus noise. No tokenizer needed; the test suite uses it.

In both the contrastive loss falls from about ``ln(batch)`` only by learning to match the two.

CPU, tiny (seconds)::

    python examples/train_dual_encoder.py --size tiny --steps 120

One GPU, ViT-B/16 224 + BERT-base, bf16 autocast on the fast backends, with a short run on the
``reference`` backend for the speed ratio::

    PYTHONPATH=. python examples/train_dual_encoder.py --size base --device cuda --dtype bf16 \\
        --batch-size 128 --steps 300 --compare-backend reference --out "$OUT"
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout

import blip_fast  # noqa: E402
from blip_fast.models import VisionTextDualEncoder  # noqa: E402
from blip_fast.ops import _dispatch  # noqa: E402

Tensor = torch.Tensor

_TINY_MED = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 30524, "max_position_embeddings": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
             "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12, "initializer_range": 0.02,
             "pad_token_id": 0}
SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(vit={"embed_dim": 32, "depth": 2, "num_heads": 2}, image_size=32, med_config=_TINY_MED,
                 projection_dim=16),
    "small": dict(vit={"embed_dim": 192, "depth": 6, "num_heads": 3}, image_size=96,
                  med_config=dict(_TINY_MED, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                  intermediate_size=768), projection_dim=128),
    "base": dict(vit="base", image_size=224, med_config="med_config.json", projection_dim=256),
}


class PairedPatterns:
    """Images ``(B, 3, S, S)`` float32 and captions ``(B, L)`` int64 ids + 0/1 mask for B distinct
    classes. Captions start with ``[CLS]`` (101), end with ``[SEP]`` (102) and have
    ``min_length..caption_length`` tokens (zero padding after)."""

    def __init__(self, num_classes: int, image_size: int, caption_length: int = 8, min_length: Optional[int] = None,
                 noise: float = 0.5, device: str = "cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.image_size, self.noise, self.device = num_classes, image_size, noise, device
        self.patterns = torch.randn(num_classes, 3, 4, 4, generator=g).to(device)
        ids = torch.randint(1000, 30000, (num_classes, caption_length), generator=g)
        lengths = torch.randint(min_length or caption_length, caption_length + 1, (num_classes,), generator=g)
        positions = torch.arange(caption_length)
        ids[:, 0] = 101
        ids[positions.expand(num_classes, -1) == (lengths - 1)[:, None]] = 102
        mask = (positions[None] < lengths[:, None]).long()
        self.input_ids, self.attention_mask = (ids * mask).to(device), mask.to(device)
        self.generator = g  # class draws, on the host
        self.noise_generator = torch.Generator(device=device).manual_seed(seed)  # noise, where the images are

    def sample(self, batch: int, classes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        if batch > self.num_classes:
            raise ValueError(f"a batch of {batch} distinct classes needs num_classes >= {batch}")
        if classes is None:
            classes = torch.randperm(self.num_classes, generator=self.generator)[:batch]
        classes = classes.to(self.device)
        size = (self.image_size, self.image_size)
        images = F.interpolate(self.patterns[classes], size=size, mode="bilinear", align_corners=False)
        noise = torch.randn(images.shape, generator=self.noise_generator, device=self.device)
        return images + self.noise * noise, self.input_ids[classes], self.attention_mask[classes]


class SceneBatches:
    """Batches of :class:`blip_fast.data.SyntheticShapes` scenes: ``sample(batch)`` returns
    normalised images ``(B, 3, S, S)`` float32 and captions ``(B, 30)`` ids + mask on ``device``.

    Scenes are rendered and captions tokenised in ``workers`` data-loader processes (the job's
    pipeline: :class:`TransformedDataset`, :class:`EpochBatchSampler`, :class:`ImageTextCollator`),
    epoch after epoch. The batch size is fixed by the first ``sample`` call.
    """

    def __init__(self, train_size: int, image_size: int, device: str = "cpu", seed: int = 0, workers: int = 0,
                 eval_size: int = 256, max_objects: int = 2):
        from blip_fast.data import EpochBatchSampler, ImageTextCollator, SyntheticShapes, TransformedDataset
        from blip_fast.tokenizer import init_tokenizer
        self.device, self.seed, self.workers = device, seed, workers
        self.tokenizer = init_tokenizer()
        self.dataset = TransformedDataset(SyntheticShapes(train_size, image_size, seed=seed, max_objects=max_objects),
                                          None, seed=seed)
        self.val = SyntheticShapes(eval_size, image_size, seed=seed, split="val", max_objects=max_objects)
        self._sampler_cls, self._collate = EpochBatchSampler, ImageTextCollator(self.tokenizer, 30)
        self._batches, self._batch_size, self._epoch = None, None, 0

    def _loader(self, batch: int):
        sampler = self._sampler_cls(len(self.dataset), batch, self.seed)
        self.dataset.set_epoch(self._epoch)
        sampler.set_epoch(self._epoch)
        self._epoch += 1
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                                                collate_fn=self._collate, pin_memory=self.device != "cpu"))

    def _to_device(self, images: Tensor, text) -> Tuple[Tensor, Tensor, Tensor]:
        from blip_fast.data import normalize_images
        images = normalize_images(images.to(self.device, non_blocking=True))
        return (images, text.input_ids.to(self.device, non_blocking=True),
                text.attention_mask.to(self.device, non_blocking=True))

    def sample(self, batch: int) -> Tuple[Tensor, Tensor, Tensor]:
        if self._batch_size not in (None, batch):
            raise ValueError(f"SceneBatches serves one batch size ({self._batch_size}); got {batch}")
        self._batch_size = batch
        while True:
            if self._batches is None:
                self._batches = self._loader(batch)
            try:
                b = next(self._batches)
                return self._to_device(b.images, b.text)
            except StopIteration:
                self._batches = None

    def held_out(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The held-out split: every scene once, with its distinct canonical caption."""
        from blip_fast.data.base import sample_rng
        from blip_fast.tokenizer import tokenize
        images = torch.stack([self.val.load(i, sample_rng(self.seed, 0, i))[0] for i in range(len(self.val))])
        text = tokenize(self.tokenizer, self.val.captions(), padding="max_length", max_length=30)
        return self._to_device(images, text)


@contextlib.contextmanager
def record_backends(counts: Dict[str, collections.Counter]):
    """Count which backend ``auto`` (or the selection) resolves each op to."""
    original = _dispatch.resolve

    def resolve(op: str, *args: Any, **kwargs: Any):
        name, fn = original(op, *args, **kwargs)
        counts.setdefault(op, collections.Counter())[name] += 1
        return name, fn

    _dispatch.resolve = resolve
    try:
        yield counts
    finally:
        _dispatch.resolve = original


def build(size: str, seed: int = 0, **overrides: Any) -> VisionTextDualEncoder:
    torch.manual_seed(seed)
    return VisionTextDualEncoder(**dict(SIZES[size], **overrides))


def train(model: VisionTextDualEncoder, data: Union[PairedPatterns, SceneBatches], steps: int, batch_size: int, lr: float,
          warmup: int = 0, weight_decay: float = 0.0, dtype: Optional[torch.dtype] = None, backend: str = "auto",
          log_every: int = 0, timed_after: int = 5) -> Dict[str, Any]:
    """AdamW with linear warm-up and cosine decay; returns losses, step times and what ran."""
    device = torch.device(data.device)
    if isinstance(data, SceneBatches):
        data.sample(batch_size)  # starting the workers stays out of the timings
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup)))))
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32)
                else contextlib.nullcontext())
    losses: List[float] = []
    times: List[float] = []
    used: Dict[str, collections.Counter] = {}
    with blip_fast.use_backend(backend):
        for step in range(steps):
            images, ids, mask = data.sample(batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with record_backends(used) if step == 0 else contextlib.nullcontext(), autocast:
                loss = model(images, ids, mask, return_loss=True).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"  step {step:4d}  loss {losses[-1]:.4f}  logit scale {model.logit_scale.exp().item():6.2f}  "
                      f"{batch_size / times[-1]:8.1f} img/s", flush=True)
    timed = times[timed_after:] or times
    return {"losses": losses, "step_time_median_s": statistics.median(timed),
            "img_per_s": batch_size / statistics.median(timed),
            "backends": {op: dict(c) for op, c in used.items()}}


def retrieval_accuracy(model: VisionTextDualEncoder, data: Union[PairedPatterns, SceneBatches],
                       dtype: Optional[torch.dtype] = None, classes: int = 256) -> float:
    """Top-1 image->text accuracy over ``classes`` distinct classes or held-out scenes (chance:
    1 / their number)."""
    if isinstance(data, SceneBatches):
        images, ids, mask = data.held_out()
        n = images.shape[0]
    else:
        n = min(classes, data.num_classes)
        images, ids, mask = data.sample(n, classes=torch.arange(n))
    model.eval()
    autocast = (torch.autocast(images.device.type, dtype=dtype) if dtype not in (None, torch.float32)
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        logits = model(images, ids, mask).logits_per_image
    model.train()
    return (logits.argmax(dim=1) == torch.arange(n, device=logits.device)).float().mean().item()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--data", choices=["shapes", "patterns"], default="shapes")
    parser.add_argument("--train-size", type=int, default=20000, help="shapes: training scenes")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="shapes: loader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3 tiny, 5e-4 small, 3e-4 base")
    parser.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 2 x batch size")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--compare-backend", default=None, help="also time this backend (e.g. reference)")
    parser.add_argument("--compare-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args(argv)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lr = args.lr or {"tiny": 2e-3, "small": 5e-4, "base": 3e-4}[args.size]
    warmup = args.steps // 10 if args.warmup is None else args.warmup
    num_classes = args.num_classes or 2 * args.batch_size
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    model = build(args.size, args.seed)
    image_size = model.vision_model.patch_embed.img_size[0]
    if args.data == "shapes":
        data = SceneBatches(args.train_size, image_size, device=args.device, seed=args.seed + 1, workers=args.workers)
        held_out = len(data.val)
    else:
        data = PairedPatterns(num_classes, image_size, caption_length=20 if args.size != "tiny" else 8,
                              min_length=8 if args.size != "tiny" else None, device=args.device, seed=args.seed + 1)
        held_out = min(256, num_classes)
    params = sum(p.numel() for p in model.parameters())
    print(f"dual encoder {args.size}: {params / 1e6:.1f}M parameters, batch {args.batch_size}, {args.dtype}, "
          f"{args.device} ({device_name}), torch {torch.__version__}, backend {args.backend}")
    print(f"chance loss ln({args.batch_size}) = {math.log(args.batch_size):.3f}")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train(model, data, args.steps, args.batch_size, lr, warmup, weight_decay=0.05 if args.size != "tiny"
                   else 0.0, dtype=dtype, backend=args.backend, log_every=max(1, args.steps // 15))
    result["retrieval_top1"] = retrieval_accuracy(model, data, dtype)
    if args.device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    losses = result["losses"]
    k = max(1, min(10, len(losses) // 4))
    result.update(first_loss=sum(losses[:k]) / k, last_loss=sum(losses[-k:]) / k)
    print(f"loss {result['first_loss']:.3f} (first {k} steps) -> {result['last_loss']:.3f} (last {k}); retrieval "
          f"top-1 {result['retrieval_top1']:.3f} over {held_out} {'held-out scenes' if args.data == 'shapes' else 'classes'}; {result['img_per_s']:.1f} img/s "
          f"(median step {1e3 * result['step_time_median_s']:.1f} ms)")
    print("ops ran on:", result["backends"])
    if args.compare_backend:
        other = build(args.size, args.seed)
        compare = train(other, data, args.compare_steps, args.batch_size, lr, warmup, dtype=dtype,
                        backend=args.compare_backend)
        result["compare"] = {"backend": args.compare_backend, "img_per_s": compare["img_per_s"],
                             "speedup": result["img_per_s"] / compare["img_per_s"], "backends": compare["backends"]}
        print(f"{args.compare_backend}: {compare['img_per_s']:.1f} img/s -> {args.backend} is "
              f"{result['compare']['speedup']:.2f}x")
    result.update(config=vars(args), lr=lr, warmup=warmup, num_classes=num_classes, parameters=params,
                  device_name=device_name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "dual_encoder_train.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
