"""Finding structure: which channels must be pruned together, and where their masks act.

torch-pruning's DependencyGraph traces the model and groups every tensor dimension that
must keep the same channels (convs, norms, residual additions, concatenations, depthwise
convs, flattens). This module turns each such group into a :class:`ChannelGroup`: its channel
count, its producing layers (used for importance), its consumers (used for FLOPs), the points
where its mask acts (SPEC section 3) and its candidate widths. Nothing here decides widths.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .errors import UnsupportedModelError

OPTYPE = tp.ops.OPTYPE
# Node types a channel may pass through and stay exactly zero when it enters as zero.
_PASS_THROUGH = {
    OPTYPE.ELEMENTWISE,
    OPTYPE.CONCAT,
    OPTYPE.SPLIT,
    OPTYPE.RESHAPE,
    OPTYPE.SLICE,
    OPTYPE.UNBIND,
    OPTYPE.EXPAND,
    OPTYPE.PRELU,
}
_CHANNEL_MIXING_NORMS = {OPTYPE.LN, OPTYPE.GN, OPTYPE.IN}
_SUPPORTED = _PASS_THROUGH | {
    OPTYPE.CONV,
    OPTYPE.DEPTHWISE_CONV,
    OPTYPE.LINEAR,
    OPTYPE.BN,
    OPTYPE.OUTPUT,
}


@dataclass
class ChannelSlice:
    """Some channels of one module's input or output that belong to a group.

    ``module_idxs[j]`` is a channel index of the module and ``root_idxs[j]`` the group channel
    it carries (a flattened conv map feeding a Linear repeats each group channel H*W times).
    """

    module_name: str
    module_idxs: list[int]
    root_idxs: list[int]


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together, with their candidate widths."""

    name: str
    channels: int
    step: int
    candidates: list[int]
    producers: list[ChannelSlice] = field(default_factory=list)  # conv/linear outputs
    consumers: list[ChannelSlice] = field(default_factory=list)  # conv/linear inputs
    norms: list[ChannelSlice] = field(default_factory=list)  # BatchNorm channels
    mask_sites: list[ChannelSlice] = field(default_factory=list)  # outputs the mask multiplies
    root_module: str = ""
    kind: str = "channels"  # or "heads": attention heads of root_module (attention.py)
    head_dim: int = 0  # channels per head of a "heads" group

    def __repr__(self) -> str:
        return (
            f"ChannelGroup({self.name!r}, channels={self.channels}, step={self.step}, "
            f"candidates={len(self.candidates)}, producers={len(self.producers)})"
        )


def default_width_step(channels: int, max_candidates: int = 32) -> int:
    """Smallest divisor d of ``channels`` giving at most ``max_candidates`` widths k*d."""
    for d in range(1, channels + 1):
        if channels % d == 0 and channels // d <= max_candidates:
            return d
    return channels


def candidate_widths(channels: int, step: int) -> list[int]:
    """Widths d, 2d, ... up to ``channels`` (always included, even if d does not divide it)."""
    if step < 1:
        raise ValueError(f"width step must be >= 1, got {step}")
    widths = list(range(step, channels, step))
    return widths + [channels]


def classifier_layers(model: nn.Module, graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach the model output without another such layer."""
    found: list[nn.Module] = []
    outputs = [n for n in graph.module2node.values() if len(n.outputs) == 0]
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.type in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
            found.append(node.module)
            continue
        stack.extend(node.inputs)
    return found


def build_graph(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    """Trace ``model`` with torch-pruning (needs autograd, so grad mode is forced on)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, verbose=False
            )
    except UnsupportedModelError:
        raise
    except Exception as exc:  # torch-pruning raises plain errors on untraceable ops
        raise UnsupportedModelError(
            f"torch-pruning could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Channel shuffles and other reshapes that move channels across groups are not "
            "supported; list the layers around them in ignored_layers or use another model"
        ) from exc
    finally:
        model.train(was_training)
    return graph


