"""Model registry: one place that turns a name into a freshly initialised ``nn.Module``.

Names follow timm's style (``resnet56``, ``wrn28_10``). The project's own small-image models
live in :data:`MODELS`; any torchvision classification model is accepted as a fallback, by its
torchvision name or explicitly as ``torchvision/<name>`` (needed where one of ours shadows it),
and any timm model as ``timm/<name>``.
Weights are never downloaded: every model starts from random initialisation. The vision
transformers (:data:`VISION_TRANSFORMERS`) are timm's (the ``vit`` extra) and take ``img_size``;
torchvision's ViTs (``vit_b_16``, ...) are built at ``image_size`` too, which must be a multiple
of their fixed patch size (see :func:`torchvision_vit_patch_size`).

Your own model needs no registration: ``"package.module:factory"`` or
``"path/to/file.py:factory"`` names a callable that returns an ``nn.Module`` (see
:func:`load_factory`); it gets whichever of num_classes / in_chans / image_size (or img_size) it
names as parameters.

All models avoid tricks that torch-pruning's ``DependencyGraph`` cannot trace (such as the
zero-padding "option A" shortcut of the original CIFAR ResNets), so any of them can be pruned.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
import torchvision
from torch import nn

from ..core.errors import S2HError, UnknownNameError, UnsupportedModelError

__all__ = [
    "MODELS",
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "VISION_TRANSFORMERS",
    "CifarResNet",
    "ModelSpecError",
    "WideResNet",
    "cifar_resnet",
    "cifar_vgg",
    "create_model",
    "list_models",
    "load_factory",
    "register_model",
    "shadows_torchvision",
    "torchvision_vit_patch_size",
    "wide_resnet",
]

TORCHVISION_PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"  # any timm model by its timm name (the ``vit`` extra installs timm)

MODELS: dict[str, Callable[..., nn.Module]] = {}

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])

_SPEC_FORMS = "'package.module:factory' or 'path/to/file.py:factory'"


class ModelSpecError(S2HError, ValueError):
    """A ``module:factory`` or ``file.py:factory`` model that cannot be loaded or built."""


def register_model(fn: FactoryT) -> FactoryT:
    """Add ``fn`` to :data:`MODELS` under ``fn.__name__``; refuse silent overwrites."""
    name = fn.__name__
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = fn
    return fn


@cache
def _torchvision_names() -> tuple[str, ...]:
    """Classification models only (not detection/segmentation), computed once."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


@cache
def shadows_torchvision(name: str) -> bool:
    """Whether registry model ``name`` hides a torchvision model of the same name with another
    layout (the CIFAR ``resnet50`` and ``vgg19_bn``; torchvision's is ``torchvision/<name>``).
    Our MobileNetV3s are torchvision's by default: they do not. Builds both, once."""
    if name not in MODELS or name not in _torchvision_names():
        return False

    def shapes(model: nn.Module) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in model.state_dict().items()}

    return shapes(MODELS[name](num_classes=10, in_chans=3)) != shapes(
        _torchvision_model(name, 10, 3))


def list_models(include_torchvision: bool = False) -> list[str]:
    """Sorted registry names, optionally followed by every ``torchvision/<name>``.

    Torchvision models are listed in their prefixed form because that spelling is
    unambiguous; the bare torchvision name works too unless one of ours shadows it.
    """
    names = sorted(MODELS)
    if include_torchvision:
        names += [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    return names


def create_model(
    name: str, num_classes: int = 10, in_chans: int = 3, image_size: int | None = None, **kwargs
) -> nn.Module:
    """Build model ``name`` with random weights; ``kwargs`` go to its factory.

    ``name`` is a registry name, a torchvision name, ``timm/<name>`` or a user factory
    (``module:factory`` or ``file.py:factory``, see :func:`load_factory`). ``image_size`` (the
    data's) is passed as ``img_size`` to registry factories and timm models that take one (the
    vision transformers), unless ``kwargs`` already set it, and as ``image_size`` to
    torchvision's ViTs (``vit_b_16``, ...; a size that is not a multiple of their patch size
    raises :class:`ModelSpecError`); other models ignore it.
    """
    if ":" in name:
        return _user_model(name, num_classes, in_chans, image_size, kwargs)
    check_model_name(name)
    if name in MODELS:
        factory = MODELS[name]
        size = {} if image_size is None else {"img_size": image_size}
        kwargs = {**_accepted_kwargs(factory, size), **kwargs}
        return factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name.removeprefix(TIMM_PREFIX), num_classes, in_chans, image_size,
                           **kwargs)  # fmt: skip
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    return _torchvision_model(tv_name, num_classes, in_chans, image_size=image_size, **kwargs)


