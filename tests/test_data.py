"""Every data-set loader, run on tiny data sets written in the real on-disk formats.

Each fabricated image encodes its label in its pixels (a centre block for the small sets, the
red channel for the JPEG sets), so a test can check that labels survive loading and splitting.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from s2hpruner.app.data import (
    DATASETS,
    ArrayImages,
    DataFormatError,
    DataSpec,
    DataSplits,
    ImageFiles,
    build_datasets,
    dataset_spec,
    default_data_root,
    list_datasets,
    read_idx,
)
from s2hpruner.core.errors import DataNotFoundError, S2HError, UnknownNameError

ALL_NAMES = ["cifar10", "cifar100", "digits", "fashion-mnist", "imagefolder", "imagenet", "mnist",
             "tiny-imagenet"]  # fmt: skip
STATIC_NAMES = [n for n in ALL_NAMES if n != "imagefolder"]  # its spec is read from the folder
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def code(label: int) -> int:
    """Pixel value that stands for ``label`` (room for 10 labels in 0..255)."""
    return 15 + 24 * label


def decode_centre(x: torch.Tensor, spec: DataSpec) -> int:
    """Label from the centre pixel of a normalised item (survives crop-with-padding)."""
    h, w = x.shape[-2:]
    pixel = x[0, h // 2, w // 2].item() * spec.std[0] + spec.mean[0]
    return round((pixel * 255 - 15) / 24)


def encoded_images(labels: np.ndarray, chans: int, size: int, rng: np.random.Generator):
    """Random noise (so augmentation shows) with a label-coded centre block."""
    images = rng.integers(0, 256, (len(labels), chans, size, size), dtype=np.uint8)
    lo, hi = size // 2 - 5, size // 2 + 5
    images[:, :, lo:hi, lo:hi] = np.array([code(y) for y in labels], np.uint8)[:, None, None, None]
    return images


def keys(dataset) -> list:
    """Something that identifies each item's source, to compare splits."""
    if isinstance(dataset, ArrayImages):
        return [bytes(img.numpy().tobytes()) for img in dataset.images]
    return [path for path, _ in dataset.samples]


def check_splits(splits: DataSplits, n_train_files: int, n_val: int, n_test: int, decode):
    """Sizes add up, items are well formed, labels decode, augmentation only hits train."""
    assert isinstance(splits, DataSplits)
    assert len(splits.val) == n_val
    assert len(splits.train) + len(splits.val) == n_train_files
    assert len(splits.test) == n_test
    train_keys, val_keys = keys(splits.train), keys(splits.val)
    assert not set(train_keys) & set(val_keys)
    assert len(set(train_keys) | set(val_keys)) == n_train_files
    spec = splits.spec
    shape = (spec.in_chans, spec.image_size, spec.image_size)
    for ds in (splits.train, splits.val, splits.test):
        for i in range(min(len(ds), 8)):
            x, y = ds[i]
            assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == shape
            assert type(y) is int and 0 <= y < spec.num_classes
            assert decode(x, spec) == y, f"item {i}: label {y} but pixels say {decode(x, spec)}"
    # augmentation changes a train item between calls, never a val/test item
    torch.manual_seed(0)
    assert any(not torch.equal(splits.train[0][0], splits.train[0][0]) for _ in range(10))
    assert torch.equal(splits.val[0][0], splits.val[0][0])
    assert torch.equal(splits.test[0][0], splits.test[0][0])


# --------------------------------------------------------------------------- registry


def test_registry_names_and_specs_without_files():
    assert list_datasets() == ALL_NAMES == sorted(DATASETS)
    for name in STATIC_NAMES:
        spec = dataset_spec(name)
        assert spec.name == name and len(spec.mean) == len(spec.std) == spec.in_chans
    fm = dataset_spec("fashion-mnist")
    assert (fm.num_classes, fm.in_chans, fm.image_size) == (10, 1, 28)
    assert (fm.mean, fm.std) == ((0.2860,), (0.3530,))
    assert dataset_spec("imagenet").image_size == 224
    assert dataset_spec("imagenet").num_classes == 1000
    assert dataset_spec("tiny-imagenet").num_classes == 200
    assert dataset_spec("cifar100").num_classes == 100
    assert dataset_spec("digits").image_size == 8


