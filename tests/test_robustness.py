"""Robustness of building and exporting (issue 16): models that crashed or hung the pruner.

Each model here is a small synthetic reproduction of an architecture pattern found by
``benchmarks/coverage.py``. The pruner must either prune it exactly (hard network == exported
network, FLOPs prediction == independent counter) or refuse it with an ``S2HError`` at build
time; never a raw exception, never minutes of group search.
"""

import time
import warnings

import pytest
import torch
from torch import nn

from s2hpruner import S2HPruner, count_flops, count_params
from s2hpruner.core import structure
from s2hpruner.core.structure import find_groups


def _random_widths(pruner: S2HPruner, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.copy_(3 * torch.randn(u.shape, generator=gen))


def _assert_exact(model: nn.Module, x: torch.Tensor, seeds=range(4)) -> S2HPruner:
    """Random widths, then hard network == exported network, and predictions == counters."""
    model.eval()
    pruner = S2HPruner(model, x, target_flops=0.9)
    for seed in seeds:
        _random_widths(pruner, seed)
        exported = pruner.export().eval()
        with torch.no_grad():
            for sliced in {False, pruner.sliced_hard}:
                with pruner.mode("hard", sliced=sliced):
                    hard = model(x)
                out = exported(x)
                assert (hard - out).abs().max() <= 1e-4 * hard.abs().max()
        assert float(pruner.flops("hard")) == pytest.approx(count_flops(exported, x), rel=1e-6)
        assert float(pruner.params("hard")) == pytest.approx(count_params(exported), rel=1e-6)
    return pruner


# ---------------------------------------------------------------- channel splits (Res2Net)
class SplitBlock(nn.Module):
    """Res2Net's pattern: a conv's output split into fixed-width parts, each part (plus the
    previous part's result) through its own conv, the parts concatenated again."""

    def __init__(self, split: str = "split"):
        super().__init__()
        self.split = split
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 24, 1)
        self.bn1 = nn.BatchNorm2d(24)
        self.convs = nn.ModuleList([nn.Conv2d(6, 6, 3, padding=1) for _ in range(3)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(6) for _ in range(3)])
        self.conv3 = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 10)

    def parts(self, out: torch.Tensor) -> list[torch.Tensor]:
        if self.split == "split":
            return list(torch.split(out, 6, 1))
        if self.split == "chunk":
            return list(out.chunk(4, dim=1))
        return [out[:, 6 * i : 6 * (i + 1)] for i in range(4)]  # channel slices

    def forward(self, x):
        x = torch.relu(self.stem(x))
        parts = self.parts(torch.relu(self.bn1(self.conv1(x))))
        outs, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = parts[i] if i == 0 else sp + parts[i]
            sp = torch.relu(self.bns[i](conv(sp)))
            outs.append(sp)
        out = self.conv3(torch.cat([*outs, parts[3]], 1))
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("split", ["split", "chunk", "slice"])
def test_channel_split_group_left_out_and_export_exact(split):
    """A group whose channels pass through a fixed-size channel split is left out of the
    search with a warning naming it (before: IndexError at build, or split_with_sizes sizes
    that no longer add up in the exported model); everything else prunes exactly."""
    model = SplitBlock(split).eval()
    x = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups, _ = find_groups(model, x)
    names = {g.name for g in groups}
    assert "conv1" not in names and "stem" in names
    assert any("conv1" in str(w.message) and "split" in str(w.message) for w in caught)
    for g in groups:  # every index a group holds exists in its layer
        for piece in g.producers + g.norms:
            module = dict(model.named_modules())[piece.module_name]
            size = getattr(module, "out_channels", None) or getattr(module, "num_features", None)
            size = size or module.out_features
            assert max(piece.module_idxs) < size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_exact(model, x)


