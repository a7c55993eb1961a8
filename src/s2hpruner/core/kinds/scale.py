"""Per-channel parameters outside any layer: layer scales (ConvNeXt's ``gamma``, torchvision's
``layer_scale``, timm MetaFormer's ``Scale``).

torch-pruning traces them as "unwrapped parameters" of a channel group and slices them on
export. They multiply channels, so a zero channel stays zero (no mask needed); the sliced
hard pass swaps in the kept entries for the duration of its forward; the resource model counts
``numel / channels`` parameters per kept channel. Some owners also keep the parameter's shape
in a plain attribute (timm's ``Scale.shape = (dim, 1, 1)``): it follows the kept size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def owner_of(modules: dict[str, nn.Module], name: str) -> tuple[nn.Module, str]:
    """(module, attribute) of the parameter ``name`` ("owner.attr")."""
    owner, _, attr = name.rpartition(".")
    return modules[owner], attr


def _shape_for(owner: nn.Module, old: torch.Size, new: torch.Size):
    shape = getattr(owner, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape) and (
            math.prod(shape) == math.prod(old) and old != new):  # fmt: skip
        changed = [s for s, t in zip(old, new, strict=True) if s != t]
        if len(changed) == 1:
            return tuple(new[list(old).index(changed[0])] if s == changed[0] else s
                         for s in shape)  # fmt: skip
    return None


class SwapParameter:
    """The parameter ``owner.attr`` sliced to the ``kept`` entries along ``dim`` (and the
    owner's ``shape`` attribute, if it has one) until ``remove()``."""

    def __init__(self, modules: dict[str, nn.Module], name: str, dim: int, kept):
        self.owner, self.attr = owner_of(modules, name)
        self.saved = self.owner._parameters[self.attr]
        self.shape = getattr(self.owner, "shape", None)
        if kept is not None:
            value = self.saved.index_select(dim, kept)
            self.owner._parameters[self.attr] = value
            shape = _shape_for(self.owner, self.saved.shape, value.shape)
            if shape is not None:
                self.owner.shape = shape

    def remove(self) -> None:
        self.owner._parameters[self.attr] = self.saved
        shape = getattr(self.owner, "shape", None)
        if shape is not None and shape != self.shape:
            self.owner.shape = self.shape


def fix_exported(model: nn.Module, groups: Sequence, original: dict[str, torch.Size]) -> None:
    """After torch-pruning sliced the layer scales of ``model``, let their owners' shape
    attributes follow (``original``: each parameter's shape before pruning)."""
    modules = dict(model.named_modules())
    for g in groups:
        for piece in getattr(g, "parameters", ()):
            owner, attr = owner_of(modules, piece.module_name)
            new = owner._parameters[attr].shape
            shape = _shape_for(owner, original[piece.module_name], new)
            if shape is not None:
                owner.shape = shape


def shapes(model: nn.Module, groups: Sequence) -> dict[str, torch.Size]:
    """The shapes of the groups' layer scales in ``model`` (before export prunes them)."""
    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        for piece in getattr(g, "parameters", ()):
            owner, attr = owner_of(modules, piece.module_name)
            out[piece.module_name] = owner._parameters[attr].shape
    return out
