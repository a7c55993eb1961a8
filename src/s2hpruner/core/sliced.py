"""A hard forward that computes only the kept channels (SPEC section 5, at the cost of rho).

The masked hard forward multiplies pruned channels by zero but still computes them. Here,
while the hard context is open, every sliceable layer (Conv, Linear, BatchNorm) runs with its
weights indexed by the kept channels of its input and output groups, so the pass costs about
the kept FLOPs. Weights are sliced with ``index_select`` from the real parameters, so gradients
flow back into the full tensors (zero on pruned channels, as in the masked path), and the hard
mask m_hat still multiplies the kept channels (value 1) to carry the width logits' gradient.
BatchNorm running statistics are written back into the kept entries after the forward.

Masks on a BatchNorm's output are folded into its affine parameters, (gamma * m, beta * m),
in every mode (:func:`attach_mask`): the same network, but a per-channel product of two short
vectors replaces a product over the whole activation in the forward and the backward (and
one saved activation fewer).

Attention head groups (attention.py) slice qkv's rows and proj's columns like any Linear;
the attention module itself runs with ``num_heads`` set to the kept heads for the forward.

The masked path stays the reference: tests check outputs, gradients and statistics agree.

``layout`` runs the sliced pass in one memory format (NCHW or channels_last) whatever the
model's: which one is faster depends on the kept widths and the kernels (on CPU, narrow dense
convs are faster in NCHW, depthwise ones in channels_last), so the pruner can time both
(:func:`layout.tune_hard_layout`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator

import torch
from torch import nn

from .attention import sliced_head_handles
from .index import CONVS as _CONVS
from .index import NORMS as _NORMS
from .index import ChannelIndex, is_depthwise
from .kinds import grouped as grouped_kind
from .kinds import mha as mha_kind
from .kinds import norms as norm_kind
from .kinds.scale import SwapParameter
from .measure import memory_format_of
from .modes import evaluating
from .structure import ChannelGroup, ExampleInputs

SLICEABLE = (*_CONVS, nn.Linear, *_NORMS)
_AFFINE_NORMS = (*_NORMS, *norm_kind.NORMS)  # per-channel affine: a mask folds into it


def unsliceable_modules(groups: list[ChannelGroup], modules: dict[str, nn.Module]) -> list[str]:
    """Modules of the groups that the sliced forward cannot handle (exact types only:
    a subclass may read channel counts in its own forward)."""
    bad = []
    for g in groups:
        if _runs_own_heads(g, modules):
            continue
        for piece in g.producers + g.consumers + g.norms:
            module = modules[piece.module_name]
            if piece.module_name in g.norm_dims:  # LayerNorm/GroupNorm: kinds/norms.py
                continue
            if type(module) not in SLICEABLE:
                bad.append(piece.module_name)
    return sorted(set(bad))


def _runs_own_heads(group: ChannelGroup, modules: dict[str, nn.Module]) -> bool:
    """A head group whose attention module slices its own projections (kinds/mha.py)."""
    return group.kind == "heads" and isinstance(modules[group.root_module], nn.MultiheadAttention)


class SlicedHardForward:
    """The context that swaps sliced weights in for one forward, reading the layer maps of
    the :class:`ChannelIndex`."""

    def __init__(self, groups: list[ChannelGroup], modules: dict[str, nn.Module],
                 index: ChannelIndex):  # fmt: skip
        self.modules = modules
        self.index = index
        # attention modules run with their kept heads only (attention.py)
        self.heads = [
            (g.root_module, index.offsets[gi], g.channels)
            for gi, g in enumerate(groups)
            if g.kind == "heads"
        ]
        own = {p.module_name for g in groups if _runs_own_heads(g, modules)
               for p in g.producers + g.consumers}  # fmt: skip
        self.names = sorted((set(index.out) | set(index.inp)) - own)
        self.own = own

    @contextlib.contextmanager
    def apply(
        self,
        keep_flat: torch.Tensor,
        mask_flat: torch.Tensor,
        layout: torch.memory_format | None = None,
        nchw_norms: bool = True,
    ) -> Iterator[None]:
        """Run the model's layers sliced to ``keep_flat`` (bool per group channel, plus a
        trailing True), multiplying mask sites by ``mask_flat`` (m_hat, plus a trailing 1).
        With ``layout``, 4-D inputs and conv weights are put in that memory format (else the
        sliced weights take the model's, :func:`memory_format_of`, depthwise ones on the CPU
        channels_last). ``nchw_norms`` trains
        narrow channels_last BatchNorms in NCHW (:func:`_nchw_norm_hooks`)."""
        index = self.index
        handles = []
        try:  # also through the set-up: a failure there leaves nothing swapped in
            if layout is not None:
                handles += _layout_hooks(self.modules, set(self.names), layout)
            # the sliced weights' layout: read off the model as a whole, since a 1x1, a
            # depthwise or a one-input-channel weight's own strides can spell either layout
            weights_layout = layout if layout is not None else memory_format_of(self.modules[""])
            kept: dict[int, torch.Tensor] = {}  # kept indices per distinct map, found once

            def kept_of(map_id: int | None) -> torch.Tensor | None:
                if map_id is None:
                    return None
                if map_id not in kept:
                    kept[map_id] = torch.nonzero(keep_flat[index.map(map_id)]).flatten()
                return kept[map_id]

            for name in self.names:
                module = self.modules[name]
                out_idx = kept_of(index.out.get(name))
                in_idx = grouped_kind.weight_in_index(module, kept_of(index.inp.get(name)))
                module_layout = weights_layout
                if layout is None and is_depthwise(module) and module.weight.device.type == "cpu":
                    # channels_last strides even in an NCHW model: oneDNN's depthwise kernel
                    # for them trains mobilenet_v3_small's sliced pass 1.7x faster here (CPU
                    # only: measured nowhere else)
                    module_layout = torch.channels_last
                if _strided_pointwise_on_cpu(module):
                    module_layout = torch.contiguous_format
                    handles.append(module.register_forward_pre_hook(_nchw_input))
                tensors = _sliced_tensors(module, out_idx, in_idx, module_layout)
                multiplier = None
                if name in index.site:
                    site, dim = index.site_map(name)
                    values = mask_flat[site] if out_idx is None else mask_flat[site][out_idx]
                    if _foldable(module):
                        tensors["weight"] = tensors.get("weight", module.weight) * values
                        tensors["bias"] = tensors.get("bias", module.bias) * values
                    else:
                        multiplier = (values, dim)
                groups = len(out_idx) if (is_depthwise(module) and out_idx is not None) else None
                handles += _swap(module, tensors, groups, out_idx, multiplier)
                if nchw_norms and isinstance(module, nn.BatchNorm2d) and out_idx is not None:
                    handles += _nchw_norm_hooks(module, len(out_idx))
                if name in index.norm_dim:  # statistics over the kept channels it sees
                    handles.append(norm_kind.override(module, index.norm_dim[name], None))
            for name, (map_id, dim) in index.param.items():  # layer scales, for the context
                handles.append(SwapParameter(self.modules, name, dim, kept_of(map_id)))
            for name, offset, channels in self.heads:
                heads_kept = torch.nonzero(keep_flat[offset : offset + channels]).flatten()
                values = mask_flat[offset : offset + channels][heads_kept]
                handles += sliced_head_handles(self.modules[name], heads_kept, values)
            for name in index.site:  # sites on layers that are not sliced
                if name not in self.names and name not in self.own:
                    site, dim = index.site_map(name)
                    handles += attach_mask(self.modules[name], mask_flat[site], dim)
            yield
        finally:
            for h in handles:
                h.remove()


def _layout_hooks(modules: dict[str, nn.Module], sliced: set[str], layout) -> list:
    """Put the model's 4-D inputs, and the weights of the 2-D convs that are not sliced, in
    ``layout`` (a conv's output follows its input's and weight's format)."""

    def convert(module, inputs):
        return tuple(
            x.contiguous(memory_format=layout) if torch.is_tensor(x) and x.dim() == 4 else x
            for x in inputs
        )

    handles = [modules[""].register_forward_pre_hook(convert)]
    for name, module in modules.items():
        if name not in sliced and isinstance(module, nn.Conv2d):
            handles += _swap(module, {"weight": module.weight.clone(memory_format=layout)})
    return handles


def _strided_pointwise_on_cpu(module: nn.Module) -> bool:
    """A strided 1x1 conv on the CPU. With a channels_last input of fewer channels than one
    vector register holds (2-7 with AVX2, up to 15 with AVX-512), oneDNN 3.12 (PyTorch 2.14)
    computes its weight gradient wrong and writes past its buffer (heap corruption, oneDNN
    issue 6035; the forward is right). Narrow kept widths hit it, so these few layers (ResNet
    shortcuts) run in NCHW: ``tests/test_sliced.py::test_strided_pointwise_weight_gradient``."""
    return _strided_pointwise(module) and module.weight.device.type == "cpu"


def _strided_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
    )


