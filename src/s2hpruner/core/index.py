"""One map from every layer's channels to its group's channels.

All groups' channels are numbered in one flat index, group after group, with one extra entry
at the end (``constant``) that stands for "not in any group, always kept". For every layer
this module records, once, which flat entry each of its channels is:

- ``site``: channels of an output a mask multiplies (SPEC section 3);
- ``out`` / ``in``: output and input channels of a layer the sliced hard pass slices;
- importance: which channels of which producer feed which flat channel.

The width search, the mask sites, the sliced forward and importance all read this; nobody
rebuilds it. Equal maps are stored once, so the sliced pass finds each kept set once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import UnsupportedModelError
from .kinds import norms as norm_kind
from .structure import ChannelGroup

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one input channel per output channel (its input follows its output)."""
    return isinstance(module, CONVS) and module.groups > 1 and (
        module.groups == module.in_channels == module.out_channels
    )


def out_channels(module: nn.Module) -> int:
    """Channels of a module's output (conv, linear or norm)."""
    for attr in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if norm_kind.is_channel_norm(module):
        return norm_kind.channels(module)
    if isinstance(module, nn.MultiheadAttention):  # its in_proj rows q, k, v (kinds/mha.py)
        return 3 * module.num_heads * module.head_dim
    raise UnsupportedModelError(f"cannot tell the output channels of {type(module).__name__}")


def in_channels(module: nn.Module) -> int:
    """Channels of a module's input (conv or linear)."""
    for attr in ("in_channels", "in_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise UnsupportedModelError(f"cannot tell the input channels of {type(module).__name__}")


def channel_dim(module: nn.Module) -> int:
    """The dimension of a module's output that holds its channels."""
    return -1 if isinstance(module, nn.Linear) else 1


def width_counts(groups: Sequence[ChannelGroup]) -> dict[str, tuple[list[float], list[float]]]:
    """{layer: (in_counts, out_counts)}: how many of a layer's input and output channels carry
    each group's channels (a flattened map feeding a Linear carries each one H*W times). A
    layer's width is then ``fixed + counts @ (widths / channels)``: the resource models'
    rule."""
    position = {g.name: i for i, g in enumerate(groups)}
    rows: dict[str, tuple[list[float], list[float]]] = {}
    for g in groups:
        for pieces, side in ((g.consumers, 0), (g.producers + g.norms, 1)):
            for piece in pieces:
                empty = ([0.0] * len(groups), [0.0] * len(groups))
                row = rows.setdefault(piece.module_name, empty)
                row[side][position[g.name]] += len(piece.module_idxs)
    return rows


class ChannelIndex(nn.Module):
    """Flat channel numbering of the groups and every layer's map into it (buffers, so that
    ``.to()`` moves them)."""

    def __init__(self, groups: Sequence[ChannelGroup], modules: dict[str, nn.Module]):
        super().__init__()
        self.sizes = [g.channels for g in groups]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(groups))]
        self.constant = sum(self.sizes)
        channels = torch.tensor(self.sizes)
        group_of = torch.repeat_interleave(torch.arange(len(groups)), channels)
        self.register_buffer("group_of", group_of, persistent=False)  # flat channel -> group
        self.register_buffer("group_offsets", torch.tensor(self.offsets), persistent=False)
        self._map_ids: dict[tuple, int] = {}
        self.site: dict[str, tuple[int, int]] = {}  # layer -> (map id, channel dim)
        self.out: dict[str, int] = {}
        self.inp: dict[str, int] = {}

        def layer_map(pieces_of, size_of) -> dict[str, torch.Tensor]:
            maps: dict[str, torch.Tensor] = {}
            for gi, g in enumerate(groups):
                for piece in pieces_of(g):
                    module = modules[piece.module_name]
                    index = maps.setdefault(
                        piece.module_name, torch.full((size_of(module),), self.constant)
                    )
                    index[torch.tensor(piece.module_idxs)] = (
                        torch.tensor(piece.root_idxs) + self.offsets[gi]
                    )
            return maps

        # the channel dim of each LayerNorm/GroupNorm (kinds/norms.py), else the layer's own
        self.norm_dim = {n: d for g in groups for n, d in g.norm_dims.items()}
        for name, index in layer_map(lambda g: g.mask_sites, out_channels).items():
            dim = self.norm_dim.get(name, channel_dim(modules[name]))
            self.site[name] = (self._store(index), dim)
        for name, index in layer_map(lambda g: g.producers + g.norms, out_channels).items():
            self.out[name] = self._store(index)
        for name, index in layer_map(lambda g: g.consumers, in_channels).items():
            if not (name in self.out and is_depthwise(modules[name])):  # follows its output
                self.inp[name] = self._store(index)

        # per-channel parameters outside layers (layer scale): name -> (map id, dim)
        self.param: dict[str, tuple[int, int]] = {}
        for gi, g in enumerate(groups):
            for piece in g.parameters:
                name, dim = piece.module_name, g.param_dims[piece.module_name]
                if name in self.param:
                    index = self.map(self.param[name][0]).clone()
                else:
                    index = torch.full((_parameter(modules, name).shape[dim],), self.constant)
                roots = torch.tensor(piece.root_idxs) + self.offsets[gi]
                index[torch.tensor(piece.module_idxs)] = roots
                self.param[name] = (self._store(index), dim)

        # importance: producer channels -> flat channels, averaged over each group's producers
        self.importance_sources: list[tuple[str, int]] = []
        dest = []
        for gi, g in enumerate(groups):
            for piece in g.producers:
                self.importance_sources.append(
                    (piece.module_name, self._store(torch.tensor(piece.module_idxs)))
                )
                dest.append(torch.tensor(piece.root_idxs) + self.offsets[gi])
        dest = torch.cat(dest) if dest else torch.zeros(0, dtype=torch.long)
        self.register_buffer("importance_dest", dest, persistent=False)
        producers = torch.tensor([float(len(g.producers)) for g in groups])
        self.register_buffer("producer_count", producers[group_of], persistent=False)

    def _store(self, index: torch.Tensor) -> int:
        key = tuple(index.tolist())
        if key not in self._map_ids:
            self._map_ids[key] = len(self._map_ids)
            self.register_buffer(f"map{self._map_ids[key]}", index, persistent=False)
        return self._map_ids[key]

    def map(self, map_id: int) -> torch.Tensor:
        """The stored map ``map_id`` (a buffer: on the index's device)."""
        return self._buffers[f"map{map_id}"]

    def site_map(self, name: str) -> tuple[torch.Tensor, int]:
        """(flat entry of each output channel, channel dim) of a mask site."""
        map_id, dim = self.site[name]
        return self.map(map_id), dim


def _parameter(modules: dict[str, nn.Module], name: str) -> nn.Parameter:
    """The parameter ``name`` ("owner.attr") of the model whose modules are ``modules``."""
    owner, _, attr = name.rpartition(".")
    return modules[owner]._parameters[attr]