@pytest.mark.parametrize("call", [build_datasets, dataset_spec, default_data_root])
def test_unknown_name_lists_known_names(call):
    with pytest.raises(UnknownNameError) as info:
        call("fashion_mnist")
    message = str(info.value)
    assert "fashion_mnist" in message
    for name in ALL_NAMES:
        assert name in message


def test_default_data_roots():
    assert default_data_root("fashion-mnist") == FMNIST_ROOT
    mnist = "/usr/share/datasets/mnist"
    assert default_data_root("mnist") == (mnist if os.path.isdir(mnist) else None)
    for name in ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagenet", "imagefolder"):
        assert default_data_root(name) is None


def test_no_root_for_a_set_without_default_says_how_to_fix():
    with pytest.raises(DataNotFoundError, match="--data-root"):
        build_datasets("cifar10")


# --------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: 00 00 08 <ndim>, big-endian dims, uint8 data; gzip when path ends .gz."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_idx_root(root: Path, n_train: int = 50, n_test: int = 20) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = encoded_images(labels, 1, 28, rng)[:, 0]
        # one gzipped file, like Debian's, the rest plain: both must load
        suffix = ".gz" if split == "train" else ""
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_sets(tmp_path, name):
    root = make_idx_root(tmp_path / name)
    splits = build_datasets(name, str(root))
    assert splits.spec == dataset_spec(name)
    check_splits(splits, n_train_files=50, n_val=5, n_test=20, decode=decode_centre)
    # every test item, in file order, keeps its label
    labels = read_idx(str(root / "t10k-labels-idx1-ubyte"))
    assert splits.test.targets.tolist() == labels.tolist()


def test_val_split_is_seeded_and_sized(tmp_path):
    root = str(make_idx_root(tmp_path / "fm"))
    a = build_datasets("fashion-mnist", root, seed=3)
    b = build_datasets("fashion-mnist", root, seed=3)
    c = build_datasets("fashion-mnist", root, seed=4)
    assert keys(a.val) == keys(b.val) and keys(a.train) == keys(b.train)
    assert set(keys(a.val)) != set(keys(c.val))
    count = build_datasets("fashion-mnist", root, val_size=7)
    assert (len(count.train), len(count.val)) == (43, 7)
    none = build_datasets("fashion-mnist", root, val_size=0)
    assert (len(none.train), len(none.val)) == (50, 0)
    subset = build_datasets("fashion-mnist", root, seed=3, train_subset=10)
    assert keys(subset.train) == keys(a.train)[:10] and keys(subset.val) == keys(a.val)
    for bad in (1.5, -0.1, 50, -1):
        with pytest.raises(ValueError):
            build_datasets("fashion-mnist", root, val_size=bad)


def test_augment_off_gives_fixed_train_items(tmp_path):
    splits = build_datasets("fashion-mnist", str(make_idx_root(tmp_path)), augment=False)
    assert torch.equal(splits.train[0][0], splits.train[0][0])


def test_loader_batches(tmp_path):
    splits = build_datasets("fashion-mnist", str(make_idx_root(tmp_path)))
    x, y = next(iter(DataLoader(splits.train, batch_size=16, shuffle=True)))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_missing_idx_file_is_named(tmp_path):
    root = make_idx_root(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("fashion-mnist", str(root))
    message = str(info.value)
    assert str(root) in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root" in message


def test_missing_root_names_every_file(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("mnist", str(root))
    message = str(info.value)
    assert str(root) in message and "does not exist" in message
    for base in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        assert f"{base}-ubyte" in message


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda raw: b"\x12\x34" + raw[2:], "bad magic"),
        (lambda raw: raw[:-7], "size mismatch"),
        (lambda raw: raw + b"extra", "size mismatch"),
        (lambda raw: raw[:6], "truncated IDX header"),
    ],
)
def test_corrupt_idx_is_a_clear_error(tmp_path, damage, match):
    root = make_idx_root(tmp_path / "fm")
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataFormatError, match=match) as info:
        build_datasets("fashion-mnist", str(root))
    assert str(path) in str(info.value)
    assert isinstance(info.value, S2HError)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    root = make_idx_root(tmp_path / "fm")
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])  # cut download
    with pytest.raises(DataFormatError, match="corrupt"):
        build_datasets("fashion-mnist", str(root))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match="corrupt"):
        read_idx(str(path))