def _nchw_input(module: nn.Module, inputs: tuple) -> tuple:
    return (inputs[0].contiguous(), *inputs[1:])


def narrow_pointwise(modules: dict[str, nn.Module]) -> list[nn.Module]:
    """The strided 1x1 convs narrower than 16 input channels (found once, at set-up)."""
    return [m for m in modules.values() if _strided_pointwise(m) and m.in_channels < 16]


@contextlib.contextmanager
def narrow_pointwise_in_nchw(module: nn.Module) -> Iterator[None]:
    """Forward a physically pruned network (S2HPruner's last phase, a baseline's fine-tuning)
    inside this context: its narrow strided 1x1 convs take :func:`narrow_pointwise_hooks`'
    NCHW detour, whatever the network's layout, as the sliced hard pass does. The backward may
    run after the context is left (the forward's graph holds the NCHW copies)."""
    handles = narrow_pointwise_hooks(narrow_pointwise(dict(module.named_modules())))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def narrow_pointwise_hooks(convs: list[nn.Module]) -> list:
    """The NCHW detour of :func:`_strided_pointwise_on_cpu` for the soft and masked passes:
    there every layer has its full width, so only layers narrower than 16 input channels
    (:func:`narrow_pointwise`) need it: input in NCHW, and an NCHW copy of the 1x1 weight,
    which gradients flow through (a channels_last 1x1 weight alone keeps the conv on the
    faulty path)."""
    handles = []
    for module in convs:
        if _strided_pointwise_on_cpu(module):
            weight = {"weight": module.weight.clone(memory_format=torch.contiguous_format)}
            handles.append(module.register_forward_pre_hook(_nchw_input))
            handles += _swap(module, weight)
    return handles


