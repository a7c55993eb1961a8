"""Finding structure: which channels must be pruned together, and where their masks act.

torch-pruning's DependencyGraph traces the model and groups every tensor dimension that
must keep the same channels (convs, norms, residual additions, concatenations, depthwise
convs, flattens). This module turns each such group into a :class:`ChannelGroup`: its channel
count, its producing layers (used for importance), its consumers (used for FLOPs), the points
where its mask acts (SPEC section 3) and its candidate widths. Nothing here decides widths.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as _tp_index_mapping
from torch_pruning.dependency import shape_infer as _tp_shape_infer

from .errors import UnsupportedModelError
from .kinds import grouped as grouped_kind
from .kinds import norms as norm_kind
from .modes import evaluating

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
_CHANNEL_MIXING_NORMS = {OPTYPE.IN}  # LayerNorm / GroupNorm: kinds/norms.py
_SUPPORTED = _PASS_THROUGH | {
    OPTYPE.CONV,
    OPTYPE.DEPTHWISE_CONV,
    OPTYPE.LINEAR,
    OPTYPE.BN,
    OPTYPE.LN,
    OPTYPE.GN,
    OPTYPE.PARAMETER,  # a per-channel parameter outside a layer (layer scale): sliced, counted
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
    norms: list[ChannelSlice] = field(default_factory=list)  # BatchNorm/LayerNorm/GroupNorm
    mask_sites: list[ChannelSlice] = field(default_factory=list)  # outputs the mask multiplies
    root_module: str = ""
    kind: str = "channels"  # or "heads": attention heads of root_module (attention.py)
    head_dim: int = 0  # channels per head of a "heads" group, per unit of a "grouped" one
    # per-channel parameters outside layers (name -> dim): ConvNeXt's layer scale
    parameters: list[ChannelSlice] = field(default_factory=list)
    param_dims: dict[str, int] = field(default_factory=dict)
    norm_dims: dict[str, int] = field(default_factory=dict)  # LayerNorm/GroupNorm channel dim
    # grouped convs (kinds/grouped.py): group channel of each root channel ([]: the same)
    root_units: list[int] = field(default_factory=list)

    def root_channels(self, channels: Iterable[int]) -> list[int]:
        """The root layer's channels of some group channels (for torch-pruning's export)."""
        chosen = set(channels)
        if not self.root_units:
            return sorted(chosen)
        return [r for r, unit in enumerate(self.root_units) if unit in chosen]

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


class _OneNode:
    """A dependency graph seen through one of its nodes: torch-pruning's whole-graph passes
    (shape inference, index maps) run on it one node at a time."""

    def __init__(self, graph: tp.DependencyGraph, module, node):
        self._graph = graph
        self.module2node = {module: node}

    def __getattr__(self, name: str):
        return getattr(self._graph, name)


def _per_node(original):
    """``original(graph)`` (a torch-pruning pass over every node), which when it raises is
    run node by node: a node whose shapes it cannot infer (a reshape next to the model input,
    a chunk of unknown size) is recorded in ``graph._s2h_broken`` (node -> error) and keeps
    its default index map; groups through it are left out of the search
    (:func:`_to_channel_group`). Without this, one such op made torch-pruning's trace fail
    and the whole model was refused (ShuffleNetV2, DPN, CSPNet, CoaT, Swin at small inputs)."""
    if getattr(original, "_s2h_per_node", False):
        return original

    def run(graph) -> None:
        try:
            original(graph)
            return
        except Exception:  # noqa: BLE001 - retried node by node below
            pass
        broken = graph.__dict__.setdefault("_s2h_broken", {})
        for module, node in list(graph.module2node.items()):
            try:
                original(_OneNode(graph, module, node))
            except Exception as exc:  # noqa: BLE001 - recorded; its groups are left out
                broken[node] = f"{type(exc).__name__}: {exc}"

    run._s2h_per_node = True
    return run


@contextlib.contextmanager
def tolerant_passes() -> Iterator[None]:
    """torch-pruning's shape inference and index-map passes run through :func:`_per_node`
    while open."""
    saved = (_tp_shape_infer.init_shape_information, _tp_index_mapping.update_index_mapping)
    _tp_shape_infer.init_shape_information = _per_node(saved[0])
    _tp_index_mapping.update_index_mapping = _per_node(saved[1])
    try:
        yield
    finally:
        _tp_shape_infer.init_shape_information, _tp_index_mapping.update_index_mapping = saved


# what a model is traced, counted and probed on: one tensor, or the inputs of its forward as
# a tuple, list or dict of tensors
ExampleInputs = torch.Tensor | tuple | list | dict


def inputs_on_device_of(model: nn.Module, example_inputs: ExampleInputs) -> ExampleInputs:
    """``example_inputs`` (a tensor, or a list, tuple or dict of them) on the device of
    ``model``'s weights: a pruner built before the model moved still traces and exports it."""
    weight = next(model.parameters(), None)
    if weight is None:
        return example_inputs
    if torch.is_tensor(example_inputs):
        return example_inputs.to(weight.device)
    if isinstance(example_inputs, list | tuple):
        moved = [inputs_on_device_of(model, v) for v in example_inputs]
        return type(example_inputs)(*moved) if hasattr(example_inputs, "_fields") else (
            type(example_inputs)(moved))  # a namedtuple takes its fields one by one
    if isinstance(example_inputs, dict):
        return {k: inputs_on_device_of(model, v) for k, v in example_inputs.items()}
    return example_inputs