def find_groups(
    model: nn.Module,
    example_inputs,
    width_step: int | None = None,
    ignored_layers: Iterable[nn.Module | str] = (),
    max_candidates: int = 32,
    graph: tp.DependencyGraph | None = None,
) -> tuple[list[ChannelGroup], tp.DependencyGraph]:
    """Trace ``model`` and return its prunable channel groups (and the dependency graph).

    Groups whose channels pass through a norm that mixes channels (LayerNorm, GroupNorm,
    InstanceNorm) are left out of the search with a warning: a multiplicative mask cannot
    emulate removing a channel there. A group touching a layer kind the pruner cannot mask
    or count raises :class:`UnsupportedModelError` naming that layer.

    Attention modules (attention.py) get one head group each, built by hand; their qkv and
    proj layers are ignored here, which also (silently) drops the residual stream's group.
    """
    from . import attention as attention_kind  # imports this module
    graph = graph or build_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    ignored: list[nn.Module] = []
    for layer in ignored_layers:
        if isinstance(layer, str):
            if layer not in by_name:
                raise UnsupportedModelError(f"ignored layer {layer!r} is not a module of the model")
            layer = by_name[layer]
        ignored.append(layer)
    ignored += [m for m in classifier_layers(model, graph) if m not in ignored]
    attention, attention_layers = attention_kind.find_attention(model)
    user_ignored = list(ignored)
    ignored += [m for m in attention_layers if m not in ignored]

    groups: list[ChannelGroup] = []
    for tp_group in graph.get_all_groups(
        ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Conv1d, nn.Linear)
    ):
        group = _to_channel_group(tp_group, graph, names, width_step, max_candidates)
        if group is not None:
            groups.append(group)
    groups += attention_kind.head_groups(attention, user_ignored, max_candidates)
    return groups, graph


def _to_channel_group(tp_group, graph, names, width_step, max_candidates):
    root = tp_group[0].dep.target.module
    root_name = names[root]
    channels = len(tp_group[0].idxs)
    group = ChannelGroup(name=root_name, channels=channels, step=1, candidates=[channels])
    group.root_module = root_name
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        if node.type in _CHANNEL_MIXING_NORMS:
            warnings.warn(
                f"group {root_name!r} is left out of the search: its channels pass through "
                f"{names.get(module, module)} ({type(module).__name__}), a norm that mixes "
                "channels, which a multiplicative mask cannot emulate",
                stacklevel=3,
            )
            return None
        if node.type not in _SUPPORTED:
            label = names.get(module, None) or type(module).__name__
            raise UnsupportedModelError(
                f"layer {label!r} ({type(module).__name__}, in the channel group of "
                f"{root_name!r}) is not supported by s2hpruner; list it (or its producer) in "
                "ignored_layers to keep that group unpruned"
            )
        if not isinstance(module, nn.Module) or module not in names:
            continue  # pseudo-ops (add, cat, flatten): nothing to count or mask
        piece = ChannelSlice(names[module], list(item.idxs), list(item.root_idxs))
        if node.type == OPTYPE.BN:
            group.norms.append(piece)
        elif graph.is_out_channel_pruning_fn(handler):
            group.producers.append(piece)
        elif graph.is_in_channel_pruning_fn(handler):
            group.consumers.append(piece)
    if not group.producers:
        return None
    group.mask_sites = _mask_sites(group, graph, names)
    step = width_step or default_width_step(channels, max_candidates)
    group.step = min(step, channels)
    group.candidates = candidate_widths(channels, group.step)
    return group


def _mask_sites(group: ChannelGroup, graph, names) -> list[ChannelSlice]:
    """SPEC section 3: after every BatchNorm of the group, and after every producer that
    reaches a consumer (or the output) without passing one of those BatchNorms."""
    by_name = {n: m for m, n in names.items()}
    norm_modules = {by_name[s.module_name] for s in group.norms}
    sites = list(group.norms)
    for producer in group.producers:
        node = graph.module2node[by_name[producer.module_name]]
        if _reaches_consumer_unnormalised(node, norm_modules):
            sites.append(producer)
    return sites


def _reaches_consumer_unnormalised(start, norm_modules: set[nn.Module]) -> bool:
    stack, seen = list(start.outputs), set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.module in norm_modules:
            continue
        if node.type in _PASS_THROUGH:
            if not node.outputs:
                return True
            stack.extend(node.outputs)
            continue
        return True  # a consumer layer, the output, or anything that is not zero-preserving
    return False


def describe(groups: Sequence[ChannelGroup]) -> str:
    """A readable table of the groups (for logs and the CLI)."""
    lines = [f"{'group':40s} {'channels':>8s} {'step':>5s} {'producers':>9s} {'sites':>5s}"]
    for g in groups:
        lines.append(
            f"{g.name:40s} {g.channels:8d} {g.step:5d} {len(g.producers):9d} {len(g.mask_sites):5d}"
        )
    return "\n".join(lines)