def _nchw_norm_hooks(module: nn.Module, channels: int) -> list:
    """Train a sliced BatchNorm2d on a channels_last CPU input in NCHW instead.

    PyTorch's channels_last CPU BatchNorm is vectorised over blocks of 16 channels; at the odd
    kept widths of a sliced layer its training forward and backward are 2-4 times slower than
    the NCHW kernel, even with the two layout copies (``benchmarks/kernels.py``). Same maths,
    another kernel; nothing changes for widths that are multiples of 16, eval mode or CUDA.
    On small feature maps the copies cost more than they save (mobilenet_v3 on 28x28 inputs),
    so the pruner times the hard pass with and without it (``tune_hard_layout``)."""
    if channels % 16 == 0:
        return []
    converted = []

    def pre(module, inputs):
        x = inputs[0]
        if module.training and x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            converted.append(True)
            return (x.contiguous(), *inputs[1:])
        converted.append(False)
        return None

    def post(module, inputs, output):
        if converted.pop():
            return output.contiguous(memory_format=torch.channels_last)
        return output

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _foldable(module: nn.Module) -> bool:
    """A mask on this module's output can be folded into its affine parameters."""
    return isinstance(module, _AFFINE_NORMS) and module.weight is not None and (
        module.bias is not None)


def attach_mask(module: nn.Module, values: torch.Tensor, dim: int) -> list:
    """Multiply ``module``'s output channels (along ``dim``) by ``values`` until the returned
    hook handles are removed: folded into (gamma, beta) for an affine BatchNorm, on the
    output tensor otherwise."""
    if isinstance(module, nn.MultiheadAttention):  # on the v rows of in_proj (kinds/mha.py)
        return mha_kind.mask_hooks(module, values)
    handles = []
    if norm_kind.is_channel_norm(module):  # a channel whose mask is 0 is absent (kinds/norms)
        handles.append(norm_kind.override(module, dim, values.detach() != 0))
    if _foldable(module):
        return handles + _swap(module, {"weight": module.weight * values,
                                        "bias": module.bias * values})  # fmt: skip
    return handles + _swap(module, {}, multiplier=(values, dim))


