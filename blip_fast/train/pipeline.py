"""From a config to the training data loader and the held-out retrieval set."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from ..data import (EpochBatchSampler, ImageTextCollator, ImageTextSource, JsonImageText, PretrainTransform,
                    SyntheticShapes, TarShards, TransformedDataset)
from ..evaluation.retrieval import RetrievalSet, retrieval_set_from_json, retrieval_set_synthetic
from .config import PretrainConfig
from .runtime import Runtime

logger = logging.getLogger("blip_fast.train")

CAPTION_LENGTH = 30  # BLIP_Pretrain pads/truncates captions to 30 tokens


def build_source(cfg: PretrainConfig) -> ImageTextSource:
    if cfg.dataset == "synthetic":
        syn = cfg.synthetic
        return SyntheticShapes(int(syn.get("train_size", 100000)), cfg.image_size, seed=cfg.seed, split="train",
                               max_objects=int(syn.get("max_objects", 2)))
    if cfg.dataset == "shards":
        return TarShards(cfg.train_shards)
    return JsonImageText(cfg.train_file, cfg.image_root, cfg.laion_path)


class TrainData:
    """The training dataset, its resumable sampler and a loader per epoch.

    Batch order: a function of ``(seed, epoch)``; augmentation: of ``(seed, epoch, index)``; the
    loader's own generator is seeded from ``(seed, epoch)`` so that creating it never draws from the
    global torch generator (which dropout and hard-negative sampling use).
    """

    def __init__(self, cfg: PretrainConfig, tokenizer: Any, rt: Runtime):
        self.cfg = cfg
        self.source = build_source(cfg)
        transform = None if self.source.renders_tensors else PretrainTransform(
            cfg.image_size, cfg.min_scale, augment=cfg.randaugment)
        self.dataset = TransformedDataset(self.source, transform, seed=cfg.seed, max_words=cfg.max_words)
        self.sampler = EpochBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, rt.world_size, rt.rank)
        self.collate = ImageTextCollator(tokenizer, CAPTION_LENGTH)
        self.pin_memory = rt.device.type == "cuda"
        self.rt = rt
        logger.info("training data: %s; transform: %s", self.source.describe(), transform or "none (rendered)")

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def loader(self, epoch: int, start_batch: int = 0) -> DataLoader:
        self.dataset.set_epoch(epoch)
        if len(self.dataset) != self.sampler.num_samples:  # laion_path: another file each epoch
            self.sampler = EpochBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed,
                                             self.rt.world_size, self.rt.rank)
        self.sampler.set_epoch(epoch, start_batch)
        workers = max(0, int(self.cfg.num_workers))
        kwargs = {"prefetch_factor": self.cfg.prefetch_factor} if workers > 0 else {}
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=self.collate,
                          pin_memory=self.pin_memory, persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch), **kwargs)


def build_eval_set(cfg: PretrainConfig) -> Optional[RetrievalSet]:
    """The held-out retrieval set: ``eval_file``, else the synthetic held-out split, else None."""
    if cfg.eval_every_epochs <= 0:
        return None
    if cfg.eval_file:
        return retrieval_set_from_json(cfg.eval_file, cfg.image_root, cfg.image_size, cfg.max_words)
    if cfg.dataset == "synthetic" and int(cfg.synthetic.get("eval_size", 0)) > 0:
        return retrieval_set_synthetic(int(cfg.synthetic["eval_size"]), cfg.image_size, cfg.seed,
                                       int(cfg.synthetic.get("max_objects", 2)))
    return None
