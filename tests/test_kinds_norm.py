"""Channel groups through LayerNorm / GroupNorm (kinds/norms.py): ConvNeXt stages and
downsamples, PoolFormer's GroupNorm(1, C). The hard network's norms take their statistics over
the kept channels only, so it is exactly the exported (physically pruned) network; FLOPs and
parameters (norm affines and layer scales included) match the counters."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from kinds_check import check_exact, check_sliced_equals_masked_in_training, train_steps
from torch import nn

from s2hpruner.core.kinds import norms


def layer_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm | nn.GroupNorm)}


def assert_norms_pruned(model: nn.Module, exported: nn.Module) -> None:
    before, after = layer_norms(model), layer_norms(exported)
    assert any(norms.channels(after[n]) < norms.channels(m) for n, m in before.items())


def test_timm_convnext_stages_and_downsamples_are_searched_and_exact():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group is left out any more
        pruner, exported, _ = check_exact(model, torch.randn(2, 3, 32, 32), seed=1)
    names = {g.name for g in pruner.groups}
    assert {"stem.0", "stages.1.downsample.1", "stages.3.downsample.1"} <= names
    group = next(g for g in pruner.groups if g.name == "stages.1.downsample.1")
    assert group.norm_dims["stages.1.blocks.0.norm"] == 1  # LayerNorm2d: over dim 1
    assert "stages.1.blocks.0.gamma" in group.param_dims  # the layer scale is sliced
    assert_norms_pruned(model, exported)


def test_torchvision_convnext_is_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.convnext_tiny(weights=None, num_classes=10)
    pruner, exported, _ = check_exact(model, torch.randn(2, 3, 32, 32), seed=2)
    group = next(g for g in pruner.groups if g.name == "features.2.1")  # a downsample
    assert group.norm_dims["features.3.0.block.2"] == -1  # nn.LayerNorm after a permute
    assert_norms_pruned(model, exported)


def test_poolformer_group_norm_is_exact():
    timm = pytest.importorskip("timm")
    model = timm.create_model("poolformer_s12", num_classes=10)
    pruner, exported, _ = check_exact(model, torch.randn(2, 3, 32, 32), seed=3)
    assert any(isinstance(model.get_submodule(p.module_name), nn.GroupNorm)
               for g in pruner.groups for p in g.norms)  # fmt: skip
    assert_norms_pruned(model, exported)


@pytest.mark.parametrize("kind", ["last", "nchw", "group"])
def test_masked_statistics_are_the_kept_channels_statistics(kind):
    torch.manual_seed(0)
    if kind == "group":
        module, dim, x = nn.GroupNorm(3, 12), 1, torch.randn(2, 12, 5, 5)
        keep = torch.tensor([1, 0, 1, 1] * 3, dtype=torch.bool)  # the same positions per group
    else:
        module = nn.LayerNorm(12)
        dim = -1 if kind == "last" else 1
        x = torch.randn(2, 5, 12) if kind == "last" else torch.randn(2, 12, 3, 3)
        keep = torch.rand(12) > 0.4
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    if kind != "nchw":  # a plain LayerNorm cannot run on NCHW; timm's LayerNorm2d does
        assert norms.channel_dim(module, x) == dim
    kept = torch.nonzero(keep).flatten()
    small = type(module)(*((3, int(keep.sum())) if kind == "group" else (int(keep.sum()),)))
    with torch.no_grad():
        small.weight.copy_(module.weight[kept])
        small.bias.copy_(module.bias[kept])
        masked = norms.norm(module, x, dim, keep).index_select(dim, kept)
        if kind == "nchw":
            reference = small(x.index_select(dim, kept).movedim(1, -1)).movedim(-1, 1)
        else:
            reference = small(x.index_select(dim, kept))
    assert torch.allclose(masked, reference, atol=1e-5)


def test_convnext_sliced_pass_equals_masked_pass_in_training():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", num_classes=10)
    check_sliced_equals_masked_in_training(model, torch.randn(2, 3, 32, 32), seed=4)


def test_convnext_trains_with_s2h_trainer():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", num_classes=10)
    train_steps(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))


def small_timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def small_hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, num_labels=10)  # fmt: skip
    return transformers.ViTForImageClassification(config)


@pytest.mark.parametrize("build", [small_timm_vit, small_hf_vit], ids=["timm", "hf"])
def test_vit_embedding_width_is_an_exact_option(build):
    """prune_embedding=True searches the residual stream (LayerNorms, cls token and position
    embedding, attention projections' outer sides) as well as heads and MLPs; off by default."""
    x = torch.randn(2, 3, 32, 32)
    assert not any(g.norms for g in check_exact(build(), x, seed=5)[0].groups)  # default: off
    pruner, exported, _ = check_exact(build(), x, seed=5, prune_embedding=True)
    (stream,) = [g for g in pruner.groups if g.norms]
    assert stream.channels == 64 and len(stream.parameters) == 2  # cls token, position embedding
    assert pruner.kept_widths()[stream.name] < 64
    assert {g.kind for g in pruner.groups} == {"channels", "heads"}
    assert_norms_pruned(build(), exported)