def _sliced_tensors(module, out_idx, in_idx, layout) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``module`` restricted to the kept channels (4-D weights in
    ``layout``)."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(module, _AFFINE_NORMS):
        if out_idx is None:
            return tensors
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, name, None)
            if value is not None:
                tensors[name] = value.index_select(0, out_idx)
        return tensors
    weight = module.weight
    if out_idx is not None:
        weight = weight.index_select(0, out_idx)
    if in_idx is not None:
        weight = weight.index_select(1, in_idx)
    if weight.dim() == 4:
        # clone, not contiguous(): a depthwise weight (k, 1, h, w) with NCHW strides counts
        # as channels_last already, and those strides send oneDNN down a path ~100x slower
        # on tiny feature maps (mobilenet_v3's 5x5 convs on 1x1 inputs)
        weight = weight.clone(memory_format=layout)
    tensors["weight"] = weight
    if module.bias is not None and out_idx is not None:
        tensors["bias"] = module.bias.index_select(0, out_idx)
    return tensors


def _swap(module: nn.Module, tensors: dict[str, torch.Tensor], groups: int | None = None,
          out_idx: torch.Tensor | None = None, multiplier=None) -> list:
    """Hooks on ``module``: a forward pre-hook swapping ``tensors`` in (and ``groups``), a
    forward hook swapping the originals back (writing BatchNorm running statistics into the
    kept entries) and applying the mask ``multiplier``. The hook runs even when the forward
    raises (``always_call``), so a failed forward leaves the model's own tensors in place."""
    saved: dict[str, torch.Tensor] = {}

    def pre(module, inputs):
        for name, value in tensors.items():
            store = module._parameters if name in module._parameters else module._buffers
            saved[name] = store[name]
            store[name] = value
        if groups is not None:
            saved["groups"] = module.groups
            module.groups = groups

    def post(module, inputs, output):
        failed = output is None  # the forward raised: restore, nothing else
        for name, original in saved.items():
            if name == "groups":
                module.groups = original
                continue
            store = module._parameters if name in module._parameters else module._buffers
            if name.startswith("running_") and module.training and not failed:
                with torch.no_grad():
                    original.index_copy_(0, out_idx, store[name])
            store[name] = original
        saved.clear()
        if multiplier is None or failed:
            return output
        values, dim = multiplier
        shape = [1] * output.dim()
        shape[dim] = -1
        return output * values.view(shape)

    handles = [module.register_forward_pre_hook(pre)] if tensors or groups is not None else []
    return handles + [module.register_forward_hook(post, always_call=True)]