def check_model_name(name: str) -> None:
    """Raise the error :func:`create_model` would for a name no source has, without building
    anything: a run checks it before it makes its folder or reads its data. (A user factory,
    ``module:factory``, is checked when it is loaded.)"""
    if ":" in name or name in MODELS:
        return
    if name.startswith(TIMM_PREFIX):
        if not _timm().is_model(name.removeprefix(TIMM_PREFIX)):
            raise ModelSpecError(
                f"timm has no model {name.removeprefix(TIMM_PREFIX)!r}; fix: a name from "
                f"timm.list_models() (e.g. {TIMM_PREFIX}resnet18, {TIMM_PREFIX}convnext_atto)"
            )
        return
    if name.removeprefix(TORCHVISION_PREFIX) in _torchvision_names():
        return
    error = UnknownNameError("model", name, list_models())
    # errors.py builds the message; extend it so users know the fallback exists.
    error.args = (
        f"{error.args[0]}; any torchvision classification model name is accepted too "
        f"(e.g. 'resnet18', or '{TORCHVISION_PREFIX}resnet50' for torchvision's own one), "
        f"any timm model as '{TIMM_PREFIX}<name>' (e.g. '{TIMM_PREFIX}convnext_atto'), "
        "and so is your own factory as 'package.module:function' or 'path/to/file.py:function'",
    )
    raise error


# --------------------------------------------------------------------------- user factories


def _accepted_kwargs(factory: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``factory`` names as keyword-capable parameters."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature: offer nothing
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in offered.items() if k in params and params[k].kind in named}


def _load_file(spec: str, target: str) -> ModuleType:
    """Import ``target`` (a .py file) under a stable name derived from its resolved path.

    The module is registered in ``sys.modules`` (as ``s2hpruner_user_<stem>_<hash>``) so that
    its classes pickle and deep-copy; loading the same spec in another process recreates that
    name, which is what unpickling a whole model needs. The file's folder is *appended* to
    ``sys.path`` so that it can import its sibling modules without shadowing installed ones. An
    unchanged file is executed once per process (like an import); an edited one is re-executed.
    """
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ModelSpecError(
            f"model {spec!r}: file {path} does not exist; fix: give the path of the Python file "
            "that defines the factory (relative to the current folder, or absolute)"
        )
    stem = re.sub(r"\W", "_", path.stem)
    name = f"s2hpruner_user_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    stamp = path.stat().st_mtime_ns
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__s2h_mtime__", None) == stamp:
        return cached
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"model {spec!r}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it: dataclasses and pickle look it up there
    try:
        module_spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as exc:
        del sys.modules[name]
        raise ModelSpecError(f"model {spec!r}: {path} fails to import: {exc}") from exc
    except BaseException:
        del sys.modules[name]
        raise
    module.__s2h_mtime__ = stamp  # type: ignore[attr-defined]
    return module


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:factory"`` or ``"path/to/file.py:factory"``.

    Why: users prune the model they already have without registering it. A target ending in
    ``.py`` or containing a ``/`` is a file (see :func:`_load_file`), anything else a module
    imported with :mod:`importlib`. ``factory`` may be dotted (``module:Class.build``).
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelSpecError(f"model {spec!r}: expected {_SPEC_FORMS}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file(spec, target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelSpecError(
                f"model {spec!r}: cannot import module {target!r} ({exc}); fix: install it, add "
                "its folder to PYTHONPATH, or give its file (the current folder is not searched): "
                f"'./{target.replace('.', '/')}.py:{attr}'"
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in vars(module) if not n.startswith("_"))
            raise ModelSpecError(
                f"model {spec!r}: {target} has no attribute {attr!r}; it defines: "
                f"{', '.join(public[:20]) or 'nothing public'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(
            f"model {spec!r}: {attr} is a {type(obj).__name__}, not callable; fix: name a function "
            "or class that returns the nn.Module"
        )
    return obj


