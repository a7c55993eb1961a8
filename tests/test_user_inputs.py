"""What users already have: image folders, model code, weights files and cached pretrained weights.

Every input is fabricated in its real format in tmp_path (PNG class folders, a .py model file, a
torch.save / safetensors file, a torch hub or Hugging Face cache); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from s2hpruner.app.data import (
    DataOptionError,
    ImageFiles,
    build_datasets,
    dataset_spec,
    folder_spec,
    list_datasets,
    resolve_val_size,
)
from s2hpruner.app.models import (
    ModelSpecError,
    create_model,
    load_factory,
    shadows_torchvision,
)
from s2hpruner.app.weights import (
    describe_state_dict_mismatch,
    load_init_weights,
    load_pretrained,
    read_state_dict,
    torchvision_cache_path,
)
from s2hpruner.core.errors import CheckpointError, DataFormatError, DataNotFoundError, S2HError

# --------------------------------------------------------------------------- image folders

CLASSES = ["zebra", "cat", "dog"]  # created unsorted: labels must follow sorted names


def code(label: int) -> int:
    """Grey level that stands for ``label``."""
    return 40 + 70 * label


def write_png(path: Path, label: int, size: tuple[int, int], grey: bool) -> np.ndarray:
    """A PNG whose (first channel's) level encodes the label, plus a little noise."""
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    w, h = size
    base = code(label) + rng.integers(-6, 7, (h, w))
    if grey:
        pixels = base.astype(np.uint8)
        Image.fromarray(pixels, "L").save(path)
    else:
        pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        pixels[..., 0] = base
        Image.fromarray(pixels, "RGB").save(path)
    return pixels


def make_folder(root: Path, per_class: int, size=(28, 28), grey=True) -> dict[str, np.ndarray]:
    """root/<class>/<i>.png for each class; returns {path: pixels}."""
    written = {}
    for name in CLASSES:
        label = sorted(CLASSES).index(name)
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"{i:03d}.png"
            written[str(path)] = write_png(path, label, size, grey)
    return written


def decode(x: torch.Tensor, spec) -> int:
    level = (x[0].mean().item() * spec.std[0] + spec.mean[0]) * 255
    return round((level - 40) / 70)


def test_imagefolder_is_registered():
    assert "imagefolder" in list_datasets()


def test_single_folder_layout_greyscale(tmp_path):
    written = make_folder(tmp_path / "data", per_class=12)
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / ".hidden").mkdir()  # hidden folders are not classes
    splits = build_datasets("imagefolder", str(tmp_path / "data"), val_size=None, seed=1)
    spec = splits.spec
    assert (spec.name, spec.num_classes, spec.in_chans, spec.image_size) == (
        "imagefolder",
        3,
        1,
        28,
    )
    # 36 images: test = round(3.6) = 4 held out with a fixed seed, val = round(0.1 * 32) = 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (29, 3, 4)
    everything = splits.train.samples + splits.val.samples + splits.test.samples
    assert sorted(p for p, _ in everything) == sorted(written)
    for path, label in everything:  # ImageFolder's rule: sorted class names -> 0, 1, 2
        assert sorted(CLASSES)[label] == Path(path).parent.name
    # mean/std measured on the training pool (train + val: 32 <= 500 images, so all of them)
    pool = np.stack([written[p] for p, _ in splits.train.samples + splits.val.samples]) / 255.0
    assert spec.mean == pytest.approx((pool.mean(),), abs=1e-4)
    assert spec.std == pytest.approx((pool.std(),), abs=1e-4)
    assert isinstance(splits.test, ImageFiles) and splits.test.mode == "L"
    for ds in (splits.val, splits.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            assert decode(x, spec) == y
    # the test split stays put when the seed or val_size move; val follows the seed
    other = build_datasets("imagefolder", str(tmp_path / "data"), val_size=5, seed=2)
    assert other.test.samples == splits.test.samples and len(other.val) == 5
    assert set(other.val.samples) != set(splits.val.samples)
    assert (
        dataset_spec("imagefolder", str(tmp_path / "data"))
        == spec
        == folder_spec(str(tmp_path / "data"))
    )


def test_train_test_layout_rgb_with_sizes_and_given_stats(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", per_class=6, size=(48, 40), grey=False)
    make_folder(root / "test", per_class=2, size=(48, 40), grey=False)
    make_folder(root / "val", per_class=1, size=(48, 40), grey=False)  # ignored: test/ wins
    write_png(root / "train" / "cat" / "grey.png", 0, (48, 40), grey=True)  # converted to RGB
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    splits = build_datasets("imagefolder", str(root), val_size=2, mean=mean, std=std)
    spec = splits.spec
    assert (spec.num_classes, spec.in_chans, spec.image_size) == (3, 3, 40)  # shorter side
    assert (spec.mean, spec.std) == (mean, std)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (17, 2, 6)
    assert all(Path(p).parts[-3] == "test" for p, _ in splits.test.samples)
    assert splits.test.targets == [0, 0, 1, 1, 2, 2]
    x, y = splits.test[0]
    assert x.shape == (3, 40, 40) and decode(x, spec) == y == 0
    grey = next(i for i, (p, _) in enumerate(splits.train.samples) if p.endswith("grey.png"))
    assert splits.train[grey][0].shape == (3, 40, 40)
    torch.manual_seed(0)  # training augmentation changes items, evaluation does not
    assert any(not torch.equal(splits.train[0][0], splits.train[0][0]) for _ in range(5))
    assert torch.equal(splits.val[0][0], splits.val[0][0])
    # an explicit image size; val/ is the test split when there is no test/
    (root / "test").rename(tmp_path / "elsewhere")
    small = build_datasets("imagefolder", str(root), image_size=16, augment=False)
    assert small.spec.image_size == 16 and small.train[0][0].shape == (3, 16, 16)
    assert all(Path(p).parts[-3] == "val" for p, _ in small.test.samples)
    assert len(small.test) == 3 and len(small.spec.mean) == 3


def test_grey_images_read_as_rgb_for_a_model_trained_that_way(tmp_path):
    """torchvision's ImageFolder converts every image to RGB, so a model trained on grey
    images with it takes 3 channels: ``in_chans=3`` gives it three equal channels."""
    make_folder(tmp_path, per_class=3)
    assert folder_spec(str(tmp_path)).in_chans == 1
    splits = build_datasets("imagefolder", str(tmp_path), val_size=None, augment=False,
                            in_chans=3)  # fmt: skip
    assert splits.spec.in_chans == 3 and len(splits.spec.mean) == 3
    assert len(set(splits.spec.mean)) == 1, "three copies of one grey channel"
    image, _ = splits.train[0]
    assert image.shape[0] == 3 and torch.equal(image[0], image[1])
    with pytest.raises(DataOptionError, match="in_chans must be 1 .* or 3 .*, got 2"):
        folder_spec(str(tmp_path), in_chans=2)
    with pytest.raises(DataOptionError, match="in_chans can only be set"):
        build_datasets("digits", in_chans=3)


def test_16_bit_greyscale_images_keep_their_range(tmp_path):
    """A 16-bit PNG spans 0..65535: it must come out spread over 0..1, not clipped to white
    (PIL's convert("L") clips every value above 255)."""
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    for name in CLASSES:
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(ramp).save(tmp_path / name / f"{i}.png")
    assert Image.open(tmp_path / "cat" / "0.png").mode.startswith("I")  # really 16 bits
    spec = folder_spec(str(tmp_path))
    assert spec.in_chans == 1 and abs(spec.mean[0] - 0.5) < 0.01 and spec.std[0] > 0.25
    from torchvision.transforms import v2

    files = ImageFiles([(str(tmp_path / "cat" / "0.png"), 0)], v2.PILToTensor(), mode="L")
    pixels = files[0][0].numpy()
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 1


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="nowhere.*does not exist"):
        build_datasets("imagefolder", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="no default data root"):
        build_datasets("imagefolder")
    with pytest.raises(DataNotFoundError, match="no default data root"):
        dataset_spec("imagefolder")
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "a.png", 0, (8, 8), True)
    with pytest.raises(DataNotFoundError, match="has no class folders"):
        build_datasets("imagefolder", str(tmp_path / "flat"))

    root = tmp_path / "data"
    make_folder(root / "train", per_class=3)
    make_folder(root / "test", per_class=1)
    (root / "train" / "empty_class").mkdir()
    (root / "train" / "empty_class" / "readme.md").write_text("no images here")
    with pytest.raises(DataNotFoundError, match="without images") as info:
        build_datasets("imagefolder", str(root))
    assert str(root / "train" / "empty_class") in str(info.value)
    (root / "train" / "empty_class" / "readme.md").unlink()
    (root / "train" / "empty_class").rmdir()

    (root / "test" / "cat").rename(root / "test" / "kitten")
    with pytest.raises(DataFormatError, match="only in train: cat; only in test: kitten"):
        build_datasets("imagefolder", str(root))
    (root / "test" / "kitten").rename(root / "test" / "cat")

    with pytest.raises(DataOptionError, match="1 channel"):
        build_datasets("imagefolder", str(root), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(DataOptionError, match="image_size"):
        build_datasets("imagefolder", str(root), image_size=0)
    (root / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    broken = build_datasets("imagefolder", str(root), val_size=None).test  # not in the sample
    index = next(i for i, (p, _) in enumerate(broken.samples) if p.endswith("broken.png"))
    with pytest.raises(DataFormatError, match="broken.png: cannot be read as an image"):
        broken[index]
    (root / "test" / "dog" / "broken.png").unlink()
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataFormatError, match="broken.png"):
        folder_spec(str(root))
    # the registered sets have a fixed size and normalisation
    with pytest.raises(DataOptionError, match="image_size can only be set"):
        build_datasets("digits", image_size=32)

    (tmp_path / "one" / "cat").mkdir(parents=True)
    write_png(tmp_path / "one" / "cat" / "a.png", 0, (8, 8), True)
    with pytest.raises(DataFormatError, match="too few"):
        build_datasets("imagefolder", str(tmp_path / "one"))


# --------------------------------------------------------------------------- val size


def test_resolve_val_size():
    assert resolve_val_size(None, 1438) == 144  # digits' training pool
    assert resolve_val_size(None, 60000) == 5000  # capped
    assert resolve_val_size(None, 3) == 0
    assert resolve_val_size(0.25, 100) == 25
    assert resolve_val_size(0, 100) == 0
    assert resolve_val_size(7, 100) == 7
    assert resolve_val_size(5000.0, 60000) == 5000  # a whole float is a count (YAML, CLI)
    assert resolve_val_size(1, 100) == 1
    assert resolve_val_size(1.0, 100) == 1  # (as --val-size 1 and YAML's 1 arrive)
    for bad in (2.5, -1, -0.1, float("nan")):
        with pytest.raises(DataOptionError):
            resolve_val_size(bad, 100)
    with pytest.raises(TypeError):
        resolve_val_size(True, 100)
    with pytest.raises(DataOptionError, match="only 1438 training images") as info:
        resolve_val_size(5000, 1438)
    assert isinstance(info.value, S2HError) and isinstance(info.value, ValueError)


def test_digits_val_size_default_and_too_big():
    splits = build_datasets("digits", val_size=None)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1438 - 144, 144, 359)
    with pytest.raises(DataOptionError, match="only 1438 training images"):
        build_datasets("digits", val_size=5000)


