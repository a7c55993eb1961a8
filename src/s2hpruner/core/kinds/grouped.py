"""Grouped convolutions that are not depthwise (ResNeXt, RegNet): pruned as torch-pruning does.

A conv with g groups computes output block b from input block b only. torch-pruning keeps the
number of groups and removes the SAME positions from every block (its pruner averages the
importance over the g blocks and ``ConvPruner.prune_in_channels`` keeps the first block's
kept positions): so after pruning every block still has equally many channels and the conv
stays a valid g-group conv. Here that constraint becomes the group's unit: the channels at
position j of every block of every grouped conv (or GroupNorm) in the group are one *unit*,
kept or removed together. The group's channels, candidates and masks count units (like an
attention group counts heads); its widths in channels move in steps of g.

Everything else follows: a unit's channels share one flat mask entry (ChannelIndex maps many
module channels to one group channel), the sliced pass slices a grouped conv's weight rows by
its kept outputs and its (per-block) input columns by the kept positions, the resource row is
``2 * k * (C_in / g) * C_out * positions`` with g fixed, and export is torch-pruning's own.
"""

from __future__ import annotations

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_grouped(module: nn.Module) -> bool:
    """A conv with groups > 1 that is not depthwise (its input does not follow its output)."""
    return isinstance(module, CONVS) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels
    )


def block_size(module: nn.Module, side: str) -> int | None:
    """Channels per block of a grouped conv's ``side`` ("in" / "out") or of a GroupNorm with
    more than one group (None: the module does not tie positions across blocks)."""
    if is_grouped(module):
        channels = module.in_channels if side == "in" else module.out_channels
        return channels // module.groups
    if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
        return module.num_channels // module.num_groups
    return None


def units(channels: int, pieces: list[tuple[nn.Module, str, list[int], list[int]]]):
    """Split a group's ``channels`` root channels into units: root channels carried at the same
    block position of some grouped layer belong together (union-find).

    ``pieces`` are (module, side, module_idxs, root_idxs). Returns ``(unit_of_root, size)``:
    the unit id of every root channel (units numbered by their smallest root channel) and the
    channels per unit, or None when no grouped layer ties channels (size 1), or the string
    reason when the units differ in size (then the group cannot be pruned evenly).
    """
    parent = list(range(channels))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    tied = False
    for module, side, module_idxs, root_idxs in pieces:
        size = block_size(module, side)
        if size is None:
            continue
        first: dict[int, int] = {}
        for i, r in zip(module_idxs, root_idxs, strict=True):
            position = i % size
            if position in first:
                a, b = find(first[position]), find(r)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                    tied = True
            else:
                first[position] = r
    if not tied:
        return None
    roots = [find(r) for r in range(channels)]
    ids = {root: k for k, root in enumerate(sorted(set(roots)))}
    sizes = [roots.count(root) for root in ids]
    if len(set(sizes)) != 1:
        return f"its grouped layers tie channels into units of different sizes {sorted(set(sizes))}"
    return [ids[root] for root in roots], sizes[0]


def weight_in_index(module: nn.Module, in_idx: torch.Tensor | None) -> torch.Tensor | None:
    """The weight columns of a grouped conv for its kept input channels: the kept positions
    of one block (every block keeps the same ones; ``in_idx`` is sorted)."""
    if in_idx is None or not is_grouped(module):
        return in_idx
    return in_idx[: in_idx.numel() // module.groups]
