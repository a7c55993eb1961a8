"""A user's per-module train/eval modes survive everything the library does for a moment in
eval mode (tracing, counting, evaluating), and the physically pruned network follows them:
a frozen backbone's BatchNorm (``model.backbone.eval()`` in a training model) stays frozen."""

from __future__ import annotations

import torch
from torch import nn

from s2hpruner import S2HPruner, S2HTrainer, count_flops
from s2hpruner.core.trainer import evaluate


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(self.backbone(x)))


def frozen_backbone() -> tuple[Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().train()
    model.backbone.eval()  # the user's frozen BatchNorm
    return model, torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_building_counting_and_evaluating_keep_each_modules_mode():
    model, x, y = frozen_backbone()
    before = modes(model)
    pruner = S2HPruner(model, x[:1], target_flops=0.5)
    assert modes(model) == before
    count_flops(model, x[:1])
    assert modes(model) == before
    evaluate(model, [(x, y)], "cpu", pruner, "hard")
    assert modes(model) == before


def test_a_frozen_backbones_statistics_stay_put_through_training_and_the_pruned_phase():
    model, x, y = frozen_backbone()
    pruner = S2HPruner(model, x[:1], target_flops=0.5)
    frozen = model.backbone[1].running_mean.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = S2HTrainer(model, pruner, optimizer, 8, freeze=0.5, prune_at_freeze=True)
    pruned_stats = None
    for _ in range(8):
        trainer.step(x, y)
        evaluate(model, [(x, y)], "cpu", pruner, "soft")
        if trainer.pruned is not None and pruned_stats is None:
            pruned_stats = trainer.pruned.backbone[1].running_mean.clone()
    assert pruned_stats is not None and not trainer.pruned.backbone.training
    assert trainer.pruned.body.training  # the rest trains, as in the model
    assert torch.equal(model.backbone[1].running_mean, frozen)
    assert torch.equal(trainer.pruned.backbone[1].running_mean, pruned_stats)