def _user_model(
    spec: str, num_classes: int, in_chans: int, image_size: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    """Call the factory of ``spec`` with the data's arguments it names, plus ``kwargs``.

    A factory that only takes ``**kwargs`` (torchvision's builders, e.g.
    ``torchvision.models:resnet18``) gets ``num_classes`` through them, so that the classifier
    fits the data; in_chans and image_size are passed only to factories that name them.
    """
    factory = load_factory(spec)
    offered: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if image_size is not None:
        offered.update(image_size=image_size, img_size=image_size)
    call = {**_accepted_kwargs(factory, offered), **kwargs}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        if takes_any and "num_classes" not in call:
            call["num_classes"] = num_classes
        try:
            signature.bind(**call)
        except TypeError as exc:
            raise ModelSpecError(
                f"model {spec!r}: cannot call it with {sorted(call)} ({exc}); its signature is "
                f"{signature}; fix: pass model_kwargs that match it"
            ) from exc
    model = factory(**call)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; fix: make "
            "the factory return the model"
        )
    return model


# --------------------------------------------------------------------------- helpers


def _init_weights(model: nn.Module) -> None:
    """Kaiming init for convs (He et al.), identity BN, small normal for the classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_like(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A fresh copy of ``conv`` that takes ``in_chans`` inputs; all else unchanged."""
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _set_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace the first ``nn.Conv2d`` (in registration order) so the model takes ``in_chans``."""
    if in_chans == 3:
        return model
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, _conv_like(module, in_chans))
            return model
    raise UnsupportedModelError(
        f"{type(model).__name__} has no Conv2d to adapt to in_chans={in_chans}; use in_chans=3"
    )


_TORCHVISION_VIT = re.compile(r"vit_[a-z]+_(\d+)")


def torchvision_vit_patch_size(name: str) -> int | None:
    """The fixed patch size of torchvision's ViT ``name`` (``vit_b_16`` -> 16), else None."""
    name = name.removeprefix(TORCHVISION_PREFIX)
    match = _TORCHVISION_VIT.fullmatch(name)
    return int(match.group(1)) if match and name in _torchvision_names() else None


def _vit_image_size(
    name: str, patch: int, image_size: int | None, kwargs: dict[str, Any]
) -> int | None:
    """``image_size`` for torchvision's ViT ``name``, checked against its fixed ``patch`` size.

    torchvision's ``VisionTransformer`` cuts the image into a fixed grid of ``patch``-pixel
    patches and refuses other sizes; its builders (``vit_b_16``, ...) fix the patch size. A
    size that is not a multiple of it would need the data resized (only ``imagefolder`` can:
    ``--image-size``) or another model, which the error says (instead of torchvision's bare
    assertion, or a 224-pixel model that fails on the data's first batch).
    """
    if "patch_size" in kwargs:
        raise ModelSpecError(
            f"model {name!r}: torchvision's {name} has a fixed patch size of {patch}, so "
            f"model_kwargs cannot set patch_size; fix: drop it, or use a timm ViT, whose patch "
            f"size is a model_kwargs entry (e.g. 'vit_tiny_patch16_224' with "
            f"model_kwargs {{patch_size: 4}}), or your own factory"
        )
    if image_size is None or (image_size > 0 and image_size % patch == 0):
        return image_size
    small = next((p for p in range(4, image_size + 1) if image_size % p == 0), image_size)
    raise ModelSpecError(
        f"model {name!r}: torchvision's {name} cuts images into fixed {patch}x{patch} patches, "
        f"so it cannot take {image_size}x{image_size} images ({image_size} is not a multiple "
        f"of {patch}); fix: use a ViT with smaller patches, e.g. 'vit_fmnist' (4-px patches, "
        f"made for 28x28 images) or 'vit_tiny_patch16_224' with model_kwargs "
        f"{{patch_size: {small}}} (both need timm: pip install 's2hpruner[vit]'), or data whose "
        f"size is a multiple of {patch} (only --dataset imagefolder can be resized: "
        f"--image-size {max(patch, image_size + (-image_size) % patch)})"
    )


def _torchvision_model(
    name: str, num_classes: int, in_chans: int, image_size: int | None = None, **kwargs
) -> nn.Module:
    """A torchvision classifier with random weights and ``in_chans`` input channels
    (googlenet and inception_v3 without their auxiliary classifiers, which the pruner cannot
    follow: see ``core.structure.build_graph``). ``image_size`` goes to the ViTs (see
    :func:`_vit_image_size`); the other models get no size argument."""
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
    patch = torchvision_vit_patch_size(name)
    if patch is not None:
        size = _vit_image_size(name, patch, image_size, kwargs)
        if size is not None:  # (None: torchvision's 224)
            kwargs["image_size"] = size
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return _set_in_chans(model, in_chans)


