"""Data order of a run: seeded, sharded over ranks, and resumable mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core import distributed as D


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded over ranks, that can start mid-epoch.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, size: int, seed: int, batch_size: int):
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.epoch, self.start_batch = 0, 0

    def order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=gen)
        world = D.world_size()
        usable = (self.size // (world * self.batch_size)) * world * self.batch_size
        return perm[:usable][D.rank() :: world].tolist()

    def __iter__(self):
        return iter(self.order()[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return len(self.order()) - self.start_batch * self.batch_size


class ShardSampler(Sampler[int]):
    """Every index exactly once over all ranks (DistributedSampler pads the last shard with
    repeated samples, which the reduced accuracy would count twice)."""

    def __init__(self, size: int):
        self.indices = list(range(size))[D.rank() :: D.world_size()]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: Dataset, sampler: EpochSampler, workers: int) -> DataLoader:
    """Batches in the sampler's order. The loader has its own generator (re-seeded every
    epoch by the run): every new iterator draws the workers' base seed from it, which would
    otherwise advance the global RNG between a mid-epoch checkpoint and the resumed run's
    first batch (augmentation draws from the global RNG)."""
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        generator=torch.Generator(),
    )


def eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """Every image once, sharded over ranks when distributed."""
    sampler = ShardSampler(len(dataset)) if D.is_distributed() else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
