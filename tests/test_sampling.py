"""The training batches a run sees depend on (seed, epoch, step) only: not on how many loader
worker processes there are, nor on where in the epoch a resumed run starts."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from s2hpruner.app.sampling import EpochSampler, train_loader


class RandomlyAugmented(Dataset):
    """Sample i is i plus noise from the global RNG, as torchvision's random transforms draw."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int):
        return torch.full((3,), float(i)) + torch.rand(3), i


def batches(workers: int, epoch: int = 1, start_batch: int = 0) -> list[torch.Tensor]:
    sampler = EpochSampler(48, seed=7, batch_size=4)
    loader = train_loader(RandomlyAugmented(), sampler, workers)
    sampler.epoch, sampler.start_batch = epoch, start_batch
    loader.generator.manual_seed(epoch)  # as the run re-seeds it every epoch
    return [x for x, _ in loader]


def test_worker_processes_see_the_same_augmented_batches_whatever_their_number():
    one, two = batches(workers=1), batches(workers=2)
    assert len(one) == 12 and all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    # resumed mid-epoch: the rest of the epoch as an uninterrupted run saw it
    rest = batches(workers=2, start_batch=5)
    assert all(torch.equal(a, b) for a, b in zip(one[5:], rest, strict=True))
    # the noise is still random: other epochs, other samples and other seeds differ
    other = batches(workers=2, epoch=2)
    assert not any(torch.equal(a.frac(), b.frac()) for a, b in zip(one, other, strict=True))
    assert len({tuple(x.frac().flatten().tolist()) for x in one}) == 12


def test_in_the_main_process_augmentation_keeps_drawing_from_the_global_rng():
    """``--workers 0`` (the default) is unchanged: its stream is in the checkpoint's RNG
    state, so the stored benchmark runs still reproduce."""
    torch.manual_seed(3)
    first = batches(workers=0)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, batches(workers=0), strict=True))
    torch.manual_seed(4)
    assert not torch.equal(first[0], batches(workers=0)[0])
