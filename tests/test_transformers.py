"""Vision transformers (issue 4): attention heads and MLP widths are pruned, and the core
invariant holds as for CNNs: in eval mode the hard-masked network IS the exported network, and
the pruner's FLOPs and parameter predictions are what independent counters measure.

Small images keep the suite fast: the registry's transformers take ``img_size`` (ViT/DeiT with
16-pixel patches see 2x2 patches of a 32x32 image; Swin-T sees 8x8 tokens, so its first stage
pads 7x7 shifted windows and the later stages shrink their windows to the feature map).
"""

import warnings

import pytest
import torch
from torch import nn

from s2hpruner import S2HPruner, count_flops, count_params
from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.models import VISION_TRANSFORMERS, create_model
from s2hpruner.app.run import build_model_and_pruner, build_trainer

pytest.importorskip("timm")

# (registry name, kwargs, input shape)
CASES = [
    ("vit_fmnist", {}, (2, 1, 28, 28)),
    ("vit_tiny_patch16_224", {"img_size": 32}, (2, 3, 32, 32)),
    ("deit_tiny_patch16_224", {"img_size": 32}, (2, 3, 32, 32)),
    ("deit_small_patch16_224", {"img_size": 32}, (2, 3, 32, 32)),
    ("swin_tiny_patch4_window7_224", {"img_size": 32}, (2, 3, 32, 32)),
]
# a small Swin with shifted 4x4 windows on 16x16 tokens (the CIFAR-100 configs' layout)
SMALL_SWIN = (
    "swin_tiny_patch4_window7_224",
    {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 48, "depths": (2, 2, 2, 2)},
    (2, 3, 32, 32),
)


def randomise(pruner: S2HPruner, seed: int, scale: float = 2.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.copy_(torch.randn(u.shape, generator=gen) * scale)
    pruner.update_ranks()


def build(name, kwargs, shape, seed=0, target=0.5):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_chans=shape[1], **kwargs).eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left out of the search" noise for transformers
        pruner = S2HPruner(model, x, target_flops=target)
    randomise(pruner, seed)
    return model, pruner, x


def head_groups(pruner):
    return [g for g in pruner.groups if g.kind == "heads"]


def test_every_transformer_is_covered():
    assert {c[0] for c in CASES} == set(VISION_TRANSFORMERS)


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES, ids=[c[0] for c in CASES])
def test_hard_network_is_exported_network(name, kwargs, shape):
    model, pruner, x = build(name, kwargs, shape, seed=len(name))
    assert pruner.sliced_hard, pruner.unsliceable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with pruner.mode("hard", sliced=False):
            masked = model(x)
        with pruner.mode("hard", sliced=True):
            sliced = model(x)
    exported = pruner.export().eval()
    with torch.no_grad():
        pruned_out = exported(x)
    scale = masked.abs().max().clamp_min(1e-6)
    diff = float((masked - pruned_out).abs().max() / scale)
    assert diff <= 1e-4, "hard network != exported network"
    assert (sliced - pruned_out).abs().max() <= 1e-4 * scale, "sliced hard != exported"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # heads are really removed, and the exported model is the original class that runs as usual
    assert type(exported) is type(model)
    modules = dict(exported.named_modules())
    kept = pruner.kept_widths()
    assert any(kept[g.name] < g.channels for g in head_groups(pruner))
    for g in pruner.groups:
        if g.kind == "heads":
            attn = modules[g.name]
            assert attn.num_heads == kept[g.name]
            assert attn.qkv.out_features == 3 * kept[g.name] * g.head_dim
            assert attn.proj.in_features == kept[g.name] * g.head_dim
            if hasattr(attn, "attn_dim"):
                assert attn.attn_dim == kept[g.name] * g.head_dim
            table = getattr(attn, "relative_position_bias_table", None)
            assert table is None or table.shape[1] == kept[g.name]
        else:
            assert modules[g.root_module].out_features == kept[g.name]  # MLP fc1
    with torch.no_grad():
        assert exported(x[:1]).shape == (1, 10)

    # FLOPs and parameters agree with the independent counters
    counted = count_flops(exported, x)
    predicted = pruner.ratio("hard") * pruner.resources.full_flops
    assert counted < pruner.resources.full_flops
    assert predicted == pytest.approx(counted, rel=0.01)
    predicted_params = float(pruner.params("hard").detach())
    assert predicted_params == pytest.approx(count_params(exported), rel=0.01)
    print(f"{name}: max diff {diff:.2e} of the output scale, FLOPs {predicted:.0f} predicted "
          f"vs {counted} counted ({predicted / counted - 1:+.2e}), ratio "
          f"{counted / pruner.resources.full_flops:.3f}")


def test_head_and_mlp_groups_of_a_vit():
    model, pruner, _ = build("vit_fmnist", {}, (1, 1, 28, 28))
    blocks = model.blocks
    heads = head_groups(pruner)
    assert [g.name for g in heads] == [f"blocks.{i}.attn" for i in range(len(blocks))]
    mlps = [g for g in pruner.groups if g.kind == "channels"]
    assert sorted(g.name for g in mlps) == sorted(f"blocks.{i}.mlp.fc1" for i in range(len(blocks)))
    attn = blocks[0].attn
    g = heads[0]
    width = attn.num_heads * attn.head_dim
    assert g.channels == attn.num_heads and g.candidates == list(range(1, attn.num_heads + 1))
    assert g.head_dim == attn.head_dim
    # q, k and v rows count for FLOPs and importance; the mask acts on the v rows only
    (producer,) = g.producers
    assert producer.module_name == "blocks.0.attn.qkv" and len(producer.module_idxs) == 3 * width
    (site,) = g.mask_sites
    assert site.module_idxs == list(range(2 * width, 3 * width))
    assert site.root_idxs == [h for h in range(attn.num_heads) for _ in range(attn.head_dim)]
    (consumer,) = g.consumers
    assert consumer.module_name == "blocks.0.attn.proj"
    # the embedding width (residual stream) is never searched
    assert all("patch_embed" not in g.name and "proj" not in g.name for g in pruner.groups)


@pytest.mark.parametrize("case", [CASES[0], SMALL_SWIN], ids=["vit_fmnist", "swin"])
def test_masked_head_outputs_exactly_zero(case):
    model, pruner, x = build(*case, seed=3)
    kept = pruner.kept_channels()
    inputs = {}
    handles = [
        model.get_submodule(f"{g.name}.proj").register_forward_pre_hook(
            lambda m, args, name=g.name: inputs.__setitem__(name, args[0])
        )
        for g in head_groups(pruner)
    ]
    try:
        with torch.no_grad(), pruner.mode("hard", sliced=False):
            model(x)
    finally:
        for h in handles:
            h.remove()
    pruned_some = False
    for g in head_groups(pruner):
        per_head = inputs[g.name].unflatten(-1, (g.channels, g.head_dim))
        for h in range(g.channels):
            if h in kept[g.name]:
                assert per_head[..., h, :].abs().max() > 0
            else:
                pruned_some = True
                assert torch.equal(per_head[..., h, :], torch.zeros_like(per_head[..., h, :]))
    assert pruned_some


@pytest.mark.parametrize("case", [CASES[0], SMALL_SWIN], ids=["vit_fmnist", "swin"])
def test_sliced_heads_equal_masked_heads_in_training(case):
    model, pruner, x = build(*case, seed=4)
    full = pruner.resources.full_flops  # on x, the example input
    model.train()
    weights = list(model.parameters())
    masks = pruner.mask_parameters()
    results = []
    for sliced in (False, True):
        torch.manual_seed(1)  # the same stochastic depth draws (Swin) in both paths
        with pruner.mode("hard", sliced=sliced):
            out = model(x)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        grads = torch.autograd.grad(loss, weights + masks, allow_unused=True)
        results.append((out.detach(), grads))
    (out_m, grads_m), (out_s, grads_s) = results
    assert (out_m - out_s).abs().max() <= 1e-4 * out_m.abs().max()
    for part in (slice(0, len(weights)), slice(len(weights), None)):
        gm = torch.cat([g.reshape(-1) for g in grads_m[part] if g is not None])
        gs = torch.cat([g.reshape(-1) for g in grads_s[part] if g is not None])
        assert gm.norm() > 0
        assert (gm - gs).norm() <= 1e-3 * gm.norm()
    # Swin's bias table gets gradient only on the kept heads' columns, in both paths
    for g in head_groups(pruner):
        table = model.get_submodule(g.name)._parameters.get("relative_position_bias_table")
        pruned = sorted(set(range(g.channels)) - set(pruner.kept_channels()[g.name]))
        if table is not None and pruned:
            index = next(i for i, w in enumerate(weights) if w is table)
            assert torch.equal(grads_s[index][:, pruned], grads_m[index][:, pruned])
            assert grads_s[index][:, pruned].abs().max() == 0
    # and the sliced forward computes the kept heads and MLP units only
    with pruner.mode("hard", sliced=True):
        assert count_flops(model, x) == pytest.approx(pruner.ratio("hard") * full, rel=0.01)


def test_vit_fmnist_trains_in_joint_and_hard_phases():
    torch.manual_seed(0)
    model = create_model("vit_fmnist", num_classes=10, in_chans=1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    pruner = S2HPruner(model, x[:1], target_flops=0.35, separate_hard_bn_stats=True)
    cfg = RunConfig(model="vit_fmnist", target_flops=0.35, optimizer="adamw", lr=1e-3, freeze=0.34)
    trainer, _ = build_trainer(cfg, model, pruner, total_steps=3)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    masks = pruner.mask_parameters()
    logits = [u.detach().clone() for u in masks]
    model.train()
    phases = []
    for _ in range(3):
        phases.append(trainer.phase())
        losses = trainer.step(x, y)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert phases == ["joint", "joint", "freeze"]
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(logits, masks, strict=True))
    exported = pruner.export().eval()
    with torch.no_grad():
        assert exported(x).shape == (8, 10)


def test_run_loop_builds_a_transformer_at_the_data_image_size():
    cfg = RunConfig(model="vit_fmnist", dataset="fashion-mnist")
    spec = dataset_spec("fashion-mnist")
    model, pruner, example = build_model_and_pruner(cfg, spec, torch.device("cpu"))
    assert model.patch_embed.img_size == (spec.image_size, spec.image_size)
    assert len(head_groups(pruner)) == len(model.blocks)
    # image_size becomes img_size for transformers (unless given), and is ignored by CNNs
    assert create_model("vit_fmnist", image_size=32).patch_embed.img_size == (32, 32)
    assert create_model("vit_fmnist", image_size=32, img_size=16).patch_embed.img_size == (16, 16)
    create_model("resnet20", image_size=32)


def test_unsupported_attention_keeps_its_heads_with_a_warning():
    from timm.layers import Attention

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 16)
            self.attn = Attention(16, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            x = self.attn(self.embed(x))
            return self.head(self.fc2(torch.relu(self.fc1(x))).mean(1))

    with pytest.warns(UserWarning, match="'attn' keeps all its heads: its scale_norm"):
        pruner = S2HPruner(Net(), torch.randn(2, 5, 4))
    assert "fc1" in [g.name for g in pruner.groups]
    assert not any(p.module_name.startswith("attn.") for g in pruner.groups for p in g.producers)
    assert not [g for g in pruner.groups if g.kind == "heads"]
