"""Grouped convolutions that are not depthwise (ResNeXt, RegNet; kinds/grouped.py): pruned as
torch-pruning does, the same positions out of every conv group, so the exported convs keep
their number of groups; the hard network is exactly the exported one and the FLOPs and
parameter predictions match the counters."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from kinds_check import check_exact, check_sliced_equals_masked_in_training, train_steps
from torch import nn


def torchvision_model(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, num_classes=10)


class GroupedNet(nn.Module):
    """Grouped convs with BatchNorm and a GroupNorm(4, C) (which ties positions too)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 24, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_y_400mf"])
def test_torchvision_grouped_convs_exact_export_and_flops(name):
    model = torchvision_model(name)
    pruner, exported, _ = check_exact(model, torch.randn(2, 3, 32, 32), seed=len(name))
    grouped = [g for g in pruner.groups if g.kind == "grouped"]
    assert grouped, "no grouped-conv group was searched"
    kept = pruner.kept_widths()
    assert any(kept[g.name] < g.channels for g in grouped)
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned_some = False
    for name_, conv in exported.named_modules():
        if isinstance(conv, nn.Conv2d) and before[name_].groups > 1:
            assert conv.groups == before[name_].groups  # the number of conv groups is kept
            assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
            pruned_some |= conv.out_channels < before[name_].out_channels
    assert pruned_some


def test_resnext_units_are_block_positions():
    model = torchvision_model("resnext50_32x4d")
    pruner, _, _ = check_exact(model, torch.randn(1, 3, 32, 32), seed=3)
    group = next(g for g in pruner.groups if g.name == "layer1.0.conv2")
    # 128 channels in 32 conv groups of 4: 4 units (block positions) of 32 channels each
    assert group.kind == "grouped" and group.channels == 4 and group.head_dim == 32
    assert group.root_channels([1]) == list(range(1, 128, 4))


def test_timm_regnet_with_fused_norms_is_exact():
    timm = pytest.importorskip("timm")
    model = timm.create_model("regnetx_002", num_classes=10)
    pruner, _, _ = check_exact(model, torch.randn(2, 3, 32, 32), seed=2)
    assert any(g.kind == "grouped" for g in pruner.groups)


def test_grouped_convs_and_group_norm_exact_export():
    pruner, exported, _ = check_exact(GroupedNet(), torch.randn(2, 3, 16, 16), seed=1)
    assert {g.name: g.kind for g in pruner.groups} == {
        "stem": "grouped", "conv1": "grouped", "conv2": "grouped"}
    assert exported.gn.num_groups == 4 and exported.gn.num_channels % 4 == 0


def test_grouped_sliced_pass_equals_masked_pass_in_training():
    check_sliced_equals_masked_in_training(GroupedNet(), torch.randn(4, 3, 16, 16), seed=2)


def test_grouped_net_trains_with_s2h_trainer():
    train_steps(GroupedNet(), torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,)))

