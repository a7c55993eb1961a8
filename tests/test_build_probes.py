"""The checks at pruner build that leave out a group the pruner cannot handle exactly: they
probe on random inputs (an all-zero example hid differences), at awkward widths with spread
channels (a prefix of whole heads hid a reshape), and compare the counted FLOPs and parameters
with the resource model's (an unmodelled matmul missed the budget silently). And PReLU, whose
per-channel slopes are sliced and counted like a layer scale."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from kinds_check import check_exact
from torch import nn

from s2hpruner import S2HPruner
from s2hpruner.core.errors import UnsupportedModelError
from s2hpruner.core.sliced import probe_channels
from s2hpruner.core.structure import ChannelGroup


def _left_out(build) -> dict[str, str]:
    """{group name: reason} of the groups a build leaves out, from its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = build()
    reasons = {}
    for w in caught:
        text = str(w.message)
        if "is left out of the search" in text:
            reasons[text.split("'")[1]] = text
    return pruner, reasons


class _SoftNorm(nn.BatchNorm2d):
    """A BatchNorm subclass: the sliced pass does not know it, so the masked pass runs."""


class ChannelGate(nn.Module):
    """conv-BN, then a gate from the mean over channels (CBAM's spatial gate, simplified):
    the mean counts every channel, so removing some changes what the gate computes."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), _SoftNorm(16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), _SoftNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.n1(self.c1(x))
        x = x * torch.sigmoid(x.mean(1, keepdim=True))
        x = F.relu(self.n2(self.c2(F.relu(x))))
        return self.head(x.mean((2, 3)))


def test_an_all_zero_example_no_longer_hides_an_export_that_differs():
    """With zeros through a fresh model every activation is 0 and the probe passed: the gate's
    group was searched and the exported model differed from the trained hard network."""
    torch.manual_seed(0)
    _, reasons = _left_out(lambda: S2HPruner(ChannelGate().eval(), torch.zeros(1, 3, 16, 16),
                                             target_flops=0.6))  # fmt: skip
    assert "c1" in reasons and "differs from the hard network" in reasons["c1"], reasons


class HeadsByView(nn.Module):
    """Attention whose forward splits q, k, v into heads with ``view(B, N, -1, head_dim)``."""

    def __init__(self, dim: int = 64, head_dim: int = 16):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, -1, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))  # fmt: skip
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.o(y)


class TokenNet(nn.Module):
    def __init__(self, attention: nn.Module, dim: int = 64):
        super().__init__()
        self.emb, self.attn, self.head = nn.Linear(8, dim), attention, nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.attn(self.emb(x)).mean(1))


def test_a_reshape_into_heads_is_caught_at_the_widths_a_search_picks():
    """Half of 64 channels is whole heads of 16, so the old probe (the first 32) passed; the
    search then picked 54 and the forward crashed. The probe's width shares few factors with
    the group's size now, and its channels are spread."""
    torch.manual_seed(0)
    pruner, reasons = _left_out(lambda: S2HPruner(TokenNet(HeadsByView()).eval(),
                                                  torch.randn(1, 16, 8), target_flops=0.5))
    failed = [name for name, r in reasons.items() if "fails at 'attn'" in r]
    assert failed, reasons
    assert not set(failed) & {g.name for g in pruner.groups}
    assert "attn.o" in [g.name for g in pruner.groups], "the other groups are still searched"
    check_exact(TokenNet(HeadsByView()), torch.randn(2, 16, 8), target=0.7)


class BareAttention(nn.Module):
    """One head, its matmuls written out: torch-pruning groups q, k and v, the export is
    exact, but q @ k^T and a @ v are no conv or linear layer."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8.0, dim=-1)
        return self.o(a @ self.v(x))


def test_flops_the_resource_model_does_not_predict_leave_the_group_out():
    """The matmuls' FLOPs were counted as fixed: predicted 0.87 of the model, counted 0.76."""
    torch.manual_seed(0)
    pruner, reasons = _left_out(lambda: S2HPruner(TokenNet(BareAttention()).eval(),
                                                  torch.randn(1, 16, 8), target_flops=0.7))
    assert any("resource model predicts" in r for r in reasons.values()), reasons
    check_exact(TokenNet(BareAttention()), torch.randn(2, 16, 8), target=0.8)


