"""The model registry: names resolve, shapes fit small images, and torch-pruning can trace."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from s2hpruner.app import models
from s2hpruner.app.models import MODELS, create_model, list_models, register_model
from s2hpruner.core.errors import UnknownNameError

# Smaller settings where the default is heavy; the defaults are checked by parameter count.
FORWARD_KWARGS: dict[str, dict] = {
    "resnet20": {},
    "resnet56": {},
    "resnet50": {},
    "wrn28_10": {"widen_factor": 2},
    "wrn16_4": {},
    "vgg19_bn": {},
    "vgg11_bn_cifar": {},
    "mobilenet_v3_small": {},
    "mobilenet_v3_large": {},
    # timm's vision transformers, at the test's image size (create_model's image_size)
    "vit_tiny_patch16_224": {"patch_size": 4},
    "deit_tiny_patch16_224": {"patch_size": 4},
    "deit_small_patch16_224": {"patch_size": 4, "depth": 2},
    "swin_tiny_patch4_window7_224": {"depths": (2, 2, 2, 2)},
    "vit_fmnist": {},
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registry_entry_is_tested():
    assert sorted(FORWARD_KWARGS) == list_models()


@pytest.mark.parametrize("name", sorted(FORWARD_KWARGS))
@pytest.mark.parametrize(
    ("in_chans", "size", "num_classes"), [(1, 28, 10), (3, 32, 100)], ids=["28x28x1", "32x32x3"]
)
def test_forward_shape(name, in_chans, size, num_classes):
    model = create_model(
        name, num_classes=num_classes, in_chans=in_chans, image_size=size, **FORWARD_KWARGS[name]
    )
    with torch.no_grad():  # train mode on purpose: BN must cope with batch 2 at the last stage
        out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, num_classes)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet20", 0.269e6, 0.28e6),  # 0.270M with zero-padding shortcuts, +2.8K projections
        ("resnet56", 0.853e6, 0.87e6),
        ("wrn28_10", 36.4e6, 36.6e6),  # 36.5M in the WRN paper
        ("wrn16_4", 2.7e6, 2.8e6),
    ],
)
def test_parameter_counts(name, low, high):
    assert low <= n_params(create_model(name, num_classes=10)) <= high


def test_cifar_resnet_uses_projection_shortcuts():
    model = create_model("resnet20")
    shortcuts = [m.shortcut for m in model.modules() if isinstance(m, models.BasicBlock)]
    projections = [s for s in shortcuts if isinstance(s, nn.Sequential)]
    assert len(projections) == 2  # one per stage transition, identity elsewhere
    assert isinstance(projections[0][0], nn.Conv2d) and projections[0][0].kernel_size == (1, 1)


def test_cifar_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        models.cifar_resnet(21)


def test_resnet50_has_small_image_stem():
    model = create_model("resnet50", in_chans=1)
    assert model.conv1.in_channels == 1
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "torchvision/resnet50"])
def test_torchvision_fallback_with_one_channel(name):
    model = create_model(name, num_classes=10, in_chans=1).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():  # torchvision's VGG needs >= 32 px: its 5 pools have no ceil_mode
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_torchvision_prefix_bypasses_the_registry():
    model = create_model("torchvision/resnet50", in_chans=1)
    # The ImageNet stem is kept, only its input channels change.
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == (
        (7, 7),
        (2, 2),
        (3, 3),
    )
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet21")
    message = str(info.value)
    assert "resnet21" in message
    assert all(name in message for name in list_models())
    assert "torchvision" in message
    assert info.value.known == list_models()


def test_list_models_with_torchvision():
    names = list_models(include_torchvision=True)
    assert names[: len(MODELS)] == list_models()
    assert "torchvision/resnet18" in names and "torchvision/resnet50" in names


def test_register_model(monkeypatch):
    monkeypatch.setattr(models, "MODELS", dict(MODELS))

    @register_model
    def tiny_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert create_model("tiny_net", num_classes=4)(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_model(tiny_net)


@pytest.mark.parametrize(
    ("name", "first_conv"),
    [
        ("resnet20", "conv1"),
        ("mobilenet_v3_small", "features.0.0"),
        ("vgg11_bn_cifar", "0.0"),
        ("wrn16_4", "conv1"),
    ],
)
def test_torch_pruning_can_trace_and_prune(name, first_conv):
    model = create_model(name, num_classes=10, in_chans=1).eval()
    example = torch.randn(1, 1, 28, 28)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    # Pruning the stem's output channels touches every layer coupled to them (BN, residuals).
    conv = model.get_submodule(first_conv)
    before = conv.out_channels
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0, 1])
    group.prune()
    assert conv.out_channels == before - 2
    with torch.no_grad():
        assert model(example).shape == (1, 10)