# torchvision's auxiliary classifiers (googlenet, inception_v3): run whenever present and
# training, so the traced (eval-mode) graph never sees them
AUX_HEADS = ("aux1", "aux2", "AuxLogits")


def build_graph(model: nn.Module, example_inputs: ExampleInputs) -> tp.DependencyGraph:
    """Trace ``model`` with torch-pruning (needs autograd, so grad mode is forced on)."""
    example_inputs = inputs_on_device_of(model, example_inputs)
    aux = [f"{name}.{head}".lstrip(".") for name, module in model.named_modules()
           for head in AUX_HEADS if isinstance(getattr(module, head, None), nn.Module)]  # fmt: skip
    if aux:
        raise UnsupportedModelError(
            f"{type(model).__name__} has auxiliary classifiers ({', '.join(aux)}): they run "
            "only in training, on features the pruner narrows without seeing them (it traces "
            "in eval mode), and would fail there; build it with aux_logits=False (torchvision "
            "googlenet / inception_v3; s2hpruner's own model zoo does)"
        )
    try:
        with evaluating(model), torch.enable_grad(), tolerant_passes():
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
    return graph


def _graph_state(graph: tp.DependencyGraph) -> tuple:
    """What torch-pruning's index maps depend on: every tensor shape of the model and the
    sizes its concat/split ops recorded (both change only when something is pruned)."""
    model = graph.model
    shapes = tuple(tuple(t.shape) for t in model.parameters())
    shapes += tuple(tuple(t.shape) for t in model.buffers())
    sizes = tuple(
        (tuple(getattr(n.module, "concat_sizes", None) or ()),
         tuple(getattr(n.module, "split_sizes", None) or ()))
        for n in graph.module2node.values()
        if n.type in (OPTYPE.CONCAT, OPTYPE.SPLIT)
    )  # fmt: skip
    return shapes, sizes