# --------------------------------------------------------------------------- user models

MODEL_FILE = """
import torch
from torch import nn

from my_blocks import head  # a sibling module: the file's folder is on sys.path


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_chans, width):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = head(width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def build(num_classes, in_chans=3, image_size=None, width=8):
    built_with.append(image_size)
    return TinyNet(num_classes, in_chans, width)


def build_any(**kwargs):
    return TinyNet(kwargs["num_classes"], 3, 4)


built_with = []
not_callable = 3


def not_a_model(num_classes):
    return "a string"
"""


@pytest.fixture
def model_file(tmp_path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "my_blocks.py").write_text(
        "from torch import nn\n\ndef head(width, n):\n    return nn.Linear(width, n)\n"
    )
    path = folder / "my_net.py"
    path.write_text(MODEL_FILE)
    return path


def test_file_factory(model_file):
    spec = f"{model_file}:build"
    model = create_model(spec, num_classes=5, in_chans=1, image_size=16, width=4)
    assert model.conv.in_channels == 1 and model.conv.out_channels == 4
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 5)
    module = sys.modules[type(model).__module__]
    assert module.built_with == [16]
    assert type(model).__module__.startswith("s2hpruner_user_my_net_")
    # a stable module name: same module (not re-executed) for the same unchanged file
    again = create_model(spec, num_classes=3, in_chans=1)
    assert type(again) is type(model) and module.built_with == [16, None]
    # picklable, since the module is registered under its name
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(copy.conv.weight, model.conv.weight)
    # a factory with only **kwargs gets num_classes
    assert create_model(f"{model_file}:build_any", num_classes=7).fc.out_features == 7


