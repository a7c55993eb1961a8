"""Every config shipped under configs/ parses, validates and names a real model and data set."""

from pathlib import Path

import pytest

from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import list_datasets
from s2hpruner.app.models import MODELS, list_models

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))


def test_paper_configs_cover_the_papers_experiments():
    names = {p.stem for p in CONFIGS}
    for model in ("resnet50", "mobilenet_v3_large", "wrn28_10"):
        for target in (15, 35, 55):
            assert f"cifar100_{model}_{target}" in names
    assert any(n.startswith("tiny_imagenet_") for n in names)
    assert any(n.startswith("imagenet_resnet50") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = RunConfig.from_yaml(path).validate()
    assert cfg.dataset in list_datasets()
    assert cfg.model in set(MODELS) | set(list_models(include_torchvision=True)), cfg.model


def _final_map(model, x):
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = output.shape  # returns None: the output is left as it is

    handle = model.features.register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    return tuple(seen["shape"][-2:])


def test_mobilenet_v3_cifar_stem_keeps_4x4_maps_and_exports_exactly():
    """The CIFAR-100 MobileNetV3 configs use ``cifar_stem``: total stride 8, so 32x32 inputs end
    on 4x4 maps (1x1 without it), and the pruner still exports exactly the hard network."""
    import torch

    from s2hpruner import S2HPruner, count_flops
    from s2hpruner.app.models import create_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    default = create_model("mobilenet_v3_large", num_classes=100, in_chans=3).eval()
    model = create_model("mobilenet_v3_large", num_classes=100, in_chans=3, cifar_stem=True)
    with torch.no_grad():
        assert _final_map(default, x) == (1, 1)
        assert _final_map(model.eval(), x) == (4, 4)

    p = S2HPruner(model, x[:1], target_flops=0.5)
    for u in p.mask_parameters():
        u.data.normal_(0, 1.5)
    p.update_ranks()
    with torch.no_grad():
        model.train()  # give the hard network's BN statistics non-trivial values
        with p.mode("hard"):
            model(torch.randn(8, 3, 32, 32))
        model.eval()
        with p.mode("hard"):
            hard = model(x)
        exported = p.export().eval()
        out = exported(x)
    assert torch.isfinite(hard).all()
    scale = hard.abs().max().item()
    assert (out - hard).abs().max().item() <= 1e-4 * scale
    ratio = count_flops(exported, x[:1]) / p.resources.full_flops
    assert abs(ratio - p.ratio("hard")) <= 0.01
    assert ratio < 0.99  # the random widths really pruned something


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if "mobilenet_v3" in p.stem], ids=lambda p: p.stem
)
def test_cifar_mobilenet_configs_use_the_cifar_stem(path):
    cfg = RunConfig.from_yaml(path)
    if cfg.dataset.startswith("cifar"):
        assert cfg.model_kwargs.get("cifar_stem") is True


@pytest.mark.parametrize(
    "path",
    [p for p in CONFIGS if p.parent.name == "paper" and ("deit" in p.stem or "swin" in p.stem)],
    ids=lambda p: p.stem,
)
def test_paper_transformer_configs_use_adamw_with_warmup(path):
    cfg = RunConfig.from_yaml(path).validate()
    assert cfg.optimizer == "adamw"
    assert cfg.weight_decay == pytest.approx(0.05)
    assert cfg.lr_warmup_steps > 0
    assert cfg.label_smoothing == pytest.approx(0.1)


PAPER_LABEL = (
    "# This project's recipe at the paper's setting "
    "(the paper's own hyper-parameters are not public)."
)


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.parent.name == "paper"], ids=lambda p: p.stem
)
def test_paper_configs_are_labelled_as_this_projects_recipes(path):
    assert path.read_text().splitlines()[0] == PAPER_LABEL
    assert (path.parent / "README.md").is_file()