@contextlib.contextmanager
def index_mapping_once() -> Iterator[None]:
    """Let torch-pruning recompute a graph's index maps only when the graph has changed.

    ``DependencyGraph.get_pruning_group`` recomputes every concat/split/reshape index map of
    the whole graph on each call, and each concat's costs a bounded but large recursive shape
    inference: on nets with many concatenations (DenseNet, DPN, DLA, VoVNet, HRNet) building
    the groups was quadratic and took minutes. The maps are a function of the graph's shapes,
    so they are recomputed only when :func:`_graph_state` differs from the last time.
    """
    original = _tp_index_mapping.update_index_mapping
    if getattr(original, "_s2h_memo", False):  # nested
        yield
        return
    tolerant = _per_node(original)

    def update(graph) -> None:
        state = _graph_state(graph)
        if getattr(graph, "_s2h_index_state", None) != state:
            tolerant(graph)
            graph._s2h_index_state = state

    update._s2h_memo = True
    _tp_index_mapping.update_index_mapping = update
    try:
        yield
    finally:
        _tp_index_mapping.update_index_mapping = original


class _IndexBlowup(Exception):
    """An index map produced more indices than any layer of the model has channels, or one
    group's traversal took more steps than a sane group needs."""


class _BoundedMapping:
    """An index map (None: the identity) that raises :class:`_IndexBlowup` past ``limit``
    indices, or once the traversal's shared step ``budget`` is spent."""

    def __init__(self, mapping, limit: int, budget: list[int], broken: str | None = None):
        self.mapping, self.limit, self.budget, self.broken = mapping, limit, budget, broken

    def __call__(self, idxs):
        if self.broken is not None:
            raise _IndexBlowup(self.broken)
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise _IndexBlowup
        out = idxs if self.mapping is None else self.mapping(idxs)
        if len(out) > self.limit:
            raise _IndexBlowup
        return out


def _bound_index_maps(graph: tp.DependencyGraph) -> list[int]:
    """Wrap the graph's index maps so a traversal stops once it holds more indices than the
    widest layer (a window partition mistaken for a flatten multiplies them at every step) or
    has taken more steps than the returned budget allows (reset it per group: a concat
    whose offsets torch-pruning could not infer sends DPN's traversal round in circles)."""
    widths = [
        getattr(m, attr) for m in graph.model.modules()
        for attr in ("in_channels", "out_channels", "in_features", "out_features",
                     "num_features", "normalized_shape", "num_channels")
        if isinstance(getattr(m, attr, None), int)
    ]  # fmt: skip
    limit = max(widths, default=1 << 20)
    budget = [0]
    broken = getattr(graph, "_s2h_broken", {})
    names = {m: n for n, m in graph.model.named_modules()}
    for node in graph.module2node.values():
        for dep in node.dependencies:
            maps = dep.index_mapping
            bad = next((n for n in (dep.source, dep.target) if n in broken), None)
            reason = None if bad is None else (
                f"{_op_label(bad, names)}, whose channel count torch-pruning cannot infer "
                f"({broken[bad][:100]})")  # fmt: skip
            for i, mapping in enumerate(maps):
                if i == 0 or mapping is not None:
                    if isinstance(mapping, _BoundedMapping):
                        mapping = mapping.mapping
                    maps[i] = _BoundedMapping(mapping, limit, budget, reason)
    return budget


def _all_groups(graph: tp.DependencyGraph, ignored: list[nn.Module], root_types, names):
    """``DependencyGraph.get_all_groups``, with index maps computed once and bounded: a root
    whose group cannot be traced within the bound, or whose traversal fails inside
    torch-pruning, is left out of the search (warned)."""
    groups, visited = [], set()
    ignored_ids = {id(m) for m in [*ignored, *graph.IGNORED_LAYERS_IN_TRACING]}
    _tp_index_mapping.update_index_mapping(graph)
    budget = _bound_index_maps(graph)
    steps = 10 * sum(len(n.dependencies) for n in graph.module2node.values()) + 1000
    for module in list(graph.module2node):
        if id(module) in ignored_ids or id(module) in visited:
            continue
        if not isinstance(module, root_types):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        budget[0] = steps
        try:
            group = graph.get_pruning_group(
                module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
            )
        except Exception as exc:  # noqa: BLE001 - torch-pruning's traversal; reported
            visited.add(id(module))
            if isinstance(exc, _IndexBlowup):
                reason = exc.args[0] if exc.args else "a reshape (e.g. a window partition)"
            else:
                reason = f"its index maps ({type(exc).__name__}: {str(exc)[:100]})"
            warnings.warn(
                f"group {names.get(module, module)!r} is left out of the search: torch-pruning "
                f"cannot follow its channels through {reason}; its channels are kept",
                stacklevel=4,
            )
            continue
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                prunable = prunable and id(dep.target.module) not in ignored_ids
        if prunable:
            groups.append(group)
    return groups


