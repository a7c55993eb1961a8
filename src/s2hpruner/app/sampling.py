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


class KeyedSampler(Sampler[tuple[int, int, int]]):
    """The sampler's indices as ``(seed, epoch, index)`` keys for :class:`SeededSamples`."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self):
        seed, epoch = self.sampler.seed, self.sampler.epoch  # the epoch this iterator walks
        return ((seed, epoch, i) for i in iter(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """Each sample's random augmentation drawn from a generator seeded by its own key
    ``(seed, epoch, index)``: worker processes otherwise draw from per-worker streams, so a
    sample's crop would depend on which worker loaded it, how many there are and how many
    samples that worker loaded before (a run resumed mid-epoch would see other crops)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]):
        seed, epoch, index = key
        with torch.random.fork_rng(devices=[]):  # the CPU generator, which transforms draw
            # from (torch.manual_seed would also queue CUDA seeding: 10x the cost per sample)
            torch.default_generator.manual_seed(
                ((seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63)
            return self.dataset[index]


def train_loader(dataset: Dataset, sampler: EpochSampler, workers: int) -> DataLoader:
    """Batches in the sampler's order. In the main process (``workers`` 0) augmentation draws
    from the global RNG, which checkpoints save; the loader has its own generator (re-seeded
    every epoch by the run) because every new iterator draws the workers' base seed from it,
    which would otherwise advance the global RNG between a mid-epoch checkpoint and the
    resumed run's first batch. With worker processes every sample is seeded by its key
    (:class:`SeededSamples`): the batches do not depend on the number of workers, and a run
    resumed mid-epoch sees the same ones."""
    batch_size = sampler.batch_size
    if workers > 0:
        dataset, sampler = SeededSamples(dataset), KeyedSampler(sampler)
    return DataLoader(
        dataset,
        batch_size=batch_size,
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