def test_cross_attention_through_multihead_attention_is_refused_with_the_reason():
    class Pool(nn.Module):  # a learned query attends to the tokens: not self-attention
        def __init__(self):
            super().__init__()
            self.emb, self.query = nn.Linear(8, 32), nn.Parameter(torch.randn(1, 1, 32))
            self.attn, self.head = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 10)

        def forward(self, x):
            t = self.emb(x)
            y, _ = self.attn(self.query.expand(len(x), -1, -1), t, t)
            return self.head(y[:, 0])

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruner = S2HPruner(Pool().eval(), torch.randn(1, 16, 8), target_flops=0.8)
        except UnsupportedModelError as exc:
            assert "resource model predicts" in str(exc)
            return
    assert "attn" not in [g.name for g in pruner.groups], "its FLOPs would be miscounted"


@pytest.mark.parametrize("slopes", [16, 1], ids=["per-channel", "shared"])
def test_prelu_is_pruned_with_its_group_exactly(slopes):
    """A per-channel PReLU crashed the build ("cannot tell the output channels of PReLU");
    its slopes are now sliced on export and counted, a shared one passes channels through."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PReLU(slopes),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))  # fmt: skip
    with torch.no_grad():
        model[2].weight.uniform_(-0.5, 0.5)  # slopes that differ per channel
    pruner, exported, _ = check_exact(model, torch.randn(2, 3, 12, 12), target=0.6)
    assert "0" in [g.name for g in pruner.groups], "the PReLU's group is searched"
    assert exported[2].num_parameters == (exported[0].out_channels if slopes > 1 else 1)


@pytest.mark.parametrize(("channels", "step", "width"), [
    (64, 2, 30), (64, 1, 31), (16, 1, 7), (12, 1, 5), (3, 1, 2), (32, 8, 8), (2, 1, 1),
])  # fmt: skip
def test_the_probe_width_is_a_candidate_near_half_with_few_common_factors(channels, step,
                                                                          width):
    candidates = list(range(step, channels, step)) + [channels]
    group = ChannelGroup("g", channels, step, candidates)
    kept = probe_channels(group)
    assert len(kept) == width and len(set(kept)) == width and width in candidates
    assert kept == sorted(kept) and max(kept) < channels
    if width > 1:
        assert kept != list(range(width)), "spread over the group, not a prefix"


def test_a_model_that_refuses_random_inputs_is_probed_on_its_example():
    """A float input the model checks (a mask of 0s and 1s, coordinates) stays the example."""

    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            if (x < 0).any():
                raise ValueError("images are in [0, 1]")
            return self.head(F.relu(self.n1(self.c1(x))).mean((2, 3)))

    torch.manual_seed(0)
    pruner, reasons = _left_out(lambda: S2HPruner(Checked().eval(), torch.rand(1, 3, 8, 8),
                                                  target_flops=0.6))  # fmt: skip
    assert reasons == {} and [g.name for g in pruner.groups] == ["c1"]


def test_tied_weights_are_refused_only_where_their_parameter_count_matters():
    """A weight shared by two convolutions counts once: the resource model, which counts it
    per layer, is off on parameters (not FLOPs), so only a parameter budget leaves the groups
    out."""

    def tied():
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # fmt: skip
        net[6].weight = net[3].weight
        return net.eval()

    torch.manual_seed(0)
    pruner, reasons = _left_out(lambda: S2HPruner(tied(), torch.zeros(1, 1, 8, 8),
                                                  target_flops=0.5))  # fmt: skip
    assert reasons == {} and len(pruner.groups) == 3
    refused = pytest.raises(UnsupportedModelError, match="parameters, where s2hpruner's")
    with refused, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S2HPruner(tied(), torch.zeros(1, 1, 8, 8), target_params=0.5)
