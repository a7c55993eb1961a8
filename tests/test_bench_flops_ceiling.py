"""The baselines' pruning-ratio search with a FLOPs ceiling (``BaselineOptions.flops_ceiling``):
where a coarse width step (torch-pruning's round_to) puts the target inside one jump, the
closest ratio may lie above the budget; the ceiling keeps the result within it."""

import dataclasses
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import baselines, compare  # noqa: E402
from s2hpruner import count_flops  # noqa: E402


def _two_convs() -> nn.Module:
    """Two 16-channel groups: in steps of 8 they keep 16 or 8 channels each, so the FLOPs
    ratios on offer are 1, about 0.5 (either group halved) and about 0.27 (both)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:the search reached FLOPs ratio")
def test_the_ceiling_keeps_a_coarse_step_within_the_budget():
    example = torch.zeros(1, 1, 16, 16)
    factory = partial(baselines.l1_pruner, global_pruning=True, round_to=8)
    target = 0.45
    found = {}
    for ceiling in (None, 0.01):
        model = _two_convs()
        full = count_flops(model, example)
        result = baselines.prune_to_flops(model, example, factory, target, ceiling=ceiling)
        assert result["flops_ratio"] == pytest.approx(count_flops(model, example) / full)
        found[ceiling] = result["flops_ratio"]
    assert found[None] > target + 0.01, "the control: the closest ratio is above the budget"
    assert found[0.01] <= target + 0.01
    assert found[0.01] == pytest.approx(0.27, abs=0.02), "the closest ratio within it"


def test_the_ceiling_is_a_stored_setting_and_absent_means_none():
    """Files written before the option resume as they were made: the closer side."""
    assert baselines.BaselineOptions().flops_ceiling is None
    stored = compare.stored_settings({"options": {"lr": 0.03}})
    assert stored["options"]["flops_ceiling"] is None


def _searches(name: str, base_name: str, kept: str) -> tuple[tuple, tuple]:
    """The two profiles' searches of the method other than ``kept``, after checking that
    nothing else differs (so ``--reuse-from`` takes ``kept``'s runs)."""
    base, profile = compare.PROFILES[base_name], compare.PROFILES[name]
    assert dataclasses.replace(profile, name=base.name, search=base.search) == base
    assert profile.search[kept] == base.search[kept]
    changed = "l1-ft" if kept == "s2h" else "s2h"
    return profile.search[changed], base.search[changed]


def test_the_ceiling_profile_only_changes_l1s_search():
    """So ``--reuse-from`` takes S2HPruner's runs and compute ratios from the replicate."""
    l1, base_l1 = _searches("from-trained-replicate-035-ceiling", "from-trained-replicate-035",
                            kept="s2h")  # fmt: skip
    aligned, unaligned = l1
    assert aligned == {**base_l1[0], "flops_ceiling": 0.01}
    assert "l1_round_to" not in unaligned and unaligned["l1_global"]
    assert baselines.BaselineOptions(**{k: v for k, v in aligned.items()
                                        if k in compare.OPTION_HYPER}).flops_ceiling == 0.01


def test_the_width_step_profile_only_adds_s2hprunners_step_of_4():
    s2h, base_s2h = _searches("from-trained-replicate-035-width-step",
                              "from-trained-replicate-035-ceiling", kept="l1-ft")
    first, second = s2h
    assert first == base_s2h[0], "the replicate's recipe first: it wins ties"
    assert second == {**first, "round_to": 4}
