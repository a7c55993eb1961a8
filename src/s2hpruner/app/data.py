"""Image data sets, read from local files only (nothing is ever downloaded).

One registry, :data:`DATASETS`, maps each data-set name to a factory with the same keywords as
:func:`build_datasets` (timm style). Every factory returns a :class:`DataSplits`:

* ``train``: the training files minus the held-out part, with training augmentation;
* ``val``: a seeded held-out part of the *training* files, so that choices made on it
  (pruning, early stopping) never see the test split;
* ``test``: the official test (or validation) split.

``imagefolder`` reads the user's own class folders (torchvision ``ImageFolder`` layout); its spec
(classes, channels, image size, mean/std) depends on the folder, so :func:`folder_spec` (or
:func:`dataset_spec` with a data root) computes it instead of a static table.

Items are ``(float32 C x H x W normalised tensor, int label)``. Small data sets (MNIST-like,
digits, CIFAR) are held in memory as uint8 arrays and augmented per item with array slicing,
which costs about 10 us per 28x28 item instead of ~100 us for a PIL round trip; large ones
(Tiny ImageNet, ImageNet) are decoded lazily with PIL.
"""

from __future__ import annotations

import gzip
import io
import math
import numbers
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import DataFormatError, DataNotFoundError, S2HError, UnknownNameError

__all__ = [
    "DATASETS",
    "ArrayImages",
    "DataFormatError",
    "DataOptionError",
    "DataSpec",
    "DataSplits",
    "ImageFiles",
    "build_datasets",
    "dataset_spec",
    "default_data_root",
    "folder_spec",
    "list_datasets",
    "read_idx",
    "resolve_val_size",
]


class DataOptionError(S2HError, ValueError):
    """A data option (val_size, image_size, mean/std) that does not fit the data set."""


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about a data set, available without reading any file."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class DataSplits:
    """The three splits of one data set plus its spec (num_classes as found on disk)."""

    train: Dataset
    val: Dataset
    test: Dataset
    spec: DataSpec
    classes: list[str] | None = None  # class folder names in label order (image files only)


DATASETS: dict[str, Callable[..., DataSplits]] = {}
_SPECS: dict[str, DataSpec] = {}

_DEBIAN_ROOT = "/usr/share/datasets/{}"
_FIX = {
    "fashion-mnist": (
        "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist, or run "
        "scripts/setup.sh) or pass --data-root to a folder holding the four IDX files"
    ),
    "mnist": "pass --data-root to a folder holding the four MNIST IDX files (plain or .gz)",
    "cifar10": (
        "extract the CIFAR-10 python version (cifar-10-python.tar.gz) and pass --data-root to "
        "the folder holding cifar-10-batches-py"
    ),
    "cifar100": (
        "extract the CIFAR-100 python version (cifar-100-python.tar.gz) and pass --data-root to "
        "the folder holding cifar-100-python"
    ),
    "tiny-imagenet": (
        "extract tiny-imagenet-200.zip and pass --data-root to its tiny-imagenet-200 folder"
    ),
    "imagenet": (
        "pass --data-root to a folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG class "
        "folders (validation images sorted into class folders)"
    ),
    "imagefolder": (
        "pass --data-root to a folder with one sub-folder of images per class (<root>/<class>/"
        "*.png), or with train/<class>/ plus test/<class>/ (or val/<class>/) folders"
    ),
}
_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