def probe_channels(g: ChannelGroup) -> list[int]:
    """The channels of ``g`` the build probes keep: a width the search could pick, near half
    the group and sharing as few factors with its size as the candidates allow (not 1: a
    single channel broadcasts), spread over the group rather than a prefix. Code that fixes a
    channel count (a ``view`` into heads, a split) then fails here as it would at the widths
    and channels a search picks, and a prefix that happens to be whole heads hides nothing."""
    narrower = [c for c in g.candidates if c < g.channels]
    choices = [c for c in narrower if c > 1] or narrower or g.candidates
    width = min(choices, key=lambda c: (math.gcd(c, g.channels), abs(2 * c - g.channels), c))
    return [(2 * i + 1) * g.channels // (2 * width) for i in range(width)]


def probe_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple:
    """The example's float tensors replaced by seeded random ones of the same shape (the
    global RNG untouched): an all-zero example through a fresh model (BatchNorm's bias 0, no
    conv bias) gives all-zero activations, and every probe would then pass. The example
    itself when the model refuses random values (a float mask or coordinates it checks)."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (
        example_inputs,)  # fmt: skip
    generator = torch.Generator().manual_seed(0)

    def random(t):
        if not (torch.is_tensor(t) and t.is_floating_point()):
            return t
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)

    probe = tuple(random(t) for t in inputs)
    try:
        with evaluating(model), torch.no_grad():
            model(*probe)
    except Exception:  # noqa: BLE001 - the model's own check of its inputs
        return inputs
    return probe


def _failure(exc: BaseException, owners: dict[int, str], model: nn.Module) -> str:
    """``'layer': Type: message`` of an exception, the layer being the innermost module of
    ``owners`` (id -> name) on its traceback."""
    tb, layer = exc.__traceback__, "?"
    while tb is not None:
        name = owners.get(id(tb.tb_frame.f_locals.get("self")))
        if name is not None:
            layer = name or type(model).__name__
        tb = tb.tb_next
    return f"{layer!r}: {type(exc).__name__}: {str(exc)[:200]}"


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without any)."""
    weight = next(model.parameters(), None)
    return torch.device("cpu") if weight is None else weight.device


def failing_groups(
    model: nn.Module, example_inputs: ExampleInputs, groups: list[ChannelGroup],
    modules: dict[str, nn.Module],
) -> dict[int, str]:
    """Groups whose removal breaks the model's forward: {group position: "layer: error"}.

    The sliced pass runs, in eval mode and without gradients, with every group at its
    :func:`probe_channels`, on :func:`probe_inputs`; a layer whose forward fixes a channel
    count in code (a ``view`` into heads, a split) then fails where the exported model
    would. Failing groups are found by bisection (a handful of forwards). Nothing is probed
    when some layer is not sliceable."""
    if not groups or unsliceable_modules(groups, modules):
        return {}
    index = ChannelIndex(groups, modules).to(_device_of(model))  # a model on CUDA: there
    forward = SlicedHardForward(groups, modules, index)
    inputs = probe_inputs(model, example_inputs)
    owner = {id(m): n for n, m in modules.items()}

    def run(subset: list[int]) -> str | None:
        keep = torch.ones(index.constant + 1, dtype=torch.bool, device=index.group_of.device)
        for i in subset:
            start = index.offsets[i]
            keep[start : start + groups[i].channels] = False
            keep[[start + c for c in probe_channels(groups[i])]] = True
        try:
            with torch.no_grad(), forward.apply(keep, keep.float()):
                model(*inputs)
        except Exception as exc:  # noqa: BLE001 - any failure is the model's, reported
            return _failure(exc, owner, model)  # the swap hooks have restored the layers
        return None

    found: dict[int, str] = {}

    def search(subset: list[int]) -> None:
        error = run(subset)
        if error is None:
            return
        if len(subset) == 1:
            found[subset[0]] = error
            return
        half = len(subset) // 2
        search(subset[:half])
        search(subset[half:])

    with evaluating(model):
        everything = list(range(len(groups)))
        error = run(everything)
        if error is not None:
            search(everything)
            if not found:  # only some combination fails: blame them all
                found = dict.fromkeys(everything, error)
    return found


def prune_copy(model: nn.Module, example_inputs: ExampleInputs, groups: list[ChannelGroup],
               kept: list[list[int]], copy_model: bool = True) -> nn.Module:  # fmt: skip
    """A physically pruned deep copy of ``model`` keeping ``kept[i]`` of ``groups[i]``
    (torch-pruning for channel groups, attention.py for heads, kinds/scale.py for layer
    scales): what :meth:`S2HPruner.export` returns, shared with :func:`export_failures`.
    ``copy_model=False`` prunes ``model`` itself (a copy the caller made)."""
    from .attention import prune_heads
    from .kinds import scale as layer_scale
    from .structure import build_graph, index_mapping_once

    pruned = copy.deepcopy(model) if copy_model else model
    graph = build_graph(pruned, example_inputs)
    modules = dict(pruned.named_modules())
    scales = layer_scale.shapes(pruned, groups)
    heads = []
    with index_mapping_once():  # index maps once per pruning step, tolerant of broken ops
        for g, keep in zip(groups, kept, strict=True):
            remove = sorted(set(range(g.channels)) - set(keep))
            if not remove:
                continue
            if g.kind == "heads":  # outside torch-pruning's groups: attention.py
                heads.append((modules[g.root_module], keep))
                continue
            root = modules[g.root_module]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            graph.get_pruning_group(root, handler, g.root_channels(remove)).prune()
    for module, keep in heads:
        prune_heads(module, keep)
    layer_scale.fix_exported(pruned, groups, scales)
    return pruned


def _tensors(y) -> list[torch.Tensor]:
    """Every tensor of a model output (tensor, tuple, dict, or an object with ``logits``)."""
    if torch.is_tensor(y):
        return [y]
    if isinstance(y, list | tuple):
        return [t for v in y for t in _tensors(v)]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _tensors(v)]
    logits = getattr(y, "logits", None)
    return [logits] if torch.is_tensor(logits) else []