def test_idx_labels_must_match_images(tmp_path):
    root = make_idx_root(tmp_path / "fm")
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataFormatError, match="expected 20 labels"):
        build_datasets("fashion-mnist", str(root))


@pytest.mark.skipif(not os.path.isdir(FMNIST_ROOT), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    splits = build_datasets("fashion-mnist")
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.val) == 5000  # 10%, capped
    assert len(splits.test) == 10000
    assert splits.spec.num_classes == 10
    assert sorted(set(splits.test.targets.tolist())) == list(range(10))
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10


# --------------------------------------------------------------------------- digits


def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    by_pixels = {
        bytes(img.astype(np.uint8).tobytes()): int(y)
        for img, y in zip(bunch.images, bunch.target, strict=True)
    }

    def decode(x, spec):
        pixels = np.rint((x[0].numpy() * spec.std[0] + spec.mean[0]) * 16).astype(np.uint8)
        return by_pixels.get(pixels.tobytes(), -1)

    with pytest.raises(ValueError, match="reads no files"):  # a root it would ignore
        build_datasets("digits", data_root=str(tmp_path / "ignored"))
    splits = build_datasets("digits")
    # augmentation shifts pixels, so decode only un-augmented items
    plain = build_datasets("digits", augment=False)
    assert keys(plain.train) == keys(splits.train)
    for ds in (plain.train, plain.val, plain.test):
        for i in range(0, len(ds), 37):
            x, y = ds[i]
            assert decode(x, plain.spec) == y
    assert len(splits.test) == 359 and len(splits.train) + len(splits.val) == 1797 - 359
    assert len(splits.val) == round(0.1 * (1797 - 359))
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y < 10
    torch.manual_seed(0)
    assert any(not torch.equal(splits.train[0][0], splits.train[0][0]) for _ in range(10))
    assert torch.equal(splits.val[0][0], splits.val[0][0])
    # the test split does not move with the val seed
    other = build_datasets("digits", seed=5)
    assert keys(other.test) == keys(splits.test) and keys(other.val) != keys(splits.val)


# --------------------------------------------------------------------------- CIFAR


def write_cifar_batch(path: Path, labels: np.ndarray, label_key: bytes, old_numpy: bool) -> None:
    """A batch as in the official tarballs: a pickled dict with b'data' (N x 3072 uint8)."""
    rng = np.random.default_rng(len(labels) + len(path.name))
    data = encoded_images(labels, 3, 32, rng).reshape(len(labels), 3072)
    batch = {
        b"batch_label": b"fabricated",
        label_key: [int(y) for y in labels],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if old_numpy:  # what the official files hold: protocol 2 and numpy < 2 module names
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    else:
        raw = pickle.dumps(batch)
    path.write_bytes(raw)


def make_cifar10_root(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", (np.arange(6) + i) % 10, b"labels", True)
    write_cifar_batch(folder / "test_batch", np.arange(10), b"labels", False)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def test_cifar10(tmp_path):
    root = make_cifar10_root(tmp_path)
    splits = build_datasets("cifar10", str(root))
    check_splits(splits, n_train_files=30, n_val=3, n_test=10, decode=decode_centre)
    assert splits.test.targets.tolist() == list(range(10))
    # the root may also be the extracted folder itself
    inner = build_datasets("cifar10", str(root / "cifar-10-batches-py"))
    assert keys(inner.val) == keys(splits.val)


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_cifar_batch(folder / "train", rng.integers(0, 10, 40), b"fine_labels", True)
    write_cifar_batch(folder / "test", np.arange(10), b"fine_labels", False)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}, protocol=2))
    splits = build_datasets("cifar100", str(tmp_path), val_size=0.25)
    assert splits.spec.num_classes == 100
    check_splits(splits, n_train_files=40, n_val=10, n_test=10, decode=decode_centre)