class ChunkOnlyProducer(nn.Module):
    """A conv whose output is only ever used through a chunk (GhostNet/CSP-like)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        left, right = self.conv(x).chunk(2, dim=1)
        y = torch.cat([self.a(left), self.b(right)], 1)
        return self.head(y.mean((2, 3)))


def test_chunk_consumers_never_get_zero_channels():
    """Pruning the chunked conv by rank could leave one half with no kept channel (a
    [0, 8, 3, 3] weight in the export): the group is left out, every consumer keeps >= 1."""
    model = ChunkOnlyProducer().eval()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = _assert_exact(model, x, seeds=range(8))
        assert "conv" not in {g.name for g in pruner.groups}
        _random_widths(pruner, 3)
        exported = pruner.export()
    assert all(p.numel() > 0 for p in exported.parameters())


# ----------------------------------------------------------- bounded group search (concats)
class DenseChain(nn.Module):
    """DenseNet's pattern: every layer's output concatenated onto all earlier ones."""

    def __init__(self, layers: int = 12, growth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(
            [nn.Conv2d(8 + i * growth, growth, 3, padding=1) for i in range(layers)]
        )
        self.bns = nn.ModuleList([nn.BatchNorm2d(growth) for _ in range(layers)])
        self.head = nn.Linear(8 + layers * growth, 10)

    def forward(self, x):
        features = [self.stem(x)]
        for conv, bn in zip(self.convs, self.bns, strict=True):
            features.append(torch.relu(bn(conv(torch.cat(features, 1)))))
        return self.head(torch.cat(features, 1).mean((2, 3)))


def test_group_search_recomputes_index_maps_once(monkeypatch):
    """torch-pruning recomputes every concat's index map (a recursive shape inference) on
    each ``get_pruning_group``: quadratic, minutes on concat-heavy timm CNNs. Building the
    groups must compute them once per graph state, and stay exact."""
    calls = []
    original = structure._tp_index_mapping.update_index_mapping

    def counting(graph):
        calls.append(1)
        return original(graph)

    monkeypatch.setattr(structure._tp_index_mapping, "update_index_mapping", counting)
    model = DenseChain().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = structure.build_graph(model, x)
    calls.clear()
    groups, _ = find_groups(model, x, graph=graph)
    assert len(groups) == 13
    assert len(calls) == 1
    # the patch is undone: outside find_groups torch-pruning's own function is back
    assert structure._tp_index_mapping.update_index_mapping is counting


def test_index_maps_follow_pruning():
    """The memo must not serve stale maps once channels are removed (export prunes group
    after group and the concat offsets move)."""
    model = DenseChain(layers=6).eval()
    x = torch.randn(1, 3, 8, 8)
    with structure.index_mapping_once():
        _assert_exact(model, x, seeds=range(3))


def test_dense_build_time_bounded():
    """A 40-layer dense chain (820 concat inputs in all) builds in seconds."""
    model = DenseChain(layers=40, growth=2).eval()
    x = torch.randn(1, 3, 8, 8)
    start = time.perf_counter()
    S2HPruner(model, x, target_flops=0.9)
    assert time.perf_counter() - start < 20


# ------------------------------------------------- bounded traversal (window partitions)
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1)
                                     for i in range(4)])  # fmt: skip
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.convs(x).mean((2, 3)))


def test_exploding_index_map_is_bounded():
    """A reshape torch-pruning mistakes for a flatten (a window partition: maxvit, swin)
    multiplies a group's indices at every step; tracing such a group took longer than the
    coverage timeout. The traversal stops past the widest layer and the group is left out."""
    model = Chain().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = structure.build_graph(model, x)
    node = graph.module2node[model.convs[1]]
    dep = next(d for d in node.dependencies if d.target.module is model.convs[2])

    def explode(idxs):  # every index becomes 400 (as a 20x20 window flatten would)
        return [type(i)(idx=i.idx * 400 + k, root_idx=i.root_idx) for i in idxs
                for k in range(400)]  # fmt: skip

    dep.index_mapping[0] = explode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        groups, _ = find_groups(model, x, graph=graph)
    assert time.perf_counter() - start < 10
    assert "convs.1" not in {g.name for g in groups} and "convs.0" in {g.name for g in groups}
    assert any("convs.1" in str(w.message) and "cannot follow" in str(w.message)
               for w in caught)  # fmt: skip


# ------------------------------------------- channel counts fixed in code (fixed buffers)
class Gain(nn.Module):
    """A per-channel gain kept in a buffer: torch-pruning does not prune buffers, so its
    size stays the full width while its input loses channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("gain", torch.linspace(0.5, 1.5, channels).view(-1, 1, 1))

    def forward(self, x):
        return x * self.gain


class FixedGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gain = Gain(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.gain(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.head(x.mean((2, 3)))


def test_group_breaking_a_fixed_size_is_left_out_at_build():
    """Removing conv1's channels breaks ``x * gain`` (before: a RuntimeError in the sliced
    hard pass and in the exported model's forward). The pruner finds that at build time by a
    narrowed forward, leaves the group out with a warning naming the layer, and prunes the
    other groups exactly."""
    model = FixedGain().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = _assert_exact(model, x)
    assert {g.name for g in pruner.groups} == {"conv2", "conv3"}
    assert any("'conv1'" in str(w.message) and "fails at 'gain'" in str(w.message)
               for w in caught)  # fmt: skip


# ------------------------------------ layers whose export breaks or differs (export probe)
class WSConv(nn.Conv2d):
    """timm's ScaledStdConv2d (NFNet): weights standardised over each filter's inputs, and a
    per-output gain that torch-pruning does not know. Removing its input channels changes the
    statistics (the exported model differs from the masked one); removing its outputs leaves
    the gain at the full width (the exported forward fails)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, cout).view(-1, 1, 1, 1))

    def forward(self, x):
        w = self.weight.reshape(1, self.out_channels, -1)
        w = torch.nn.functional.batch_norm(w, None, None, weight=self.gain.view(-1),
                                           training=True, eps=1e-6)  # fmt: skip
        return torch.nn.functional.conv2d(x, w.reshape_as(self.weight), self.bias, 1, 1)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.ws = WSConv(16, 16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.ws(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(self.conv3(x)).mean((2, 3)))


def test_group_whose_export_differs_is_left_out_at_build():
    """The sliced pass cannot run a Conv2d subclass, so only an export shows the failures
    (before: a RuntimeError in the exported model's forward, timm dm_nfnet_f0 / eca_nfnet_l0).
    The pruner exports once at build time, finds both bad groups by bisection, leaves them out
    with warnings naming them, and prunes conv3 exactly."""
    model = StdConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = _assert_exact(model, x)
    assert {g.name for g in pruner.groups} == {"conv3"}
    messages = [str(w.message) for w in caught if "exported" in str(w.message)]
    assert any("'conv1'" in m and "differs from the hard network" in m for m in messages)
    assert any("'ws'" in m and "RuntimeError" in m for m in messages)


# ------------------------------- ops whose shapes torch-pruning cannot infer (ShuffleNetV2)
def _shuffle(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2),
                                    nn.ReLU())  # fmt: skip

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return _shuffle(torch.cat((a, self.branch(b)), 1))


class ShuffleNetLike(nn.Module):
    """ShuffleNetV2's stride-1 units: chunk, branch, concat, channel shuffle. Stacked, they
    make torch-pruning's reshape index map divide by zero while tracing."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16), ShuffleUnit(16))
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.units(self.stem(x))
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


def test_untraceable_shuffle_leaves_its_groups_out():
    """Before: the whole model was refused (torch-pruning's trace raised ZeroDivisionError;
    torchvision shufflenet_v2_*, timm dpn68 / cs3darknet_s / coat_tiny, torchvision swin_s
    with a TypeError). Now the ops whose shapes cannot be inferred are recorded, the groups
    through them are left out with a warning naming them, and the rest prunes exactly."""
    model = ShuffleNetLike().eval()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        pruner = _assert_exact(model, x)
    assert time.perf_counter() - start < 30
    assert "conv2" in {g.name for g in pruner.groups}
    assert any("cannot infer" in str(w.message) or "cannot follow" in str(w.message)
               for w in caught)  # fmt: skip


# ------------------------------------------ FLOP counter on a parameter's view (CaiT)
class ClassAttentionLike(nn.Module):
    """CaiT's class-attention blocks: a submodule gets ``cls_token.expand(...)`` as input."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Parameter(torch.zeros(1, 1, 8))
        self.lin = nn.Linear(8, 8)
        self.blk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.tok.expand(x.shape[0], -1, -1)
        t = t + self.blk(torch.cat((t, self.lin(x)), 1)).mean(1, keepdim=True)
        return self.head(t[:, 0])


def test_flop_counter_on_expanded_parameter():
    """torch's FlopCounterMode, under no_grad, asserts on a module input that is a view of a
    parameter ("Expected gradient function to be set"; timm cait_xxs24_224 crashed building
    the pruner). count_flops retries with grad enabled; the pruner builds and prunes exactly."""
    model = ClassAttentionLike().eval()
    x = torch.randn(2, 4, 8)
    assert count_flops(model, x) > 0
    _assert_exact(model, x)


# ---------------------------------------------- statistics over all channels (RmsNorm2d)
class RmsNorm2d(nn.Module):
    """timm's RmsNorm2d: statistics over every channel, so removing channels changes them;
    torch-pruning only sees its weight (a per-channel parameter) and slices it."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
        return x * self.weight.view(1, -1, 1, 1)


class RmsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = RmsNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv2(self.norm(self.conv1(x)))
        return self.head(torch.relu(x).mean((2, 3)))


def test_norm_over_all_channels_is_left_out():
    """Before: exported != hard network by 14% of the output (timm convnext_zepto_rms was
    inexact). The build-time export finds it, and conv1's group is left out with a warning."""
    model = RmsNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = _assert_exact(model, x)
    assert {g.name for g in pruner.groups} == {"conv2"}
    assert any("'conv1'" in str(w.message) and "differs from the hard network" in
               str(w.message) for w in caught)  # fmt: skip


class AllStdConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.ws1 = WSConv(3, 16)
        self.ws2 = WSConv(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.relu(self.ws2(torch.relu(self.ws1(x)))).mean((2, 3)))


def test_model_whose_every_group_breaks_is_refused_by_name():
    """When no group survives the build-time export (NFNets: ScaledStdConv2d everywhere),
    the refusal is an S2HError naming a group, what failed and what to do, not "no prunable
    channel group"."""
    from s2hpruner.core.errors import UnsupportedModelError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match=r"group 'ws\d'.*replace the layer"):
            S2HPruner(AllStdConv().eval(), torch.randn(2, 3, 8, 8), target_flops=0.9)


def test_group_mapped_past_its_producer_is_left_out(monkeypatch):
    """A channel map that points past a producer's output channels (torch-pruning got a
    mapping wrong, as on timm lowformer_b0) leaves that group out at build, with a warning
    naming the producer, instead of an IndexError in the importance of every step."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    real = structure.find_groups

    def broken(*args, **kwargs):
        groups, rest = real(*args, **kwargs)
        bad = next(g for g in groups if g.producers[0].module_name == "0")
        bad.producers[0].module_idxs[-1] = 8  # conv 0 has 8 output channels: 0..7
        return groups, rest

    monkeypatch.setattr("s2hpruner.core.pruner.find_groups", broken)
    with pytest.warns(UserWarning, match="points past the 8 output channels of '0'"):
        pruner = S2HPruner(model, x, target_flops=0.6)
    assert [g.producers[0].module_name for g in pruner.groups] == ["3"]
    pruner.update_ranks(force=True)  # importance over the kept groups: no IndexError
