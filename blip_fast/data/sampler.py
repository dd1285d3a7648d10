"""Batch order as a function of (seed, epoch): shuffled, sharded across ranks, resumable."""
from __future__ import annotations

from typing import Iterator, List

import numpy as np
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[List[int]]):
    """Yields this rank's batches of dataset indices for one epoch.

    The epoch's order is a permutation drawn from ``(seed, epoch)`` (identity when ``shuffle`` is
    off), padded by wrapping to a multiple of ``world_size`` and dealt to ranks round-robin, as
    ``DistributedSampler`` does; each rank keeps ``len(order) // world_size // batch_size`` full
    batches (``drop_last``, as BLIP's training loader). ``set_epoch(epoch, start_batch)`` selects the
    epoch and skips its first ``start_batch`` batches (to resume mid-epoch).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.world_size, self.rank, self.shuffle = int(world_size), int(rank), shuffle
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples make no full batch of {batch_size} per rank on {world_size} rank(s): "
                f"lower batch_size or add data")

    @property
    def batches_per_epoch(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)
        return per_rank // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def rank_indices(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = -(-self.num_samples // self.world_size) * self.world_size
        if total > self.num_samples:
            order = np.concatenate([order, order[: total - self.num_samples]])
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        indices = self.rank_indices()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield indices[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch
