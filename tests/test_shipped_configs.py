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