def find_groups(
    model: nn.Module,
    example_inputs,
    width_step: int | None = None,
    ignored_layers: Iterable[nn.Module | str] = (),
    max_candidates: int = 32,
    graph: tp.DependencyGraph | None = None,
    embedding: bool = False,
) -> tuple[list[ChannelGroup], tp.DependencyGraph]:
    """Trace ``model`` and return its prunable channel groups (and the dependency graph).

    Groups through a LayerNorm or GroupNorm are searched with norms whose statistics follow
    the kept channels (kinds/norms.py); groups through an InstanceNorm, or a norm that is not a
    plain layer/group norm, are left out with a warning. Groups tied by grouped convs are
    searched in units of block positions (kinds/grouped.py). A group touching a layer kind the
    pruner cannot mask or count raises :class:`UnsupportedModelError` naming that layer.

    Attention modules (attention.py) get one head group each, built by hand; their qkv and
    proj layers are ignored here, which also drops the residual stream's group, unless
    ``embedding`` asks for the embedding width (then only the heads' own sides are left out).
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
    internal: set[tuple[int, str]] = set()
    if embedding:  # heads' own channels stay out of torch-pruning's groups, the stream is in
        internal = attention_kind.internal_sides(attention)
        inside = {m for m, _ in internal}
        attention_layers = [m for m in attention_layers if id(m) not in inside]
    ignored += [m for m in attention_layers if m not in ignored]

    groups: list[ChannelGroup] = []
    with warnings.catch_warnings(record=True) as left_out:
        warnings.simplefilter("always")
        with index_mapping_once():
            tp_groups = _all_groups(graph, ignored, (nn.Conv2d, nn.Conv1d, nn.Linear), names)
        for tp_group in tp_groups:
            if internal and _touches(tp_group, graph, internal):
                continue  # a head's q/k/v or output channels: the head group has them
            group = _to_channel_group(tp_group, graph, names, width_step, max_candidates)
            if group is not None:
                groups.append(group)
        groups = _with_norm_dims(groups, model, example_inputs)
        groups += attention_kind.head_groups(attention, user_ignored, max_candidates)
    for w in left_out:  # passed on, under the caller's warning filters
        warnings.warn(w.message, w.category, stacklevel=2)
    reasons = [str(w.message) for w in left_out if "left out" in str(w.message)
               or "keeps all its heads" in str(w.message)]  # fmt: skip
    if not groups and reasons:  # refused by name, not as "nothing to prune"
        raise UnsupportedModelError(
            f"{type(model).__name__} has no channel group s2hpruner can prune: "
            f"{len(reasons)} were left out, e.g. {reasons[0]}. Replace the layer named there "
            "with a standard one (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, "
            "nn.MultiheadAttention) or prune another model"
        )
    return groups, graph


def _touches(tp_group, graph, sides: set[tuple[int, str]]) -> bool:
    """Whether a torch-pruning group holds one of ``sides`` ((id(module), "in" / "out"))."""
    for item in tp_group:
        handler = item.dep.handler
        side = "out" if graph.is_out_channel_pruning_fn(handler) else "in"
        if (id(item.dep.target.module), side) in sides:
            return True
    return False


def _with_norm_dims(groups: list[ChannelGroup], model, example_inputs) -> list[ChannelGroup]:
    """Record how every LayerNorm/GroupNorm of the groups normalises (kinds/norms.py); a
    group with a norm whose forward is not a plain layer/group norm is left out."""
    modules = dict(model.named_modules())
    names = sorted({p.module_name for g in groups for p in g.norms
                    if norm_kind.is_channel_norm(modules[p.module_name])})  # fmt: skip
    if not names:
        return groups
    dims = norm_kind.record_dims(model, example_inputs, names)
    kept = []
    for g in groups:
        bad = [p.module_name for p in g.norms if p.module_name in dims and dims[p.module_name]
               is None]  # fmt: skip
        if bad:
            warnings.warn(
                f"group {g.name!r} is left out of the search: its channels pass through "
                f"{bad[0]!r} ({type(modules[bad[0]]).__name__}), a norm whose statistics "
                "s2hpruner cannot restrict to the kept channels (not a LayerNorm over one "
                "channel dim or a GroupNorm)",
                stacklevel=3,
            )
            continue
        g.norm_dims = {p.module_name: dims[p.module_name] for p in g.norms
                       if p.module_name in dims}  # fmt: skip
        kept.append(g)
    return kept


def _to_channel_group(tp_group, graph, names, width_step, max_candidates):
    root = tp_group[0].dep.target.module
    root_name = names[root]
    channels = len(tp_group[0].idxs)
    group = ChannelGroup(name=root_name, channels=channels, step=1, candidates=[channels])
    group.root_module = root_name
    broken = getattr(graph, "_s2h_broken", {})
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        if node in broken:
            warnings.warn(
                f"group {root_name!r} is left out of the search: its channels pass through "
                f"{_op_label(node, names)}, whose channel count torch-pruning cannot infer "
                f"({broken[node][:120]}); its channels are kept",
                stacklevel=3,
            )
            return None
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
        if _splits_channels(node):
            warnings.warn(
                f"group {root_name!r} is left out of the search: its channels pass through a "
                f"channel split ({_op_label(node, names)}) whose sizes are fixed in the model's "
                "code (torch.split, chunk or a channel slice), which cannot follow removed "
                "channels",
                stacklevel=3,
            )
            return None
        if node.type == OPTYPE.PARAMETER:  # layer scale: sliced and counted (kinds/norms.py)
            name = graph._param_to_name.get(module)
            if name is None:
                return None
            size = module.shape[node.pruning_dim % module.dim()] if module.dim() else 0
            if not item.idxs or max(item.idxs) >= size or None in item.root_idxs:
                warnings.warn(
                    f"group {root_name!r} is left out of the search: torch-pruning maps it to "
                    f"entries that parameter {name!r} does not have (a reshape it cannot "
                    "follow)",
                    stacklevel=3,
                )
                return None
            group.parameters.append(ChannelSlice(name, list(item.idxs), list(item.root_idxs)))
            group.param_dims[name] = node.pruning_dim % module.dim()
            continue
        if node.type == OPTYPE.PRELU and isinstance(module, nn.PReLU) and module in names:
            if module.num_parameters > 1:  # a slope per channel: sliced and counted like a
                name = f"{names[module]}.weight"  # layer scale (kinds/scale.py)
                group.parameters.append(ChannelSlice(name, list(item.idxs),
                                                     list(item.root_idxs)))  # fmt: skip
                group.param_dims[name] = 0
            continue  # PReLU(0) = 0: a removed channel stays zero, no mask needed
        if not isinstance(module, nn.Module) or module not in names:
            continue  # pseudo-ops (add, cat, flatten): nothing to count or mask
        piece = ChannelSlice(names[module], list(item.idxs), list(item.root_idxs))
        if node.type in (OPTYPE.BN, OPTYPE.LN, OPTYPE.GN):
            group.norms.append(piece)
        elif graph.is_out_channel_pruning_fn(handler):
            group.producers.append(piece)
        elif graph.is_in_channel_pruning_fn(handler):
            group.consumers.append(piece)
    if not group.producers:
        return None
    bad = _inconsistent_piece(group, channels, names)
    if bad is not None:
        warnings.warn(
            f"group {root_name!r} is left out of the search: torch-pruning maps it to channels "
            f"that {bad!r} does not have (a reshape or split it cannot follow)",
            stacklevel=3,
        )
        return None
    group.mask_sites = _mask_sites(group, graph, names)
    if not _tie_units(group, names, width_step):
        return None
    channels = group.channels
    step = group.step if group.root_units else width_step
    step = step or default_width_step(channels, max_candidates)
    group.step = min(step, channels)
    group.candidates = candidate_widths(channels, group.step)
    return group


def _tie_units(group: ChannelGroup, names, width_step: int | None) -> bool:
    """Grouped convs (kinds/grouped.py): renumber the group's channels as units of channels
    kept together. False (with a warning) when the units cannot be made equal."""
    by_name = {n: m for m, n in names.items()}
    sides = [(p, "out") for p in group.producers + group.norms] + [
        (p, "in") for p in group.consumers]  # fmt: skip
    found = grouped_kind.units(group.channels, [
        (by_name[p.module_name], side, p.module_idxs, p.root_idxs) for p, side in sides])
    if found is None:
        return True
    if isinstance(found, str):
        warnings.warn(f"group {group.name!r} is left out of the search: {found}", stacklevel=4)
        return False
    unit_of, size = found
    group.root_units = unit_of
    group.channels = group.channels // size
    group.kind = "grouped"
    group.head_dim = size  # root channels per unit
    group.step = -(-width_step // size) if width_step else 0
    pieces = group.producers + group.consumers + group.norms + group.mask_sites
    for piece in {id(p): p for p in pieces + group.parameters}.values():  # sites are shared
        piece.root_idxs = [unit_of[r] for r in piece.root_idxs]
    return True


def _splits_channels(node) -> bool:
    """A split, unbind or slice along the channel dimension (torch-pruning maps indices
    through it; only such ops get offsets or a channel-dim slice)."""
    if node.type in (OPTYPE.SPLIT, OPTYPE.UNBIND):
        return getattr(node.module, "offsets", None) is not None
    if node.type == OPTYPE.SLICE:
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if sizes is None or dim is None:
            return True
        channel_dim = 2 if len(sizes) == 3 else 1  # torch-pruning's rule: (B, N, C) tokens
        return dim % len(sizes) == channel_dim
    return False


def _op_label(node, names) -> str:
    """A pseudo-op named by its kind and the nearest named layer before it."""
    kind = node.grad_fn.name() if node.grad_fn is not None else node.type.name
    stack, seen = list(node.inputs), set()
    while stack:
        previous = stack.pop(0)
        if id(previous) in seen:
            continue
        seen.add(id(previous))
        if previous.module in names:
            return f"{kind} after {names[previous.module]!r}"
        stack.extend(previous.inputs)
    return kind


def _channel_count(module: nn.Module, side: str) -> int | None:
    attrs = ("in_channels", "in_features") if side == "in" else (
        "out_channels", "out_features", "num_features")  # fmt: skip
    for attr in attrs:
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


def _inconsistent_piece(group: ChannelGroup, channels: int, names) -> str | None:
    """The first layer whose channel indices in the group are out of its range (or map to
    group channels that do not exist): torch-pruning lost track of the indices there."""
    by_name = {n: m for m, n in names.items()}
    sides = [(p, "out") for p in group.producers + group.norms] + [
        (p, "in") for p in group.consumers
    ]
    for piece, side in sides:
        if None in piece.root_idxs:  # an index map that drops the root (grouped-query maps)
            return piece.module_name
        size = _channel_count(by_name[piece.module_name], side)
        if piece.module_idxs and size is not None and max(piece.module_idxs) >= size:
            return piece.module_name
        if piece.root_idxs and max(piece.root_idxs) >= channels:
            return piece.module_name
    return None


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