# --------------------------------------------------------------------------- public API


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_datasets`, sorted."""
    return sorted(DATASETS)


def dataset_spec(
    name: str,
    data_root: str | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_chans: int | None = None,
) -> DataSpec:
    """The spec of ``name``, so that a model can be built before the data.

    A registered set's spec is static and touches no file (``data_root`` is ignored);
    ``imagefolder``'s is read from ``data_root`` by :func:`folder_spec` with the same options.
    """
    _check_name(name)
    if name == FOLDER:
        if data_root is None:
            raise DataNotFoundError(
                f"data set {FOLDER!r} has no default data root; fix: {_FIX[FOLDER]}"
            )
        return folder_spec(data_root, image_size=image_size, mean=mean, std=std,
                           in_chans=in_chans)  # fmt: skip
    _check_folder_options(name, image_size, mean, std, in_chans)
    return _SPECS[name]


def resolve_val_size(val_size: float | None, n_train: int) -> int:
    """How many of ``n_train`` training images to hold out for validation.

    ``None`` means 10% capped at 5,000 (enough for a stable accuracy estimate, and it fits every
    set from digits' 1,438 training images to ImageNet); a value in (0, 1) is a fraction, a whole
    number >= 1 a count (also ``1.0``: the command line and YAML give every number as a float,
    and holding out all images cannot be meant), 0 holds out nothing.
    """
    if val_size is None:
        return min(5000, round(0.1 * n_train))
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise TypeError(f"val_size must be a count, a fraction or None, got {val_size!r}")
    value = float(val_size)
    if not math.isfinite(value) or value < 0:
        raise DataOptionError(f"val_size={val_size} must be >= 0 (a count, or a fraction < 1)")
    if value < 1:
        n_val = round(value * n_train)
    elif value.is_integer():
        n_val = int(value)
    else:
        raise DataOptionError(
            f"val_size={val_size} is neither a fraction < 1 nor a whole count of images"
        )
    if n_train and n_val >= n_train:
        raise DataOptionError(
            f"val_size={val_size} holds out {n_val} images, but the data set has only {n_train} "
            f"training images; hold out fewer (e.g. val_size={min(5000, round(0.1 * n_train))})"
        )
    return n_val


def default_data_root(name: str) -> str | None:
    """Where ``name`` is looked for without --data-root: Debian's dataset packages, if any."""
    _check_name(name)
    root = _DEBIAN_ROOT.format(name)
    if name == "fashion-mnist":  # the default data set: name its root even when missing
        return root
    if name == "mnist" and os.path.isdir(root):
        return root
    return None


def build_datasets(
    name: str,
    data_root: str | None = None,
    val_size: float | None = None,
    seed: int = 0,
    augment: bool = True,
    train_subset: int | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_chans: int | None = None,
) -> DataSplits:
    """Build train/val/test for ``name`` from local files.

    ``val_size`` (see :func:`resolve_val_size`; None = 10% capped at 5,000) of the training files
    is held out with ``seed``; ``train_subset`` keeps only the first N of the (seed-shuffled)
    train part. ``image_size``, ``mean``, ``std`` and ``in_chans`` are ``imagefolder`` options
    (None: measured from the folder, see :func:`folder_spec`); other sets refuse them.
    """
    _check_name(name)
    common = dict(
        data_root=data_root,
        val_size=val_size,
        seed=seed,
        augment=augment,
        train_subset=train_subset,
    )
    if name == FOLDER:
        return DATASETS[name](**common, image_size=image_size, mean=mean, std=std,
                              in_chans=in_chans)  # fmt: skip
    _check_folder_options(name, image_size, mean, std, in_chans)
    return DATASETS[name](**common)


# --------------------------------------------------------------------------- datasets


class ArrayImages(Dataset):
    """uint8 (N, C, H, W) images kept in memory, augmented per item by slicing.

    Why: the whole of MNIST or CIFAR fits in ~50-150 MB, and a random crop with zero padding is
    one slice of a pre-padded array, so an item costs microseconds. Randomness comes from
    torch's generator, which ``torch.manual_seed`` and DataLoader workers seed.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        max_value: float = 255.0,
        pad: int = 0,
        flip: bool = False,
    ):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        _, c, h, w = images.shape
        self.pad, self.flip, self._hw = pad, flip, (h, w)
        if pad:
            self._padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        else:
            self._padded = np.array(images, order="C")  # own, writable memory
        #: the un-padded images as a uint8 tensor (a view, no copy)
        self.images = torch.from_numpy(self._padded[:, :, pad : pad + h, pad : pad + w])
        self.targets = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self._labels: list[int] = self.targets.tolist()
        # normalised = pixel * scale + shift, per channel: one multiply-add per item
        mean_a = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        std_a = np.asarray(std, np.float32).reshape(-1, 1, 1)
        if len(mean_a) != c or len(std_a) != c:
            raise ValueError(f"mean/std need {c} values, got {len(mean_a)}/{len(std_a)}")
        self._scale = (1.0 / (max_value * std_a)).astype(np.float32)
        self._shift = (-mean_a / std_a).astype(np.float32)
        self._choices = (2 * pad + 1) ** 2 * (2 if flip else 1)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._choices > 1:
            # one draw encodes the crop offset and the flip
            k = int(torch.randint(self._choices, ()))
            flip = False
            if self.flip:
                k, flip = divmod(k, 2)
            dy, dx = divmod(k, 2 * self.pad + 1)
            h, w = self._hw
            image = self._padded[index, :, dy : dy + h, dx : dx + w]
            if flip:
                image = image[..., ::-1]
        else:  # no augmentation, hence no padding
            image = self._padded[index]
        out = image * self._scale  # uint8 * float32 -> new float32 array
        out += self._shift
        return torch.from_numpy(out), self._labels[index]


class ImageFiles(Dataset):
    """(path, label) pairs decoded lazily with PIL, for sets too big to hold in memory."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[Any], Any],
        mode: str = "RGB",
    ):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.mode = mode  # PIL mode every image is converted to: "RGB", or "L" (1 channel)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:  # the folder's statistics read a sample only: any other file may be broken
            with Image.open(path) as img:
                image = _as_mode(img, self.mode)  # some Tiny ImageNet JPEGs are greyscale
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise DataFormatError(
                f"{path}: cannot be read as an image ({e}); fix: replace or remove the file"
            ) from e
        return self.transform(image).as_subclass(torch.Tensor), label


# --------------------------------------------------------------------------- registry plumbing


@dataclass
class _Arrays:
    """What an in-memory loader returns: uint8 (N, C, H, W) images and their augmentation."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    pad: int
    flip: bool
    max_value: float = 255.0


@dataclass
class _Files:
    """What a file-list loader returns: (path, label) samples and the transforms to apply."""

    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    train_transform: Callable[[Any], Any]
    eval_transform: Callable[[Any], Any]
    mode: str = "RGB"


def _register(spec: DataSpec) -> Callable[[Callable[[str | None], Any]], Callable[..., Any]]:
    """Turn ``load(root) -> _Arrays | _Files`` into a registry factory for ``spec.name``."""

    def decorate(load: Callable[[str | None], Any]) -> Callable[..., Any]:
        def factory(
            data_root: str | None = None,
            val_size: float | None = None,
            seed: int = 0,
            augment: bool = True,
            train_subset: int | None = None,
        ) -> DataSplits:
            root = data_root if data_root is not None else default_data_root(spec.name)
            source = load(None if root is None else os.path.expanduser(str(root)))
            return _make_splits(spec, source, val_size, seed, augment, train_subset)

        factory.__name__ = factory.__qualname__ = spec.name.replace("-", "_")
        factory.__doc__ = load.__doc__
        DATASETS[spec.name] = factory
        _SPECS[spec.name] = spec
        return load

    return decorate


def _make_splits(
    spec: DataSpec,
    source: _Arrays | _Files,
    val_size: float | None,
    seed: int,
    augment: bool,
    train_subset: int | None,
) -> DataSplits:
    """Hold out val from the training files, trim train, and wrap each split in a Dataset."""
    n = len(source.train_labels) if isinstance(source, _Arrays) else len(source.train)
    train_idx, val_idx = _split_indices(n, val_size, seed)
    if train_subset is not None:
        if train_subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {train_subset}")
        train_idx = train_idx[:train_subset]

    if isinstance(source, _Arrays):
        s = source

        def arrays(images: np.ndarray, labels: np.ndarray, train: bool) -> ArrayImages:
            aug = train and augment
            pad, flip = (s.pad, s.flip) if aug else (0, False)
            return ArrayImages(images, labels, spec.mean, spec.std, s.max_value, pad, flip)

        return DataSplits(
            train=arrays(s.train_images[train_idx], s.train_labels[train_idx], train=True),
            val=arrays(s.train_images[val_idx], s.train_labels[val_idx], train=False),
            test=arrays(s.test_images, s.test_labels, train=False),
            spec=spec,
        )

    train_tf = source.train_transform if augment else source.eval_transform
    if len(source.classes) != spec.num_classes:
        spec = replace(spec, num_classes=len(source.classes))
    mode, evaluate = source.mode, source.eval_transform
    return DataSplits(
        train=ImageFiles([source.train[i] for i in train_idx], train_tf, mode),
        val=ImageFiles([source.train[i] for i in val_idx], evaluate, mode),
        test=ImageFiles(source.test, evaluate, mode),
        spec=spec,
        classes=list(source.classes),
    )


def _split_indices(n: int, val_size: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index split; train stays shuffled so that a prefix is a fair sample."""
    n_val = resolve_val_size(val_size, n)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], np.sort(perm[:n_val])


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, list_datasets())


def _check_folder_options(
    name: str, image_size: Any, mean: Any, std: Any, in_chans: Any = None
) -> None:
    """Registered sets have a fixed size and normalisation: refuse options they would ignore."""
    options = (("image_size", image_size), ("mean", mean), ("std", std), ("in_chans", in_chans))
    given = [k for k, v in options if v is not None]
    if given:
        raise DataOptionError(
            f"{', '.join(given)} can only be set for data set {FOLDER!r}; {name!r} has a fixed "
            "image size and normalisation"
        )


def _require_root(name: str, root: str | None) -> str:
    if root is None:
        raise DataNotFoundError(f"data set {name!r} has no default data root; fix: {_FIX[name]}")
    return root


def _missing(name: str, root: str, missing: Sequence[str], limit: int = 20) -> DataNotFoundError:
    """An error naming the root, each missing file (up to ``limit``) and the fix."""
    shown = ", ".join(missing[:limit])
    if len(missing) > limit:
        shown += f" and {len(missing) - limit} more"
    if os.path.isdir(root):
        problem = f"data root {root} lacks {shown}"
    else:
        problem = f"data root {root} does not exist (it should hold {shown})"
    return DataNotFoundError(f"data set {name!r}: {problem}; fix: {_FIX[name]}")


# --------------------------------------------------------------------------- IDX (MNIST-like)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (plain or gzip): magic 00 00 <dtype> <ndim>, big-endian uint32 dims."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut .gz raises EOFError
        raise DataFormatError(f"{path}: cannot be read ({e}); the file is corrupt") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(
            f"{path}: bad magic number {raw[:4].hex() or '(empty file)'}; not an IDX file "
            "(expected 0000 08 0N), the file is corrupt"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"{path}: size mismatch: dims {dims} need {expected} data bytes, "
            f"found {len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _find_idx(name: str, root: str) -> dict[str, str]:
    """Paths of the four IDX files, each plain or .gz; all missing ones reported at once."""
    paths, missing = {}, []
    for key, base in _IDX_FILES.items():
        found = [p for p in (base, base + ".gz") if os.path.isfile(os.path.join(root, p))]
        if found:
            paths[key] = os.path.join(root, found[0])
        else:
            missing.append(f"{base}[.gz]")
    if missing:
        raise _missing(name, root, missing)
    return paths


def _load_idx_set(name: str, root: str | None, pad: int, flip: bool) -> _Arrays:
    root = _require_root(name, root)
    paths = _find_idx(name, root)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        size = _SPECS[name].image_size
        if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1:] != (size, size):
            raise DataFormatError(
                f"{paths[f'{split}_images']}: expected uint8 N x {size} x {size} images, got "
                f"{images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataFormatError(
                f"{paths[f'{split}_labels']}: expected {len(images)} labels, got shape "
                f"{labels.shape}"
            )
        if len(labels) and labels.max() >= _SPECS[name].num_classes:
            raise DataFormatError(f"{paths[f'{split}_labels']}: label {labels.max()} out of range")
    return _Arrays(
        train_images=arrays["train_images"][:, None],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"][:, None],
        test_labels=arrays["test_labels"].astype(np.int64),
        pad=pad,
        flip=flip,
    )


@_register(DataSpec("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,)))
def _fashion_mnist(root: str | None) -> _Arrays:
    """Fashion-MNIST from its four IDX files; crop 28 with padding 2 + horizontal flip."""
    return _load_idx_set("fashion-mnist", root, pad=2, flip=True)


@_register(DataSpec("mnist", 10, 1, 28, (0.1307,), (0.3081,)))
def _mnist(root: str | None) -> _Arrays:
    """MNIST from its four IDX files; crop 28 with padding 2, no flip (digits are not mirrored)."""
    return _load_idx_set("mnist", root, pad=2, flip=False)


# --------------------------------------------------------------------------- scikit-learn digits

_DIGITS_TEST_SEED = 0  # fixed, so the test split is the same whatever --seed picks for val


@_register(DataSpec("digits", 10, 1, 8, (0.3053,), (0.3760,)))
def _digits(root: str | None) -> _Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 images); a fixed seeded 20% is the test split."""
    from sklearn.datasets import load_digits

    if root is not None:  # nothing is read from it: say so rather than train on other images
        raise DataOptionError(
            f"data set 'digits' is scikit-learn's bundled copy and reads no files, but a data "
            f"root ({root}) is set; leave it out, or for your own images use --dataset "
            "imagefolder"
        )

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # values 0..16
    labels = bunch.target.astype(np.int64)
    perm = np.random.default_rng(_DIGITS_TEST_SEED).permutation(len(labels))
    n_test = round(0.2 * len(labels))
    test, pool = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return _Arrays(
        images[pool], labels[pool], images[test], labels[test], pad=1, flip=False, max_value=16.0
    )


# --------------------------------------------------------------------------- CIFAR


class _NumpyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what they contain, so a hostile file runs no code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 (the official files)
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in Python 3 protocol-2 pickles
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataFormatError(f"{path}: not a CIFAR python batch ({e!r})") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataFormatError(
            f"{path}: expected N x 3072 data and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(
    name: str,
    root: str | None,
    folder: str,
    train_files: list[str],
    test_file: str,
    label_key: bytes,
) -> _Arrays:
    root = _require_root(name, root)
    # the root may hold the extracted folder, or be that folder
    base = os.path.join(root, folder) if os.path.isdir(os.path.join(root, folder)) else root
    wanted = [*train_files, test_file]
    missing = [f"{folder}/{f}" for f in wanted if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise _missing(name, root, missing)
    parts = [_read_cifar_batch(os.path.join(base, f), label_key) for f in train_files]
    test_images, test_labels = _read_cifar_batch(os.path.join(base, test_file), label_key)
    num_classes = _SPECS[name].num_classes
    for labels in [*(p[1] for p in parts), test_labels]:
        if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
            raise DataFormatError(f"{base}: CIFAR labels outside 0..{num_classes - 1}")
    return _Arrays(
        train_images=np.concatenate([p[0] for p in parts]),
        train_labels=np.concatenate([p[1] for p in parts]),
        test_images=test_images,
        test_labels=test_labels,
        pad=4,
        flip=True,
    )


@_register(DataSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
def _cifar10(root: str | None) -> _Arrays:
    """CIFAR-10 python batches (cifar-10-batches-py); crop 32 with padding 4 + flip."""
    files = [f"data_batch_{i}" for i in range(1, 6)]
    return _load_cifar("cifar10", root, "cifar-10-batches-py", files, "test_batch", b"labels")


@_register(DataSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))
def _cifar100(root: str | None) -> _Arrays:
    """CIFAR-100 python files (cifar-100-python), fine labels; crop 32 with padding 4 + flip."""
    return _load_cifar("cifar100", root, "cifar-100-python", ["train"], "test", b"fine_labels")


# --------------------------------------------------------------------------- image folders


def _image_files(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.lower().endswith(_IMAGE_EXTENSIONS)]
    return [os.path.join(folder, n) for n in sorted(names)]


def _to_tensor(spec: DataSpec, geometric: list[Any]) -> Any:
    """PIL -> normalised float tensor; the geometric ops run on the PIL image, before conversion."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            *geometric,
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


def _train_transform(spec: DataSpec, scale: tuple[float, float]) -> Any:
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(spec.image_size, scale=scale)
    return _to_tensor(spec, [crop, v2.RandomHorizontalFlip()])


def _eval_transform(spec: DataSpec, resize: int) -> Any:
    from torchvision.transforms import v2

    return _to_tensor(spec, [v2.Resize(resize), v2.CenterCrop(spec.image_size)])


@_register(
    DataSpec("tiny-imagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
)
def _tiny_imagenet(root: str | None) -> _Files:
    """Tiny ImageNet (tiny-imagenet-200 layout); the official val folder is the test split."""
    name = "tiny-imagenet"
    root = _require_root(name, root)
    needed = ["wnids.txt", "train", "val/images", "val/val_annotations.txt"]
    missing = [p for p in needed if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise _missing(name, root, missing)
    with open(os.path.join(root, "wnids.txt")) as f:
        classes = sorted({line.strip() for line in f if line.strip()})
    index = {wnid: i for i, wnid in enumerate(classes)}

    train, missing = [], []
    for wnid in classes:
        folder = os.path.join(root, "train", wnid, "images")
        if not os.path.isdir(folder):
            missing.append(f"train/{wnid}/images")
            continue
        train += [(path, index[wnid]) for path in _image_files(folder)]
    if missing:
        raise _missing(name, root, missing)

    val_dir = os.path.join(root, "val", "images")
    on_disk = set(os.listdir(val_dir))
    test = []
    annotations = os.path.join(root, "val", "val_annotations.txt")
    with open(annotations) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DataFormatError(
                    f"{annotations}:{lineno}: expected 'file<TAB>wnid<TAB>...' with a wnid "
                    f"from wnids.txt, got {line.strip()!r}"
                )
            if fields[0] not in on_disk:
                missing.append(f"val/images/{fields[0]}")
            test.append((os.path.join(val_dir, fields[0]), index[fields[1]]))
    if missing:
        raise _missing(name, root, missing)
    spec = _SPECS[name]
    return _Files(
        train,
        test,
        classes,
        train_transform=_train_transform(spec, scale=(0.35, 1.0)),
        eval_transform=_eval_transform(spec, resize=64),
    )


@_register(DataSpec("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
def _imagenet(root: str | None) -> _Files:
    """ImageNet as train/<wnid>/ and val/<wnid>/ class folders; classes are train's folders."""
    name = "imagenet"
    root = _require_root(name, root)
    missing = [d for d in ("train", "val") if not os.path.isdir(os.path.join(root, d))]
    if missing:
        raise _missing(name, root, [f"{d}/" for d in missing])

    def class_dirs(split: str) -> list[str]:
        with os.scandir(os.path.join(root, split)) as entries:
            return sorted(e.name for e in entries if e.is_dir())

    classes = class_dirs("train")
    if not classes:
        raise _missing(name, root, ["train/<wnid>/ class folders"])
    val_classes = class_dirs("val")
    if not val_classes:
        raise _missing(name, root, ["val/<wnid>/ class folders"])
    index = {wnid: i for i, wnid in enumerate(classes)}
    unknown = [wnid for wnid in val_classes if wnid not in index]
    if unknown:
        raise DataFormatError(f"{root}/val has class folders not in train/: {unknown[:10]}")

    def samples(split: str, wnids: list[str]) -> list[tuple[str, int]]:
        return [
            (path, index[wnid])
            for wnid in wnids
            for path in _image_files(os.path.join(root, split, wnid))
        ]

    spec = _SPECS[name]
    return _Files(
        samples("train", classes),
        samples("val", val_classes),
        classes,
        train_transform=_train_transform(spec, scale=(0.08, 1.0)),
        eval_transform=_eval_transform(spec, resize=256),
    )


# --------------------------------------------------------------------------- user image folders

FOLDER = "imagefolder"
#: torchvision's ImageFolder extensions, matched case-insensitively
_FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_FOLDER_TEST_SEED = 0  # fixed: the held-out test split does not move with --seed or --val-size
_FOLDER_MAX_SIZE = 224  # default image_size cap: what ImageNet-pretrained models expect
_STATS_SAMPLE = 500  # images read to measure channels, size, mean and std
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


@dataclass
class _Folder:
    """A scanned image folder: classes (sorted) and (path, label) samples per split."""

    root: str
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _folder_error(problem: str) -> DataNotFoundError:
    return DataNotFoundError(f"data set {FOLDER!r}: {problem}; fix: {_FIX[FOLDER]}")


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _class_images(folder: str) -> dict[str, list[str]]:
    """{class: sorted image paths} for each non-hidden sub-folder, images found recursively."""
    with os.scandir(folder) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise _folder_error(f"{folder} has no class folders")
    found: dict[str, list[str]] = {}
    for name in classes:
        paths = []
        for top, dirs, files in os.walk(os.path.join(folder, name), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [
                os.path.join(top, f)
                for f in sorted(files)
                if f.lower().endswith(_FOLDER_EXTENSIONS) and not f.startswith(".")
            ]
        found[name] = paths
    empty = [os.path.join(folder, c) for c, paths in found.items() if not paths]
    if empty:
        raise _folder_error(
            f"class folder(s) without images ({'/'.join(_FOLDER_EXTENSIONS)}): {_listing(empty)}",
        )
    return found


def _scan_folder(root: str | None) -> _Folder:
    """Find the layout: ``train/`` + ``test/`` (or ``val/``), or class folders in ``root``.

    With both ``test/`` and ``val/``, ``test/`` is the test split and ``val/`` is not read
    (validation is always held out of train). Without a test folder, a fixed seeded
    ``min(5000, 10%)`` (at least 1) of the images is the test split, so that test accuracy is
    comparable across --seed and --val-size.
    """
    if root is None:
        raise DataNotFoundError(
            f"data set {FOLDER!r} has no default data root; fix: {_FIX[FOLDER]}"
        )
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise _folder_error(f"data root {root} does not exist")
    split_layout = os.path.isdir(os.path.join(root, "train"))
    train = _class_images(os.path.join(root, "train") if split_layout else root)
    classes = sorted(train)
    index = {c: i for i, c in enumerate(classes)}
    samples = [(path, index[c]) for c in classes for path in train[c]]
    test_dir = next(
        (d for d in ("test", "val") if split_layout and os.path.isdir(os.path.join(root, d))), None
    )
    if test_dir is not None:
        test = _class_images(os.path.join(root, test_dir))
        if sorted(test) != classes:
            only_train = [c for c in classes if c not in test]
            only_test = [c for c in sorted(test) if c not in index]
            raise DataFormatError(
                f"data set {FOLDER!r}: {root}/train and {root}/{test_dir} have different class "
                f"folders (only in train: {_listing(only_train) or '-'}; only in {test_dir}: "
                f"{_listing(only_test) or '-'}); give both the same classes"
            )
        return _Folder(root, classes, samples, [(p, index[c]) for c in classes for p in test[c]])
    n_test = max(1, resolve_val_size(None, len(samples)))
    if len(samples) - n_test < 1:
        raise DataFormatError(
            f"data set {FOLDER!r}: {root} holds only {len(samples)} image(s), too few to hold out "
            "a test split; add images, or a test/<class>/ folder next to train/"
        )
    perm = np.random.default_rng(_FOLDER_TEST_SEED).permutation(len(samples))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return _Folder(root, classes, [samples[i] for i in train_idx], [samples[i] for i in test_idx])


#: PIL modes of 16-bit greyscale files (PNG, TIFF); "I" (32-bit) holds them in older Pillow
_WIDE_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _as_mode(img: Any, mode: str) -> Any:
    """``img`` in PIL mode ``mode``. 16-bit greyscale is scaled to 8 bits first: PIL's
    ``convert`` clips every value above 255, and such images (medical, scientific) would
    turn almost white. An "I" image whose values all fit in 8 bits is taken as 8-bit data."""
    from PIL import Image

    if img.mode in _WIDE_GREY:
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or pixels.max() > 255:
            pixels = pixels * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return img.convert(mode)


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        raise DataFormatError(f"{path}: cannot be read as an image ({e})") from e


def _folder_stats(
    folder: _Folder,
    image_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    in_chans: int | None = None,
) -> tuple[DataSpec, int]:
    """The spec, and the eval resize, from a seeded sample of up to 500 training images.

    * channels: 1 if every sampled image is greyscale (PIL mode 'L', '1', 'I', ...), else 3
      (greyscale images among colour ones are converted to RGB); ``in_chans`` 3 makes grey
      images RGB (as torchvision's ImageFolder does: a model trained so takes 3 channels);
    * image_size: the median shorter side of the sample, capped at 224 (so 28x28 or 32x32
      images keep their resolution, photos get the ImageNet 224);
    * mean/std per channel over the sample's pixels after resizing (0..1 scale), unless given.
    """
    from torchvision.transforms import v2

    rng = np.random.default_rng(_FOLDER_TEST_SEED)
    picked = np.sort(rng.permutation(len(folder.train))[:_STATS_SAMPLE])
    paths = [folder.train[i][0] for i in picked]
    modes, short_sides = [], []
    for path in paths:
        with _open_image(path) as img:
            modes.append(img.mode)
            short_sides.append(min(img.size))
    if in_chans is None:
        in_chans = 1 if all(m in _GREY_MODES for m in modes) else 3
    elif isinstance(in_chans, bool) or in_chans not in (1, 3):
        raise DataOptionError(f"in_chans must be 1 (greyscale) or 3 (RGB), got {in_chans!r}")
    median_side = int(np.median(short_sides))
    if image_size is None:
        image_size = min(median_side, _FOLDER_MAX_SIZE)
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, numbers.Integral)
        or image_size < 1
    ):
        raise DataOptionError(f"image_size must be a whole number >= 1, got {image_size!r}")
    image_size = int(image_size)
    # ImageNet's eval recipe (resize to size / 0.875, centre crop) when images are larger
    resize = round(image_size / 0.875) if median_side > image_size else image_size
    mode = "L" if in_chans == 1 else "RGB"
    if mean is None or std is None:
        geometric = v2.Compose([v2.Resize(resize), v2.CenterCrop(image_size)])
        total = np.zeros(in_chans)
        squares = np.zeros(in_chans)
        count = 0
        for path in paths:
            with _open_image(path) as img:
                img.draft(mode, (resize, resize))  # JPEG: decode at reduced size, much faster
                try:
                    pixels = np.asarray(geometric(_as_mode(img, mode)), np.float64) / 255.0
                except (OSError, SyntaxError, EOFError) as e:
                    raise DataFormatError(f"{path}: cannot be decoded ({e})") from e
            pixels = pixels.reshape(-1, in_chans)
            total += pixels.sum(0)
            squares += (pixels**2).sum(0)
            count += len(pixels)
        measured_mean = total / count
        measured_std = np.sqrt(np.maximum(squares / count - measured_mean**2, 0.0))
        measured_std[measured_std < 1e-6] = 1.0  # constant images: do not divide by zero
        mean = tuple(round(float(v), 4) for v in measured_mean) if mean is None else mean
        std = tuple(round(float(v), 4) for v in measured_std) if std is None else std
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise DataOptionError(
            f"data set {FOLDER!r}: the images in {folder.root} have {in_chans} channel(s), so "
            f"mean and std need {in_chans} value(s) each (std > 0), got {mean} and {std}"
        )
    spec = DataSpec(FOLDER, len(folder.classes), in_chans, image_size, mean, std)
    return spec, resize


def folder_spec(
    root: str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_chans: int | None = None,
) -> DataSpec:
    """The spec of the image folder ``root`` (classes sorted by name -> label index).

    Reads the class folders and a seeded sample of up to 500 training images (see
    :func:`_folder_stats` for the defaults); the same inputs always give the same spec.
    """
    folder = _scan_folder(root)
    return _folder_stats(folder, image_size, mean, std, in_chans)[0]


def _imagefolder(
    data_root: str | None = None,
    val_size: float | None = None,
    seed: int = 0,
    augment: bool = True,
    train_subset: int | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_chans: int | None = None,
) -> DataSplits:
    """Your own images in class folders (torchvision ImageFolder layout); see :func:`folder_spec`.

    Training augmentation: random resized crop (scale 0.35-1 up to 64 px, 0.08-1 above, as for
    Tiny ImageNet and ImageNet) and horizontal flip; evaluation: resize and centre crop.
    """
    folder = _scan_folder(data_root)
    spec, resize = _folder_stats(folder, image_size, mean, std, in_chans)
    source = _Files(
        folder.train,
        folder.test,
        folder.classes,
        train_transform=_train_transform(
            spec, scale=(0.35, 1.0) if spec.image_size <= 64 else (0.08, 1.0)
        ),
        eval_transform=_eval_transform(spec, resize=resize),
        mode="L" if spec.in_chans == 1 else "RGB",
    )
    return _make_splits(spec, source, val_size, seed, augment, train_subset)


DATASETS[FOLDER] = _imagefolder