def test_module_factory(tmp_path, monkeypatch):
    package = tmp_path / "user_pkg_s2h"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "from torch import nn\n\n"
        "class Maker:\n"
        "    @staticmethod\n"
        "    def make(num_classes, img_size, hidden=6):\n"
        "        return nn.Sequential(nn.Flatten(), nn.Linear(img_size * img_size * 3, hidden),"
        " nn.ReLU(), nn.Linear(hidden, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("user_pkg_s2h.nets:Maker.make", num_classes=4, image_size=8, hidden=5)
    assert model[1].in_features == 8 * 8 * 3 and model[1].out_features == 5
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
    # torchvision's builders take num_classes through **kwargs
    resnet = create_model("torchvision.models:resnet18", num_classes=7)
    assert isinstance(resnet, torchvision.models.ResNet) and resnet.fc.out_features == 7


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("{dir}/missing.py:build", "missing.py does not exist"),
        ("no_such_module_s2h.nets:build", "cannot import module 'no_such_module_s2h.nets'"),
        ("{file}:nothing", "has no attribute 'nothing'; it defines: .*TinyNet"),
        ("{file}:not_callable", "not callable"),
        ("{file}:not_a_model", "returned a str, not a torch.nn.Module"),
        ("{file}:", "expected 'package.module:factory'"),
    ],
)
def test_model_spec_errors(model_file, spec, match):
    spec = spec.format(dir=model_file.parent, file=model_file)
    with pytest.raises(ModelSpecError, match=match) as info:
        create_model(spec, num_classes=3)
    assert isinstance(info.value, S2HError) and spec in str(info.value)