def export_failures(
    model: nn.Module, example_inputs: ExampleInputs, groups: list[ChannelGroup],
    tolerance: float = 1e-4, max_exports: int = 24, max_seconds: float = 30.0,
    resources: nn.Module | None = None,
    count_tolerance: float = 0.01, count_params: bool = False,
) -> dict[int, str]:
    """Groups whose export is not the hard network: {group position: reason}.

    The exported model is the ground truth, and only export runs the model's own code on
    pruned layers: a channel count kept outside torch-pruning's reach (BlurPool's
    ``groups=``, ScaledStdConv's gain, a buffer), statistics over all channels (RMS norms,
    weight standardisation over the inputs), a reshape into heads. So every group is taken
    to its :func:`probe_channels`, the model is exported and run on :func:`probe_inputs`, and
    its output compared with the masked hard network's; with ``resources`` (a
    ``ResourceModel`` of these groups) the exported model's FLOPs (and, with
    ``count_params``, for a parameter budget, its parameters: tied weights count once), counted,
    are compared with the model's prediction too, within ``count_tolerance`` of the count
    (SPEC: 1%; a matmul on the group's channels outside a conv, linear or known attention is
    not modelled: the budget would be missed). When they
    differ (or export fails), failing groups are found by bisection, at most ``max_exports``
    exports or ``max_seconds`` of bisection (what is still undecided then is left out:
    building stays bounded in time)."""
    if not groups:
        return {}
    from .index import ChannelIndex
    from .resources.model import count_flops
    from .resources.model import count_params as counted_params

    modules = dict(model.named_modules())
    index = ChannelIndex(groups, modules).to(_device_of(model))
    inputs = probe_inputs(model, example_inputs)
    owner = {id(m): n for n, m in modules.items()}

    runs = [0]

    def run(subset: list[int]) -> str | None:
        runs[0] += 1
        chosen = set(subset)
        keep = torch.ones(index.constant + 1, dtype=torch.bool, device=index.group_of.device)
        kept = []
        for i, g in enumerate(groups):
            channels = probe_channels(g) if i in chosen else list(range(g.channels))
            keep[index.offsets[i] : index.offsets[i] + g.channels] = False
            keep[[index.offsets[i] + c for c in channels]] = True
            kept.append(channels)
        flat = keep.float()
        handles = []
        try:
            for name in index.site:
                site, dim = index.site_map(name)
                handles += attach_mask(modules[name], flat[site], dim)
            with torch.no_grad():
                masked = _tensors(model(*inputs))
        finally:
            for h in handles:
                h.remove()
        try:
            pruned = prune_copy(model, example_inputs, groups, kept).eval()
            with torch.no_grad():
                out = _tensors(pruned(*inputs))
        except Exception as exc:  # noqa: BLE001 - any failure is the model's, reported
            names = {id(m): n for n, m in pruned.named_modules()} if "pruned" in locals() \
                else owner
            return _failure(exc, names, model)
        if len(out) != len(masked):
            return "the exported model returns other outputs"
        for a, b in zip(masked, out, strict=True):
            if a.shape != b.shape:
                return f"an output of shape {tuple(b.shape)}, not {tuple(a.shape)}"
            scale = float(a.abs().max()) or 1.0
            error = float((a - b).abs().max()) / scale
            if not error < tolerance:
                return f"an output that differs from the hard network's by {error:.1e}"
        if resources is not None:
            widths = torch.tensor([len(k) for k in kept], dtype=torch.float64)
            checks = [("FLOPs", resources.flops, lambda: count_flops(pruned, example_inputs))]
            if count_params:
                checks.append(("parameters", resources.params, lambda: counted_params(pruned)))
            for what, predict, counted in checks:
                expected, found = float(predict(widths)), float(counted())
                if abs(expected - found) > count_tolerance * max(found, 1.0):
                    return (f"{found:.4g} {what}, where s2hpruner's resource model predicts "
                            f"{expected:.4g} (a computation on its channels outside a conv, "
                            "linear layer or supported attention, or a weight shared between "
                            "layers: the budget would be missed)")
        return None

    found: dict[int, str] = {}

    def search(subset: list[int], error: str) -> None:
        if len(subset) == 1:
            found[subset[0]] = error
            return
        if runs[0] >= max_exports or time.monotonic() > deadline:  # leave it all out
            found.update(dict.fromkeys(subset, error))
            return
        middle = len(subset) // 2
        parts = [subset[:middle], subset[middle:]]
        errors = [run(p) for p in parts]
        if all(e is None for e in errors):  # only the combination fails: blame them all
            found.update(dict.fromkeys(subset, error))
        for part, e in zip(parts, errors, strict=True):
            if e is not None:
                search(part, e)

    with evaluating(model):
        everything = list(range(len(groups)))
        error = run(everything)
        deadline = time.monotonic() + max_seconds
        if error is not None:
            search(everything, error)
    return found
