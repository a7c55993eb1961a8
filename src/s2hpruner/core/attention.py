"""Vision transformers: attention-head groups, their FLOPs and their physical removal.

torch-pruning's graph would treat the output channels of an attention block's ``qkv`` Linear as
freely prunable, which breaks the ``(3, heads, head_dim)`` reshape that follows. So the ``qkv``
and ``proj`` layers of every attention module are kept out of torch-pruning's groups (they are
passed to it as ignored layers; that also drops the residual-stream group, which runs through
LayerNorms and is never searched), and each supported attention module gets one *head group*
built here (SPEC section 3, "Attention"):

* one group channel per head (candidates 1..H, step 1 unless H exceeds ``max_candidates``);
* producers: the q, k and v rows of ``qkv`` of each head (importance and FLOPs: qkv's output
  width is 3 * head_dim per kept head); consumers: the head's input columns of ``proj``;
* mask site: only the head's VALUE rows of the ``qkv`` output. A zero value slice makes the
  head's output exactly zero whatever its attention weights are, so the masked network is the
  network without that head.

The MLP hidden width of each block (``fc1`` out / ``fc2`` in) is an ordinary torch-pruning
group, masked on the ``fc1`` output (GELU(0) = 0).

Attention matmuls (q @ k^T and attn @ v) cost ``2 * tokens^2 * head_dim`` FLOPs each, per
head and per sequence (a Swin window is a sequence of ``window_area`` tokens); the resource
model adds them as one row per head group that is linear in the kept heads
(:func:`attention_row`). Swin's relative-position bias table holds one column per head: its
parameters are counted per head and its columns are sliced on export.

Supported: ``timm.layers.Attention`` (ViT, DeiT) without ``scale_norm`` or ``gated``,
``timm.models.swin_transformer.WindowAttention``, ``nn.MultiheadAttention`` (kinds/mha.py:
torchvision's ViT) and Hugging Face ViT / DeiT attention (kinds/hf_attention.py). The functions
here dispatch to those modules. Any other module that looks like attention (a ``num_heads``
attribute and a ``qkv`` Linear, e.g. torchvision's Swin ``ShiftedWindowAttention``, whose
functional forward derives the head width from the embedding width) keeps its heads: its
linears are ignored, with a warning, rather than pruned wrongly.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .kinds import hf_attention as hf
from .kinds import mha
from .structure import ChannelGroup, ChannelSlice, candidate_widths, default_width_step


def _attention_types() -> tuple[type, ...]:
    try:
        from timm.layers import Attention
        from timm.models.swin_transformer import WindowAttention
    except ImportError:  # timm is optional: without it no model has these modules
        return ()
    return (Attention, WindowAttention)


def _looks_like_attention(module: nn.Module) -> bool:
    return isinstance(getattr(module, "num_heads", None), int) and isinstance(
        getattr(module, "qkv", None), nn.Linear
    )


def _unsupported_reason(module: nn.Module) -> str | None:
    if not isinstance(module, _attention_types()):
        return f"{type(module).__name__} is not a supported attention module"
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return "its scale_norm mixes the heads' channels"
    if getattr(module, "gate", None) is not None:
        return "gated attention is not supported"
    if not isinstance(getattr(module, "proj", None), nn.Linear):
        return "it has no proj Linear"
    if module.qkv.out_features % (3 * module.num_heads) != 0:
        return "its qkv width is not 3 * num_heads * head_dim"
    return None


def head_dim(module: nn.Module) -> int:
    """Channels per head of an attention module (from its qkv width)."""
    return module.qkv.out_features // (3 * module.num_heads)


def find_attention(model: nn.Module) -> tuple[dict[str, nn.Module], list[nn.Module]]:
    """Attention modules whose heads can be pruned (by name), and the layers torch-pruning must
    leave alone (qkv and proj of every attention-like module, supported or not)."""
    supported: dict[str, nn.Module] = {}
    ignored: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # kinds/mha.py
            reason = mha.unsupported_reason(module)
            ignored += [module, module.out_proj]
            if reason is None:
                supported[name] = module
                continue
        elif hf.looks_like(module):  # kinds/hf_attention.py
            reason = hf.unsupported_reason(module)
            ignored += hf.linears(module)
            if reason is None:
                supported[name] = module
                continue
        elif not _looks_like_attention(module):
            continue
        else:
            reason = _unsupported_reason(module)
        if reason is None:
            supported[name] = module
            ignored += [module.qkv, module.proj]
            continue
        warnings.warn(
            f"attention module {name!r} keeps all its heads: {reason}",
            stacklevel=3,
        )
        ignored += [m for m in module.modules() if isinstance(m, nn.Linear)]
    return supported, ignored


def head_groups(
    attention: dict[str, nn.Module],
    ignored: list[nn.Module],
    max_candidates: int = 32,
) -> list[ChannelGroup]:
    """One head group per attention module (none where the user ignored it or its qkv)."""
    groups = []
    for name, module in attention.items():
        adapter = _adapter(module)
        if adapter is not None:
            group = _adapter_group(adapter, name, module, ignored, max_candidates)
            if group is not None:
                groups.append(group)
            continue
        if module in ignored or module.qkv in ignored or module.num_heads < 2:
            continue
        heads, dim = module.num_heads, head_dim(module)
        width = heads * dim
        roots = [h for h in range(heads) for _ in range(dim)]
        per_head = list(range(width))
        step = default_width_step(heads, max_candidates)
        group = ChannelGroup(
            name=name,
            channels=heads,
            step=step,
            candidates=candidate_widths(heads, step),
            producers=[
                ChannelSlice(
                    f"{name}.qkv",
                    [p * width + i for p in range(3) for i in per_head],
                    roots * 3,
                )
            ],
            consumers=[ChannelSlice(f"{name}.proj", per_head, roots)],
            mask_sites=[ChannelSlice(f"{name}.qkv", [2 * width + i for i in per_head], roots)],
            root_module=name,
            kind="heads",
            head_dim=dim,
        )
        groups.append(group)
    return groups


def _adapter(module: nn.Module):
    """The kinds/ module that handles this attention module (None: timm, here)."""
    if isinstance(module, nn.MultiheadAttention):
        return mha
    if hf.looks_like(module):
        return hf
    return None


def _num_heads(module: nn.Module) -> int:
    return int(getattr(module, "num_heads", getattr(module, "num_attention_heads", 0)))


def _adapter_group(adapter, name, module, ignored, max_candidates) -> ChannelGroup | None:
    heads = _num_heads(module)
    producers, consumers, sites = adapter.pieces(name, module)
    layers = [module, *(m for m in module.modules() if isinstance(m, nn.Linear))]
    if heads < 2 or any(m is i for m in layers for i in ignored):  # the user keeps them
        return None
    step = default_width_step(heads, max_candidates)
    return ChannelGroup(
        name=name,
        channels=heads,
        step=step,
        candidates=candidate_widths(heads, step),
        producers=[ChannelSlice(*p) for p in producers],
        consumers=[ChannelSlice(*c) for c in consumers],
        mask_sites=[ChannelSlice(*s) for s in sites],
        root_module=name,
        kind="heads",
        head_dim=adapter.head_dim(module),
    )


def attention_row(
    group: ChannelGroup, module: nn.Module, qkv_shapes: list[torch.Size]
) -> tuple[float, float]:
    """(FLOPs, parameters) per kept head outside the qkv/proj linears.

    FLOPs: q @ k^T and attn @ v, ``2 * 2 * sequences * tokens^2 * head_dim`` per head, summed
    over the calls of the block (each qkv output is ``sequences x tokens x 3 * width``). This is
    what torch.utils.flop_counter counts for the explicit matmuls and for
    scaled_dot_product_attention (see resources.count_flops for the CPU kernel). Parameters:
    one column of Swin's relative-position bias table per head.
    """
    if isinstance(module, nn.MultiheadAttention):  # qkv_shapes: the query of each call
        return mha.flops_and_params(module, qkv_shapes)
    flops = 0.0
    for shape in qkv_shapes:
        sequences = float(torch.Size(shape[:-2]).numel())
        tokens = float(shape[-2])
        flops += 4.0 * sequences * tokens * tokens * group.head_dim
    table = getattr(module, "relative_position_bias_table", None)
    params = float(table.shape[0]) if table is not None else 0.0
    return flops, params


def _keep_linear(linear: nn.Linear, rows: list[int] | None, cols: list[int] | None) -> None:
    weight, bias = linear.weight.data, None if linear.bias is None else linear.bias.data
    if rows is not None:
        index = torch.tensor(rows, device=weight.device)
        weight = weight.index_select(0, index)
        bias = None if bias is None else bias.index_select(0, index)
        linear.out_features = len(rows)
    if cols is not None:
        weight = weight.index_select(1, torch.tensor(cols, device=weight.device))
        linear.in_features = len(cols)
    linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)


@torch.no_grad()
def prune_heads(module: nn.Module, keep: list[int]) -> None:
    """Remove every head of ``module`` not in ``keep``: its q, k and v rows of qkv, its proj
    columns, its relative-position bias column; ``num_heads`` (and ``attn_dim``) follow."""
    if isinstance(module, nn.MultiheadAttention):
        if sorted(keep) != list(range(module.num_heads)):
            mha.prune(module, keep)
        return
    if hf.looks_like(module):
        keep = sorted(keep)
        dim = hf.head_dim(module)
        cols = [h * dim + j for h in keep for j in range(dim)]
        for proj in hf.PROJECTIONS[:3]:
            _keep_linear(getattr(module, proj), cols, None)
        _keep_linear(module.o_proj, None, cols)
        hf.set_heads(module, len(keep))
        return
    heads, dim = module.num_heads, head_dim(module)
    keep = sorted(keep)
    if keep == list(range(heads)):
        return
    width = heads * dim
    cols = [h * dim + j for h in keep for j in range(dim)]
    _keep_linear(module.qkv, [p * width + c for p in range(3) for c in cols], None)
    _keep_linear(module.proj, None, cols)
    module.num_heads = len(keep)
    if hasattr(module, "attn_dim"):
        module.attn_dim = len(keep) * dim
    table = getattr(module, "relative_position_bias_table", None)
    if table is not None:
        index = torch.tensor(keep, device=table.device)
        module.relative_position_bias_table = nn.Parameter(
            table.data.index_select(1, index).clone(), requires_grad=table.requires_grad
        )


def sliced_attention_hooks(kept: torch.Tensor):
    """Forward pre-hook and hook that make an attention module run with only the ``kept``
    heads while its qkv and proj are sliced (sliced.py): ``num_heads``/``attn_dim`` are set
    to the kept count and Swin's bias table to the kept columns (indexed from the real
    parameter, so gradients reach it), then restored."""
    saved: dict[str, object] = {}

    def pre(module, inputs):
        saved["num_heads"] = module.num_heads
        dim = head_dim(module)
        module.num_heads = int(kept.numel())
        if hasattr(module, "attn_dim"):
            saved["attn_dim"] = module.attn_dim
            module.attn_dim = module.num_heads * dim
        if "relative_position_bias_table" in module._parameters:
            table = module._parameters["relative_position_bias_table"]
            saved["relative_position_bias_table"] = table
            module._parameters["relative_position_bias_table"] = table.index_select(1, kept)

    def post(module, inputs, output):
        for name, value in saved.items():
            if name == "relative_position_bias_table":
                module._parameters[name] = value
            else:
                setattr(module, name, value)
        saved.clear()
        return output

    return pre, post


def sliced_head_handles(module: nn.Module, kept: torch.Tensor, values: torch.Tensor) -> list:
    """Handles that make an attention module run with the ``kept`` heads only while the
    sliced pass slices its linears (``values``: the kept heads' hard masks, for modules whose
    projections are not separate layers)."""
    if isinstance(module, nn.MultiheadAttention):
        return [mha.sliced(module, kept, values)]
    if hf.looks_like(module):
        saved: dict[str, object] = {}

        def pre(mod, inputs):
            saved.update(hf.set_heads(mod, int(kept.numel())))

        def post(mod, inputs, output):
            for name, value in saved.items():
                setattr(mod, name, value)
            saved.clear()
            return output

        return [module.register_forward_pre_hook(pre),
                module.register_forward_hook(post, always_call=True)]
    pre, post = sliced_attention_hooks(kept)
    return [module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True)]


def internal_sides(attention: dict[str, nn.Module]) -> set[tuple[int, str]]:
    """(id(layer), side) of the channels the head groups own: q/k/v outputs and the output
    projection's inputs. With the embedding width searched (``prune_embedding``), the other
    sides of these layers join the residual stream's torch-pruning group. The layers of
    ``nn.MultiheadAttention`` stay ignored (torch-pruning would prune its heads' width)."""
    sides: set[tuple[int, str]] = set()
    for module in attention.values():
        if isinstance(module, nn.MultiheadAttention):
            continue
        if hf.looks_like(module):
            sides |= {(id(getattr(module, p)), "out") for p in hf.PROJECTIONS[:3]}
            sides.add((id(module.o_proj), "in"))
        else:
            sides |= {(id(module.qkv), "out"), (id(module.proj), "in")}
    return sides


def producer_weight(module: nn.Module) -> torch.Tensor:
    """The weight whose rows are a producer's output channels (importance): the layer's own,
    or an nn.MultiheadAttention's in_proj rows."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight
    return module.weight