def test_cifar_missing_batch_is_named(tmp_path):
    root = make_cifar10_root(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3") as info:
        build_datasets("cifar10", str(root))
    assert "data_batch_2" not in str(info.value) and str(root) in str(info.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = make_cifar10_root(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataFormatError, match="not allowed"):
        build_datasets("cifar10", str(root))


def test_cifar_bad_shape_is_a_clear_error(tmp_path):
    root = make_cifar10_root(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataFormatError, match="3072"):
        build_datasets("cifar10", str(root))


# --------------------------------------------------------------------------- JPEG folders


def write_jpeg(path: Path, label: int, size: tuple[int, int], grey: bool = False) -> None:
    """Red channel = the label's code; green/blue = noise, so crops and flips show."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    w, h = size
    if grey:  # some real Tiny ImageNet images are greyscale
        pixels = (code(label) + rng.integers(-4, 5, (h, w))).astype(np.uint8)
        Image.fromarray(pixels, "L").save(path, quality=95)
        return
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[..., 0] = code(label)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=95)


def decode_red(x: torch.Tensor, spec: DataSpec) -> int:
    red = x[0].mean().item() * spec.std[0] + spec.mean[0]
    return round((red * 255 - 15) / 24)


WNIDS = ["n01443537", "n01629819", "n02124075"]  # not sorted in wnids.txt, like the original


def make_tiny_imagenet(root: Path) -> Path:
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join([WNIDS[2], WNIDS[0], WNIDS[1]]) + "\n")
    for label, wnid in enumerate(WNIDS):  # labels follow sorted wnids
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for i in range(4):
            write_jpeg(images / f"{wnid}_{i}.JPEG", label, (64, 64), grey=(label == 0 and i == 3))
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for i in range(6):
        label = i % 3
        write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", label, (64, 64))
        lines.append(f"val_{i}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    splits = build_datasets("tiny-imagenet", str(root), val_size=3)
    assert isinstance(splits.train, ImageFiles)
    assert splits.spec.num_classes == 3 and splits.spec.image_size == 64
    check_splits(splits, n_train_files=12, n_val=3, n_test=6, decode=decode_red)
    assert splits.test.targets == [0, 1, 2, 0, 1, 2]
    for path, label in splits.train.samples + splits.val.samples:
        assert Path(path).parent.parent.name == WNIDS[label]
    grey = next(i for i, (p, _) in enumerate(splits.train.samples) if p.endswith("_3.JPEG"))
    assert splits.train[grey][0].shape == (3, 64, 64)


def test_tiny_imagenet_missing_annotations_is_named(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataNotFoundError, match="val/val_annotations.txt") as info:
        build_datasets("tiny-imagenet", str(root))
    assert "wnids.txt" not in str(info.value)


def test_tiny_imagenet_bad_annotation_is_a_clear_error(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny")
    with (root / "val" / "val_annotations.txt").open("a") as f:
        f.write("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataFormatError, match="n99999999"):
        build_datasets("tiny-imagenet", str(root))


def make_imagenet(root: Path) -> Path:
    for split, count in (("train", 3), ("val", 2)):
        for label, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                write_jpeg(folder / f"{wnid}_{i}.JPEG", label, (48 + 8 * i, 40))
    return root


def test_imagenet(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    splits = build_datasets("imagenet", str(root), val_size=2)
    assert splits.spec.num_classes == 3 and dataset_spec("imagenet").num_classes == 1000
    check_splits(splits, n_train_files=9, n_val=2, n_test=6, decode=decode_red)
    assert splits.test.targets == [0, 0, 1, 1, 2, 2]


def test_imagenet_layout_errors(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    (root / "val" / "n09999999").mkdir()
    with pytest.raises(DataFormatError, match="n09999999"):
        build_datasets("imagenet", str(root))
    with pytest.raises(DataNotFoundError, match="val/"):
        build_datasets("imagenet", str(root / "train"))


def test_split_seed_fixes_the_split_whatever_the_run_seed(tmp_path):
    """RunConfig.split_seed: a run with seed 1 validates on seed 0's held-out images (those a
    checkpoint trained with seed 0 never saw); without it the split follows the seed."""
    from s2hpruner.app.config import RunConfig
    from s2hpruner.app.run import build_splits

    root = str(make_idx_root(tmp_path / "fm"))
    base = RunConfig(dataset="fashion-mnist", data_root=root)
    seed0 = build_splits(base)
    fixed = build_splits(RunConfig(dataset="fashion-mnist", data_root=root, seed=1, split_seed=0))
    moved = build_splits(RunConfig(dataset="fashion-mnist", data_root=root, seed=1))
    assert keys(fixed.val) == keys(seed0.val) and keys(fixed.train) == keys(seed0.train)
    assert set(keys(moved.val)) != set(keys(seed0.val))
