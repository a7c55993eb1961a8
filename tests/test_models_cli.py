"""torchvision's ViTs at the data's image size, model_kwargs that name the data's arguments,
and the `s2hpruner models` / `s2hpruner datasets` listings. Nothing here trains."""

from __future__ import annotations

import pytest
import torch

from s2hpruner.app.cli import main
from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec, list_datasets
from s2hpruner.app.models import (
    ModelSpecError,
    create_model,
    list_models,
    torchvision_vit_patch_size,
)
from s2hpruner.app.run import build_model

CPU = torch.device("cpu")

# --------------------------------------------------------------------------- torchvision ViTs


def test_torchvision_vit_is_built_at_the_image_size_and_runs_on_it():
    """It used to be built at 224 px whatever image_size said, and failed on 32x32 input."""
    model = create_model("vit_b_16", num_classes=7, in_chans=1, image_size=32)
    assert model.image_size == 32 and model.seq_length == (32 // 16) ** 2 + 1
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_vit_keeps_224_without_an_image_size():
    assert torchvision_vit_patch_size("torchvision/vit_b_32") == 32
    assert create_model("torchvision/vit_b_32").image_size == 224


def test_torchvision_vit_patch_sizes_are_read_from_the_names():
    names = {n: torchvision_vit_patch_size(n) for n in ("vit_b_16", "vit_l_32", "vit_h_14")}
    assert names == {"vit_b_16": 16, "vit_l_32": 32, "vit_h_14": 14}
    for other in ("vit_fmnist", "vit_tiny_patch16_224", "resnet18", "swin_t", "vit_x_16"):
        assert torchvision_vit_patch_size(other) is None, other


@pytest.mark.parametrize(("size", "resize"), [(28, 32), (8, 16)])
def test_an_image_size_off_the_patch_grid_is_refused_with_what_to_do(size, resize):
    """Fashion-MNIST's 28 px and digits' 8 px are no multiples of vit_b_16's fixed 16."""
    with pytest.raises(ModelSpecError) as info:
        create_model("vit_b_16", in_chans=1, image_size=size)
    message = str(info.value)
    assert f"{size}x{size}" in message and "16x16 patches" in message
    assert "vit_fmnist" in message and "patch_size" in message
    assert f"--image-size {resize}" in message


def test_patch_size_of_a_torchvision_vit_is_refused_clearly():
    """torchvision's builders fix it: passing it was a raw 'multiple values' TypeError."""
    with pytest.raises(ModelSpecError, match="fixed patch size of 16"):
        create_model("vit_b_16", image_size=32, patch_size=4)


def test_prune_of_vit_b_16_on_digits_says_how_to_fix_it(tmp_path, capsys):
    """The old message ("let its factory accept in_chans (and image_size)") pointed at a
    factory that is ours; the run stops before any training, with exit code 2."""
    code = main(["prune", "--model", "vit_b_16", "--dataset", "digits", "--out",
                 str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "16x16 patches" in err and "8x8" in err and "vit_fmnist" in err
    assert "let its factory accept" not in err


# --------------------------------------------------------------------------- model_kwargs


def test_model_kwargs_image_size_from_a_yaml_config_does_not_crash(tmp_path):
    """It was `TypeError: create_model() got multiple values for keyword argument
    'image_size'`. The rule: a model_kwargs entry named num_classes, in_chans or image_size
    wins over the data's value, as model_kwargs already win over img_size."""
    path = tmp_path / "run.yaml"
    path.write_text("model: resnet20\ndataset: digits\nmodel_kwargs:\n  image_size: 8\n"
                    "  width: 4\n")  # fmt: skip
    cfg = RunConfig.from_yaml(path)
    model = build_model(cfg, dataset_spec("digits"), CPU)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 1


def test_model_kwargs_image_size_wins_for_a_transformer():
    cfg = RunConfig(model="vit_fmnist", dataset="digits", model_kwargs={"image_size": 8})
    model = build_model(cfg, dataset_spec("digits"), CPU)
    assert model.patch_embed.img_size == (8, 8)


def test_model_kwargs_num_classes_and_in_chans_do_not_crash():
    kwargs = {"num_classes": 10, "in_chans": 1, "width": 4}
    model = build_model(RunConfig(model="resnet20", model_kwargs=kwargs),
                        dataset_spec("digits"), CPU)  # fmt: skip
    assert model.fc.out_features == 10 and model.conv1.in_channels == 1


def test_model_kwargs_that_do_not_fit_the_data_are_named():
    """The user's value wins, so one that misfits the data is caught by the model check."""
    spec = dataset_spec("digits")
    cfg = RunConfig(model="resnet20", model_kwargs={"num_classes": 5, "width": 4})
    with pytest.raises(ModelSpecError, match="gives 5 outputs but the data set has 10"):
        build_model(cfg, spec, CPU)
    cfg = RunConfig(model="vit_fmnist", model_kwargs={"image_size": 16})
    with pytest.raises(ModelSpecError, match="does not take the data's 1-channel 8x8"):
        build_model(cfg, spec, CPU)


# --------------------------------------------------------------------------- listings


def lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_models_lists_the_registry_sorted(capsys):
    assert main(["models"]) == 0
    out = lines(capsys)
    assert out == list_models() == sorted(out)
    assert {"resnet20", "resnet56", "vit_fmnist", "wrn16_4"} <= set(out)


def test_models_filter_by_substring_and_glob(capsys):
    assert main(["models", "resnet"]) == 0
    assert lines(capsys) == ["resnet20", "resnet50", "resnet56"]
    assert main(["models", "VIT*"]) == 0  # a glob, case-insensitive
    assert lines(capsys) == ["vit_fmnist", "vit_tiny_patch16_224"]
    assert main(["models", "--torchvision", "vit_b"]) == 0
    assert lines(capsys) == ["torchvision/vit_b_16", "torchvision/vit_b_32"]


def test_models_long_adds_a_description(capsys):
    assert main(["models", "--long", "resnet20"]) == 0
    (line,) = lines(capsys)
    assert line.startswith("resnet20  ") and "ResNet-20" in line


def test_models_without_a_match_prints_nothing_and_says_so(capsys):
    assert main(["models", "no_such_model"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no model name matches 'no_such_model'" in captured.err
    assert "--torchvision" in captured.err


def test_datasets_lists_the_registry_and_filters(capsys):
    assert main(["datasets"]) == 0
    out = lines(capsys)
    assert out == list_datasets() == sorted(out)
    assert {"fashion-mnist", "digits", "cifar10", "imagefolder"} <= set(out)
    assert main(["datasets", "mnist"]) == 0
    assert lines(capsys) == ["fashion-mnist", "mnist"]
    assert main(["datasets", "-l", "digits"]) == 0
    (line,) = lines(capsys)
    assert line.startswith("digits  ") and "10 classes, 1x8x8" in line


def test_a_timm_vit_off_its_patch_grid_is_refused_not_cropped():
    """timm drops the rows and columns past the last whole patch: a 16-px patch on 28x28
    images saw 16 of 28 rows. The error names a patch size that fits."""
    pytest.importorskip("timm")
    with pytest.raises(ModelSpecError, match=r"drop the last 12 rows.*patch_size: 4"):
        create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, image_size=28)
    model = create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, image_size=28,
                         patch_size=4)  # fmt: skip
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