# --------------------------------------------------------------------------- CIFAR ResNet


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus shortcut, relu after the add (He et al. 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        # Projection ("option B") instead of zero-padding: a real layer the pruner can trace.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 3x3 stem, three stages of width, 2x, 4x channels."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(
    depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16
) -> CifarResNet:
    """Any CIFAR ResNet depth; the registered names are just common choices."""
    return CifarResNet(depth, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (~0.27M parameters)."""
    return cifar_resnet(20, num_classes, in_chans, width)


@register_model
def resnet56(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> nn.Module:
    """CIFAR ResNet-56 (~0.86M parameters)."""
    return cifar_resnet(56, num_classes, in_chans, width)


@register_model
def resnet50(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Torchvision ResNet-50 with a 3x3 stride-1 stem and no max-pool, for 32x32 images.

    The ImageNet stem would shrink a 32x32 image to 8x8 before the first block.
    """
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)
    model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


# --------------------------------------------------------------------------- Wide ResNet


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv, BN-ReLU-(dropout)-conv, plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        # As in the paper's code: a 1x1 conv on the pre-activated input when shapes change.
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): stages of 16k, 32k, 64k channels."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Wide ResNet depth must be 6n+4 (16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [WideBlock(in_planes, planes, stride, dropout)]
            blocks += [WideBlock(planes, planes, 1, dropout) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wide_resnet(
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
    num_classes: int = 10,
    in_chans: int = 3,
) -> WideResNet:
    """Any WRN-depth-widen_factor."""
    return WideResNet(depth, widen_factor, dropout, num_classes, in_chans)


@register_model
def wrn28_10(
    num_classes: int = 10,
    in_chans: int = 3,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """WRN-28-10 (~36.5M parameters), the usual CIFAR Wide ResNet."""
    return wide_resnet(depth, widen_factor, dropout, num_classes, in_chans)


@register_model
def wrn16_4(
    num_classes: int = 10,
    in_chans: int = 3,
    depth: int = 16,
    widen_factor: int = 4,
    dropout: float = 0.0,
) -> nn.Module:
    """WRN-16-4 (~2.7M parameters): a small Wide ResNet for quick runs and tests."""
    return wide_resnet(depth, widen_factor, dropout, num_classes, in_chans)


# --------------------------------------------------------------------------- CIFAR VGG

VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"]
    + [512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def cifar_vgg(cfg: Sequence[int | str], num_classes: int = 10, in_chans: int = 3) -> nn.Sequential:
    """VGG with BN for small images; ints are 3x3 conv widths, ``"M"`` a 2x2 max-pool.

    ``ceil_mode=True`` keeps odd sizes from collapsing (28 -> 14 -> 7 -> 4 -> 2 -> 1), and the
    global average pool makes the classifier independent of the input size.
    """
    layers: list[nn.Module] = []
    channels = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(channels, int(v), 3, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            channels = int(v)
    model = nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(channels, num_classes),
    )
    _init_weights(model)
    return model


@register_model
def vgg19_bn(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR VGG-19 with BN (~20M parameters)."""
    return cifar_vgg(VGG_CFGS["vgg19"], num_classes, in_chans)


@register_model
def vgg11_bn_cifar(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR VGG-11 with BN (~9.2M parameters), the small VGG for tests."""
    return cifar_vgg(VGG_CFGS["vgg11"], num_classes, in_chans)


# --------------------------------------------------------------------------- MobileNetV3


def _mobilenet_cifar_stem(model: nn.Module) -> nn.Module:
    """The usual CIFAR adaptation of a torchvision MobileNetV3: stride 1 in the stem conv and
    in the first stride-2 inverted-residual block (its depthwise conv), so the total stride is
    8 instead of 32 (32x32 inputs end on 4x4 maps, not 1x1). Shapes and weights are unchanged:
    pretrained weights still load, and the pruner sees the same channel dependencies."""
    stem = next(m for m in model.features[0].modules() if isinstance(m, nn.Conv2d))
    stem.stride = (1, 1)
    for block in list(model.features)[1:]:
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
                m.stride = (1, 1)
                return model
    raise UnsupportedModelError(f"{type(model).__name__} has no stride-2 block after its stem")


@register_model
def mobilenet_v3_small(
    num_classes: int = 10, in_chans: int = 3, cifar_stem: bool = False, **kwargs
) -> nn.Module:
    """Torchvision MobileNetV3-Small as defined (its 32x downsampling still runs on 28x28);
    ``cifar_stem=True`` makes its total stride 8 instead of 32, for 32x32 inputs (see
    :func:`_mobilenet_cifar_stem`)."""
    model = _torchvision_model("mobilenet_v3_small", num_classes, in_chans, **kwargs)
    return _mobilenet_cifar_stem(model) if cifar_stem else model


@register_model
def mobilenet_v3_large(
    num_classes: int = 10, in_chans: int = 3, cifar_stem: bool = False, **kwargs
) -> nn.Module:
    """Torchvision MobileNetV3-Large as defined (its 32x downsampling still runs on 28x28);
    ``cifar_stem=True`` makes its total stride 8 instead of 32, for 32x32 inputs (see
    :func:`_mobilenet_cifar_stem`)."""
    model = _torchvision_model("mobilenet_v3_large", num_classes, in_chans, **kwargs)
    return _mobilenet_cifar_stem(model) if cifar_stem else model


# --------------------------------------------------------------------------- vision transformers

VISION_TRANSFORMERS = (
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "vit_fmnist",
)


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise UnsupportedModelError(
            "the vision transformers need timm: pip install 's2hpruner[vit]'"
        ) from exc
    return timm


def _timm_model(
    name: str, num_classes: int, in_chans: int, img_size: int | None, **kwargs
) -> nn.Module:
    """timm's ``name`` with random weights (never pretrained) at ``img_size``; ``kwargs``
    override its architecture (e.g. ``patch_size=4`` or ``window_size=4`` for 32x32 images).
    A model that takes no ``img_size`` (a CNN) is built without it: it runs at any size.
    An image size off the patch grid is refused: timm would drop the leftover rows and
    columns silently (a 16-px patch on 28x28 Fashion-MNIST sees 16 of its 28 rows)."""
    timm = _timm()  # (the name: check_model_name)
    args = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans, **kwargs}
    if img_size is None or "img_size" in kwargs:
        model = timm.create_model(name, **args)
    else:
        try:
            model = timm.create_model(name, img_size=img_size, **args)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            model = timm.create_model(name, **args)
    img_size = kwargs.get("img_size", img_size)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, tuple | list) else patch
    if isinstance(patch, int) and patch > 1 and isinstance(img_size, int) and img_size % patch:
        # the largest patch below this one that divides the image into at least 7x7 patches
        fits = [p for p in range(2, patch) if img_size % p == 0 and img_size // p >= 7] or [1]
        raise ModelSpecError(
            f"model {name!r} at image size {img_size} cuts {patch}-px patches and would drop "
            f"the last {img_size % patch} rows and columns of every image; fix: model_kwargs "
            f"{{patch_size: {fits[-1]}}} (a divisor of {img_size}), as the shipped ViT configs "
            "do, or images whose size is a multiple of the patch"
        )
    return model


@register_model
def vit_tiny_patch16_224(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 224, **kwargs
) -> nn.Module:
    """ViT-Ti/16 (~5.7M parameters at 224 px): 12 blocks, width 192, 3 heads."""
    return _timm_model("vit_tiny_patch16_224", num_classes, in_chans, img_size, **kwargs)


@register_model
def deit_tiny_patch16_224(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 224, **kwargs
) -> nn.Module:
    """DeiT-Ti/16 (~5.7M parameters): the ViT-Ti architecture of DeiT."""
    return _timm_model("deit_tiny_patch16_224", num_classes, in_chans, img_size, **kwargs)


@register_model
def deit_small_patch16_224(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 224, **kwargs
) -> nn.Module:
    """DeiT-S/16 (~22M parameters): 12 blocks, width 384, 6 heads."""
    return _timm_model("deit_small_patch16_224", num_classes, in_chans, img_size, **kwargs)


@register_model
def swin_tiny_patch4_window7_224(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 224, **kwargs
) -> nn.Module:
    """Swin-T (~28M parameters): window 7, stages of 2, 2, 6, 2 blocks with 3 to 24 heads.

    Windows larger than a stage's feature map shrink to it (timm); other sizes are padded.
    """
    return _timm_model("swin_tiny_patch4_window7_224", num_classes, in_chans, img_size, **kwargs)


@register_model
def vit_fmnist(
    num_classes: int = 10,
    in_chans: int = 1,
    img_size: int = 28,
    patch_size: int = 4,
    embed_dim: int = 96,
    depth: int = 6,
    num_heads: int = 6,
    mlp_ratio: float = 2.0,
    **kwargs,
) -> nn.Module:
    """A small ViT for 28x28 images (~0.45M parameters): 7x7 patches of 4 px plus a class
    token, 6 blocks of width 96 with 6 heads of 16 channels and an MLP of 192."""
    return _timm().models.VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        **kwargs,
    )
