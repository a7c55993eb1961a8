"""LayerNorm and GroupNorm over a pruned channel dimension (ConvNeXt, PoolFormer, ...).

Such a norm mixes channels: its statistics are taken over all of them, so a multiplicative
mask cannot emulate removing one (SPEC section 3). Here the norm itself changes instead:

* hard network (masked path): the norm's mean and variance are taken over the channels whose
  mask is non-zero only, and its output is masked (the mask folded into its affine
  parameters). That is exactly what the exported norm computes on the kept channels, since
  torch-pruning removes the pruned channels' weight, bias and ``normalized_shape`` entries;
* hard network (sliced path): the norm sees only the kept channels and runs as usual;
* soft network: every relaxed mask is positive, so the statistics are the ordinary ones and
  the soft mask multiplies the norm's output ("masked after the norm").

A channel whose mask is exactly zero is absent in every mode, so the rule is one formula. How a
norm normalises (over the last dim, over dim 1 of an NCHW map, or in GroupNorm groups) is found
once by comparing its forward with ``F.layer_norm`` / ``F.group_norm`` (:func:`channel_dim`);
norms that match neither (several normalised dims, custom maths) leave their group out of the
search with a warning, as before. GroupNorm with more than one group ties block positions like
a grouped conv (see :mod:`.grouped`), so its groups keep equal sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..modes import evaluating

if TYPE_CHECKING:  # (structure imports this module)
    from ..structure import ExampleInputs

NORMS = (nn.LayerNorm, nn.GroupNorm)


def is_channel_norm(module: nn.Module) -> bool:
    """A LayerNorm or GroupNorm (or a subclass, e.g. timm's LayerNorm2d / GroupNorm1)."""
    return isinstance(module, NORMS)


def channels(module: nn.Module) -> int:
    """The channels a norm normalises."""
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    return int(module.normalized_shape[-1])


def norm(module: nn.Module, x: torch.Tensor, dim: int, keep: torch.Tensor | None = None):
    """The norm's output on ``x`` with statistics over the channels where ``keep`` (one bool
    per channel along ``dim``) is True, or over all of ``x``'s channels (``keep`` None)."""
    weight, bias, eps = module.weight, module.bias, module.eps
    if isinstance(module, nn.GroupNorm):
        groups = module.num_groups
        if keep is None:
            return F.group_norm(x, groups, weight, bias, eps)
        n, c = x.shape[:2]
        xg = x.reshape(n, groups, c // groups, -1)
        k = keep.to(x.dtype).reshape(1, groups, c // groups, 1)
        count = k.sum(2, keepdim=True) * xg.shape[-1]
        mean = (xg * k).sum((2, 3), keepdim=True) / count
        var = ((xg - mean) ** 2 * k).sum((2, 3), keepdim=True) / count
        y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
        shape = [1, -1] + [1] * (x.dim() - 2)
    else:
        if keep is None:
            if dim == -1:
                return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
            y = F.layer_norm(x.movedim(dim, -1), (x.shape[dim],), weight, bias, eps)
            return y.movedim(-1, dim)
        shape = [1] * x.dim()
        shape[dim] = -1
        k = keep.to(x.dtype).view(shape)
        count = k.sum()
        mean = (x * k).sum(dim, keepdim=True) / count
        var = ((x - mean) ** 2 * k).sum(dim, keepdim=True) / count
        y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


@torch.no_grad()
def channel_dim(module: nn.Module, x: torch.Tensor) -> int | None:
    """The dim of ``x`` a norm normalises (1 or -1, always 1 for GroupNorm), found by matching
    its forward; None when :func:`norm` does not reproduce it."""
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return None
    c = channels(module)
    try:
        reference = module(x)
    except Exception:  # a norm that cannot run on its own recorded input: not ours to handle
        return None
    if not torch.is_tensor(reference) or reference.shape != x.shape:
        return None
    options = [1] if isinstance(module, nn.GroupNorm) else [-1, 1]
    for dim in options:
        if x.dim() < 2 or x.shape[dim] != c:
            continue
        mine = norm(module, x, dim)
        if torch.allclose(mine, reference, rtol=1e-4, atol=1e-5):
            return dim if dim == 1 else -1
    return None


def record_dims(
    model: nn.Module, example_inputs: ExampleInputs, names: list[str]
) -> dict[str, int | None]:
    """:func:`channel_dim` of the named norms, from one eval forward on ``example_inputs``."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(module, inputs, name=name):
            if name not in seen and inputs and torch.is_tensor(inputs[0]):
                seen[name] = inputs[0].detach()
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            inputs = example_inputs if isinstance(example_inputs, list | tuple) else (
                example_inputs,)  # fmt: skip
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: (channel_dim(modules[n], seen[n]) if n in seen else None) for n in names}


class _Override:
    """Replace a module's forward until ``remove()`` (hooks still run around it)."""

    def __init__(self, module: nn.Module, forward):
        self.module = module
        self.saved = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.saved is not None:
            self.module.forward = self.saved
        else:
            self.module.__dict__.pop("forward", None)


def override(module: nn.Module, dim: int, keep: torch.Tensor | None) -> _Override:
    """Make ``module`` compute :func:`norm` (statistics over ``keep``, or over its input's
    channels) until the returned handle is removed. Affine parameters are read at call time,
    so a mask folded into them by a pre-hook applies."""

    def forward(x, *args, **kwargs):
        return norm(module, x, dim, keep)

    return _Override(module, forward)