def test_model_spec_bad_kwargs_and_syntax_error(model_file, tmp_path):
    with pytest.raises(ModelSpecError, match="depth"):
        create_model(f"{model_file}:build", num_classes=3, depth=4)
    bad = tmp_path / "broken_net.py"
    bad.write_text("def build(:\n")
    with pytest.raises(ModelSpecError, match="fails to import"):
        load_factory(f"{bad}:build")


# --------------------------------------------------------------------------- weights files


def small_model(num_classes: int = 10) -> nn.Module:
    return create_model("resnet20", num_classes=num_classes, in_chans=1, width=4)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("wrap", "source", "prefix"),
    [
        (lambda m: m.state_dict(), "state dict", ""),
        (lambda m: {"model": m.state_dict(), "epoch": 3, "optimizer": {}}, "model", ""),
        (lambda m: {"model": {"state_dict": m.state_dict()}}, "model/state_dict", ""),
        (
            lambda m: {"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}},
            "state_dict",
            "module./_orig_mod.",
        ),
        (
            lambda m: {f"_orig_mod.module.{k}": v for k, v in m.state_dict().items()},
            "state dict",
            "module./_orig_mod.",
        ),
        (  # Lightning prefixes keys with the LightningModule's attribute name
            lambda m: {"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}},
            "state_dict",
            "model.",
        ),
        (  # ... beside other state of the LightningModule (a loss's class weights)
            lambda m: {"state_dict": {**{f"model.{k}": v for k, v in m.state_dict().items()},
                                      "criterion.weight": torch.ones(10)}},
            "state_dict",
            "model.",
        ),  # fmt: skip
        (  # ... beside a distillation teacher: a larger model holding every key of this one
            lambda m: {"state_dict": {**{f"model.{k}": v for k, v in m.state_dict().items()},
                                      **{f"teacher.{k}": v + 1 for k, v in m.state_dict().items()},
                                      "teacher.extra.weight": torch.ones(3)}},
            "state_dict",
            "model.",
        ),  # fmt: skip
        (lambda m: m, "pickled module", ""),
        (  # Python objects beside the weights: needs weights_only=False
            lambda m: {"args": argparse.Namespace(lr=0.1), "state_dict_ema": m.state_dict()},
            "state_dict_ema",
            "",
        ),
    ],
    ids=["plain", "model-key", "nested", "ddp", "compiled-ddp", "lightning", "lightning-extra",
         "lightning-teacher", "module", "namespace"],  # fmt: skip
)
def test_load_init_weights_round_trip(tmp_path, wrap, source, prefix):
    trained = small_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    path = tmp_path / "weights.pth"
    torch.save(wrap(trained), path)
    fresh = small_model()
    assert not same_weights(fresh, trained)
    summary = load_init_weights(fresh, path)
    assert same_weights(fresh, trained)
    assert summary == {
        "path": str(path),
        "source": source,
        "tensors": len(trained.state_dict()),
        "stripped_prefix": prefix,
    }


def test_two_sets_of_weights_that_fit_are_refused_not_guessed(tmp_path):
    """A LightningModule with its model and an EMA copy: either could be meant."""
    model = small_model()
    state = {f"{p}.{k}": v.clone() + i for i, p in enumerate(("model", "ema"))
             for k, v in model.state_dict().items()}  # fmt: skip
    torch.save({"state_dict": state}, tmp_path / "two.ckpt")
    with pytest.raises(CheckpointError, match=r"more than one set .* \(under 'model\.', 'ema\.'\)"):
        load_init_weights(small_model(), tmp_path / "two.ckpt")


def test_load_init_weights_safetensors(tmp_path):
    from safetensors.torch import save_file

    trained = small_model()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    fresh = small_model()
    assert load_init_weights(fresh, path)["source"] == "safetensors"
    assert same_weights(fresh, trained)


def test_user_file_model_pickled_whole(tmp_path, model_file):
    spec = f"{model_file}:build"
    trained = create_model(spec, num_classes=3, in_chans=1, width=4)
    torch.save(trained, tmp_path / "whole.pt")
    fresh = create_model(spec, num_classes=3, in_chans=1, width=4)
    assert load_init_weights(fresh, tmp_path / "whole.pt")["source"] == "pickled module"
    assert same_weights(fresh, trained)


def test_mismatch_names_missing_unexpected_and_misshaped_keys(tmp_path):
    state = dict(small_model().state_dict())
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(7, 16)
    torch.save(state, tmp_path / "w.pt")
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_init_weights(model, tmp_path / "w.pt")
    message = str(info.value)
    assert str(tmp_path / "w.pt") in message
    assert "1 missing key(s): layer1.0.conv1.weight" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "1 mis-shaped key(s): fc.weight: checkpoint (7, 16) vs model (10, 16)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    # long lists are cut to 10 names plus a count
    many = describe_state_dict_mismatch({}, {f"w{i}": torch.zeros(1) for i in range(25)})
    assert many.startswith("25 missing key(s): w0, w1,") and many.endswith("w9 and 15 more")
    assert describe_state_dict_mismatch(state, state) is None


def test_weights_of_torchvisions_model_for_ours_of_the_same_name_name_the_prefix(tmp_path):
    """Our resnet50 (CIFAR stem) hides torchvision's: weights trained on torchvision's do not
    fit it, and the error says which spelling builds the model they fit."""
    state = torchvision.models.resnet50(num_classes=10).state_dict()
    torch.save(state, tmp_path / "tv.pt")
    with pytest.raises(CheckpointError, match="use --model torchvision/resnet50"):
        load_init_weights(create_model("resnet50"), tmp_path / "tv.pt", "resnet50")
    tv = create_model("torchvision/resnet50")
    loaded = load_init_weights(tv, tmp_path / "tv.pt", "torchvision/resnet50")
    assert loaded["tensors"] == len(state)
    with pytest.raises(CheckpointError) as info:  # a registry name torchvision has not
        load_init_weights(create_model("resnet20"), tmp_path / "tv.pt", "resnet20")
    assert "torchvision/" not in str(info.value)


def test_unreadable_weights_files(tmp_path):
    model = small_model()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    cases = {
        "cut.pt": good.read_bytes()[: good.stat().st_size // 2],
        "garbage.pt": b"this is not a checkpoint" * 10,
        "empty.pth": b"",
        "bad.safetensors": b"\x00" * 64,
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(CheckpointError) as info:
            load_init_weights(model, tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1), "notes": "x"}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(tmp_path / "nostate.pt")


# --------------------------------------------------------------------------- pretrained


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub"


def test_pretrained_torchvision_from_cache(hub):
    path = torchvision_cache_path("mobilenet_v3_small")
    assert path == hub / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    with pytest.raises(CheckpointError) as info:
        load_pretrained("mobilenet_v3_small", create_model("mobilenet_v3_small"))
    assert f"expected {path}" in str(info.value) and "download.pytorch.org" in str(info.value)

    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v3_small(weights=None)  # 1000 classes, RGB
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    same = create_model("mobilenet_v3_small", num_classes=1000, in_chans=3)
    summary = load_pretrained("mobilenet_v3_small", same)
    assert same_weights(same, reference)
    assert summary["fresh"] == [] and summary["adapted"] == [] and summary["path"] == str(path)

    # the user's data: 10 classes, greyscale
    model = create_model("mobilenet_v3_small", num_classes=10, in_chans=1)
    head = model.classifier[3].weight.clone()
    summary = load_pretrained("mobilenet_v3_small", model)
    assert summary["fresh"] == ["classifier.3.weight", "classifier.3.bias"]
    assert summary["adapted"] == ["features.0.0.weight"]
    ref = reference.state_dict()
    got = model.state_dict()
    assert torch.equal(got["features.0.0.weight"], ref["features.0.0.weight"].sum(1, True))
    assert torch.equal(got["classifier.3.weight"], head)
    for key, value in ref.items():
        if not key.startswith(("classifier.3.", "features.0.0.weight")):
            assert torch.equal(got[key], value), key
    assert summary["tensors"] == len(got) - 2


def test_pretrained_errors(hub):
    with pytest.raises(CheckpointError, match="no pretrained weights known for model 'resnet20'"):
        load_pretrained("resnet20", small_model())
    # weights of another architecture: named keys; no hint to torchvision's model, which our
    # mobilenet_v3_small is (the hint is for names ours builds differently: resnet50, below)
    path = torchvision_cache_path("mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained("mobilenet_v3_small", create_model("mobilenet_v3_small"))
    message = str(info.value)
    assert "missing key(s): features.0.1.weight" in message
    assert "1 unexpected key(s): features.0.weight" in message
    assert "torchvision/" not in message
    assert not shadows_torchvision("mobilenet_v3_small") and shadows_torchvision("vgg19_bn")


def test_pretrained_weights_of_another_stem_are_refused_not_half_loaded(hub):
    """The registry's resnet50 has a 3x3 stem for 32x32 images; torchvision's ImageNet weights
    have a 7x7 one. Loading all but the stem would train a fresh stem under ImageNet layers."""
    path = torchvision_cache_path("resnet50")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained("resnet50", create_model("resnet50", num_classes=10))
    message = str(info.value)
    assert "another stem (conv1.weight: weights (64, 3, 7, 7) vs model (64, 3, 3, 3))" in message
    assert "'torchvision/resnet50'" in message
    model = create_model("torchvision/resnet50", num_classes=10, in_chans=1)
    assert load_pretrained("torchvision/resnet50", model)["adapted"] == ["conv1.weight"]


def test_pretrained_torchvision_vit_at_another_image_size_gets_its_embedding_resampled(hub):
    """torchvision's ViT weights are made at 224 px (a 14x14 patch grid); a ViT built for the
    data's 32 px has a 2x2 grid. The position embedding is resampled as torchvision's own
    ``interpolate_embeddings`` does; everything else loads as it is. (A small ViT of the same
    layout stands in for vit_b_16's 330 MB of weights.)"""
    from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

    def vit(image_size: int, num_classes: int) -> VisionTransformer:
        return VisionTransformer(image_size=image_size, patch_size=16, num_layers=1, num_heads=2,
                                 hidden_dim=8, mlp_dim=16, num_classes=num_classes)  # fmt: skip

    torch.manual_seed(3)
    reference = vit(224, 1000)
    path = torchvision_cache_path("vit_b_16")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = vit(32, 10)
    summary = load_pretrained("vit_b_16", model)
    assert summary["adapted"] == ["encoder.pos_embedding"]
    assert summary["fresh"] == ["heads.head.weight", "heads.head.bias"]
    got, ref = model.state_dict(), reference.state_dict()
    resampled = interpolate_embeddings(32, 16, reference.state_dict())["encoder.pos_embedding"]
    assert got["encoder.pos_embedding"].shape == (1, 5, 8)
    assert torch.equal(got["encoder.pos_embedding"], resampled)
    assert torch.equal(got["encoder.pos_embedding"][:, 0], ref["encoder.pos_embedding"][:, 0])
    for key, value in ref.items():
        if not key.startswith(("heads.", "encoder.pos_embedding")):
            assert torch.equal(got[key], value), key
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # another width is not a resampling: it is named as a mis-shaped key
    with pytest.raises(CheckpointError, match="encoder.pos_embedding: checkpoint"):
        load_pretrained("vit_b_16", VisionTransformer(32, 16, 1, 2, 4, 16, num_classes=10))


def fake_hf_cache(cache: Path, repo: str, state: dict) -> Path:
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_pretrained_timm_from_hf_cache(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    name = "vit_tiny_patch16_224"
    model = create_model(name, num_classes=10, in_chans=3, image_size=224, depth=2)
    repo = model.pretrained_cfg["hf_hub_id"]
    with pytest.raises(CheckpointError) as info:
        load_pretrained(name, model)
    assert str(tmp_path / "hf" / f"models--{repo.replace('/', '--')}") in str(info.value)

    torch.manual_seed(2)
    reference = timm.create_model(name, pretrained=False, depth=2)  # 1000 classes
    path = fake_hf_cache(tmp_path / "hf", repo, reference.state_dict())
    summary = load_pretrained(name, model)
    assert summary["path"] == str(path)
    assert summary["fresh"] == ["head.weight", "head.bias"] and summary["adapted"] == []
    ref, got = reference.state_dict(), model.state_dict()
    for key, value in ref.items():
        if not key.startswith("head."):
            assert torch.equal(got[key], value), key


def test_any_timm_model_by_name(tmp_path, monkeypatch):
    """``timm/<name>``: a timm CNN at the data's classes and channels (it takes no img_size and
    runs at any size), a ViT at the data's image size, the patch rule, an unknown name, and
    --pretrained reading the model's weights from the Hugging Face cache."""
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants

    from s2hpruner.app.models import ModelSpecError

    cnn = create_model("timm/resnet10t", num_classes=10, in_chans=1, image_size=28)
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    vit = create_model("timm/vit_tiny_patch16_224", num_classes=10, in_chans=1, image_size=32,
                       patch_size=4, depth=2)  # fmt: skip
    assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ModelSpecError, match="patch_size: 4"):
        create_model("timm/vit_tiny_patch16_224", num_classes=10, in_chans=1, image_size=28)
    with pytest.raises(ModelSpecError, match="timm has no model 'resnet_nope'"):
        create_model("timm/resnet_nope")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    torch.manual_seed(3)
    reference = timm.create_model("resnet10t", pretrained=False)  # 1000 classes, RGB
    fake_hf_cache(tmp_path / "hf", cnn.pretrained_cfg["hf_hub_id"], reference.state_dict())
    summary = load_pretrained("timm/resnet10t", cnn)
    assert summary["fresh"] == ["fc.weight", "fc.bias"]
    assert summary["adapted"] == ["conv1.0.weight"]
    stem = reference.state_dict()["conv1.0.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(cnn.state_dict()["conv1.0.weight"], stem)


def test_a_model_that_ignores_the_datas_channels_or_classes_is_named_before_tracing(tmp_path):
    """A factory with hard-coded channels or classes: the run stops with what to fix, not
    with a tracing error about channel shuffles or an index error in the loss."""
    from s2hpruner.app.data import DataSpec
    from s2hpruner.app.models import ModelSpecError
    from s2hpruner.app.run import check_model_fits_data

    spec = DataSpec("imagefolder", num_classes=10, in_chans=1, image_size=16, mean=(0.5,),
                    std=(0.2,))  # fmt: skip
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ModelSpecError, match="1-channel 16x16 images .* --in-chans"):
        check_model_fits_data(rgb, "mine.py:Net", spec)
    thousand = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 1000))  # fmt: skip
    with pytest.raises(ModelSpecError, match="gives 1000 outputs but the data set has 10"):
        check_model_fits_data(thousand, "mine.py:Net", spec)
    fits = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))  # fmt: skip
    before = {k: v.clone() for k, v in fits.state_dict().items()}
    check_model_fits_data(fits, "mine.py:Net", spec)
    assert fits.training and all(torch.equal(before[k], v) for k, v in fits.state_dict().items())
