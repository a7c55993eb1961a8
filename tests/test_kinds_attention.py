"""Attention heads beyond timm's (kinds/mha.py, kinds/hf_attention.py): ``nn.MultiheadAttention``
(torchvision's ViT) and Hugging Face ViT / DeiT built from a small config (no download). Heads
are really removed, the hard network is exactly the exported one, and the FLOPs (projections
and attention matmuls) and parameters match the counters."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from kinds_check import check_exact, check_sliced_equals_masked_in_training, train_steps
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def small_torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                              hidden_dim=64, mlp_dim=128, num_classes=10)  # fmt: skip
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises it
    return model


def head_groups(pruner):
    return [g for g in pruner.groups if g.kind == "heads"]


def test_torchvision_vit_b_16_heads_are_pruned_exactly():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=32)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    pruner, exported, _ = check_exact(model, torch.randn(2, 3, 32, 32), seed=1)
    heads = head_groups(pruner)
    assert len(heads) == 12
    kept = pruner.kept_widths()
    assert any(kept[g.name] < g.channels for g in heads)
    for g in heads:
        attn = exported.get_submodule(g.name)
        assert isinstance(attn, nn.MultiheadAttention)
        assert attn.num_heads == kept[g.name]
        assert attn.in_proj_weight.shape == (3 * kept[g.name] * 64, 768)
        assert attn.out_proj.weight.shape == (768, kept[g.name] * 64)


def test_small_torchvision_vit_sliced_equals_masked_in_training():
    check_sliced_equals_masked_in_training(small_torchvision_vit(), torch.randn(2, 3, 32, 32))


def hf_model(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
        "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification),
    }[kind]
    torch.manual_seed(0)
    config = config_cls(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=10)  # fmt: skip
    return model_cls(config)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_hugging_face_heads_are_pruned_exactly(kind):
    model = hf_model(kind)
    pruner, exported, _ = check_exact(model, torch.randn(2, 3, 32, 32), seed=2)
    heads = head_groups(pruner)
    assert len(heads) == 2
    kept = pruner.kept_widths()
    assert any(kept[g.name] < g.channels for g in heads)
    for g in heads:
        attn = exported.get_submodule(g.name)
        assert attn.num_attention_heads == kept[g.name]
        assert attn.q_proj.out_features == kept[g.name] * g.head_dim
        assert attn.o_proj.in_features == kept[g.name] * g.head_dim
    assert type(exported) is type(model)


def test_hugging_face_sliced_equals_masked_in_training():
    check_sliced_equals_masked_in_training(hf_model("vit"), torch.randn(2, 3, 32, 32), seed=3)


def test_hugging_face_vit_trains_with_s2h_trainer():
    train_steps(hf_model("vit"), torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))


def test_torchvision_swin_keeps_its_heads_and_is_exact():
    """torchvision's ShiftedWindowAttention derives its head width from the embedding width in
    a functional forward, so its heads are kept (with a warning); its MLP widths are searched
    and the export is exact."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.swin_t(weights=None, num_classes=10)
    with pytest.warns(UserWarning, match="attn' keeps all its heads"):
        pruner, _, _ = check_exact(model, torch.randn(2, 3, 64, 64), seed=1, target=0.8)
    assert not head_groups(pruner) and all(g.name.endswith("mlp.0") for g in pruner.groups)
