"""Resource model (SPEC section 4): FLOPs and parameters as functions of the group widths.

What is counted is what ``torch.utils.flop_counter`` counts, so that the pruner's prediction
can be checked against that independent counter: 2 FLOPs per multiply-accumulate of every
convolution and matrix product (conv, linear, attention matmuls), nothing for biases, norms,
activations or pooling. Layers whose widths do not depend on any group, and FLOPs outside
conv/linear modules (e.g. functional matmuls), are a fixed cost measured once.

Each conv/linear layer l contributes ``coef_l * in_l * out_l``, where a width is a fixed part
plus, for every group g touching that dimension, ``count_lg * width_g / channels_g`` (a
flattened map feeding a Linear carries each group channel H*W times). Depthwise convs have one
input channel per output, so they contribute ``coef_l * out_l``; so does the attention of a
head group (attention.py): ``out_l`` is its number of kept heads and ``coef_l`` the q @ k^T
plus attn @ v FLOPs of one head (for ``nn.MultiheadAttention``, whose projections run as
functional linears, also its q/k/v and output projections). A grouped conv keeps its number of
groups g when pruned (kinds/grouped.py), so it contributes ``coef_l * in_l * out_l / g``.
LayerNorm / GroupNorm affines and layer-scale parameters are per-channel parameter rows (no
FLOPs, as for BatchNorm). The same table gives parameter counts. Evaluating it at
expected widths E gives soft FLOPs, differentiable in the width logits; at hard widths H it
gives the exported model's FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..attention import attention_row
from ..index import is_depthwise, width_counts
from ..kinds import norms as norm_kind
from ..modes import evaluating
from ..structure import ChannelGroup, ExampleInputs


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch.utils.flop_counter's own formula, for the CPU kernel it does not map (torch <= 2.14)
_SDPA_CPU = (
    {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    else {}
)


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (example_inputs,)


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """FLOPs of one forward on ``example_inputs``, counted by torch.utils.flop_counter.

    This is the independent counter the pruner's own formula is checked against. The counter
    has a formula for scaled_dot_product_attention's CUDA kernels but not for the CPU one, which
    it would count as 0; that kernel gets the counter's own SDPA formula here, so attention
    costs the same on every device and with or without the fused kernel.
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel is not counted
    try:
        with evaluating(model):
            try:
                with FlopCounterMode(display=False, custom_mapping=_SDPA_CPU) as counter:
                    model(*_as_tuple(example_inputs))
            except AssertionError:  # the counter's module tracker under no_grad (timm CaiT)
                with torch.enable_grad(), FlopCounterMode(
                        display=False, custom_mapping=_SDPA_CPU) as counter:  # fmt: skip
                    model(*_as_tuple(example_inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


class ResourceModel(nn.Module):
    """FLOPs and parameter counts of the pruned model as a function of group widths."""

    def __init__(
        self, model: nn.Module, example_inputs: ExampleInputs, groups: Sequence[ChannelGroup]
    ):
        super().__init__()
        self.group_names = [g.name for g in groups]
        modules = dict(model.named_modules())
        calls = _record_output_shapes(model, example_inputs)
        n_groups = len(groups)

        counts = width_counts(groups)
        norm_dims = {n for g in groups for n in g.norm_dims}
        no_group = [0.0] * n_groups

        rows = []  # (flop_coef, weight_coef, per_out_params, in_fixed, out_fixed, in_is_one)
        in_rows, out_rows = [], []
        for name, module in modules.items():
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                row = self._layer_row(name, module, calls.get(name, []))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                per_out = 2.0 if module.affine else 0.0
                row = (0.0, 0.0, per_out, 1.0, float(module.num_features), True)
            elif norm_kind.is_channel_norm(module) and name in norm_dims:  # LN / GN
                per_out = float(module.weight is not None) + float(module.bias is not None)
                row = (0.0, 0.0, per_out, 1.0, float(norm_kind.channels(module)), True)
            else:
                continue
            ins, outs = counts.get(name, (no_group, no_group))
            in_fixed = row[3] - sum(ins) if not row[5] else 1.0
            out_fixed = row[4] - sum(outs)
            rows.append((row[0], row[1], row[2], in_fixed, out_fixed, row[5]))
            in_rows.append(ins if not row[5] else [0.0] * n_groups)
            out_rows.append(outs)
        for gi, g in enumerate(groups):  # per-channel parameters outside layers (layer scale)
            for piece in g.parameters:
                owner, _, attr = piece.module_name.rpartition(".")
                param = modules[owner]._parameters[attr]
                per_channel = param.numel() / param.shape[g.param_dims[piece.module_name]]
                rows.append((0.0, 0.0, per_channel, 1.0, 0.0, True))
                in_rows.append([0.0] * n_groups)
                out_rows.append([float(len(piece.module_idxs)) if i == gi else 0.0
                                 for i in range(n_groups)])  # fmt: skip
        for g in groups:  # attention matmuls (and Swin's bias table): linear in kept heads
            if g.kind != "heads":
                continue
            qkv = g.producers[0].module_name  # an nn.MultiheadAttention: its query shapes
            flop_coef, per_head_params = attention_row(g, modules[g.root_module], calls[qkv])
            rows.append((flop_coef, 0.0, per_head_params, 1.0, 0.0, True))
            in_rows.append([0.0] * n_groups)
            out_rows.append([float(g.channels) if h is g else 0.0 for h in groups])

        def tensor(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float64)

        self.register_buffer("flop_coef", tensor([r[0] for r in rows]))
        self.register_buffer("weight_coef", tensor([r[1] for r in rows]))
        self.register_buffer("per_out_params", tensor([r[2] for r in rows]))
        self.register_buffer("in_fixed", tensor([r[3] for r in rows]))
        self.register_buffer("out_fixed", tensor([r[4] for r in rows]))
        self.register_buffer("in_counts", tensor(in_rows).reshape(len(rows), n_groups))
        self.register_buffer("out_counts", tensor(out_rows).reshape(len(rows), n_groups))
        self.register_buffer("channels", tensor([g.channels for g in groups]))

        full = self.channels.clone()
        self.full_flops = float(count_flops(model, example_inputs))
        self.full_params = float(count_params(model))
        self.fixed_flops = self.full_flops - float(self._layer_flops(full))
        self.fixed_params = self.full_params - float(self._layer_params(full))

    @staticmethod
    def _layer_row(name: str, module: nn.Module, shapes: list[torch.Size]):
        """(flop_coef, weight_coef, per_out_params, in_width, out_width, in_is_one)."""
        bias = 1.0 if getattr(module, "bias", None) is not None else 0.0
        if isinstance(module, nn.Linear):
            # every call multiplies (tokens x in) by (in x out)
            tokens = sum(float(torch.Size(s[:-1]).numel()) for s in shapes)
            return (
                2.0 * tokens,
                1.0,
                bias,
                float(module.in_features),
                float(module.out_features),
                False,
            )
        kernel = float(torch.Size(module.kernel_size).numel())
        positions = sum(float(s[0] * torch.Size(s[2:]).numel()) for s in shapes)
        if is_depthwise(module):
            return (2.0 * kernel * positions, kernel, bias, 1.0, float(module.out_channels), True)
        # a grouped conv keeps its groups when pruned (kinds/grouped.py): 1/g of in x out
        groups = float(module.groups)
        return (
            2.0 * kernel * positions / groups,
            kernel / groups,
            bias,
            float(module.in_channels),
            float(module.out_channels),
            False,
        )

    def _widths(self, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frac = widths.to(self.channels.dtype) / self.channels
        ins = self.in_fixed + self.in_counts @ frac
        outs = self.out_fixed + self.out_counts @ frac
        return ins, outs

    def _layer_flops(self, widths: torch.Tensor) -> torch.Tensor:
        ins, outs = self._widths(widths)
        return (self.flop_coef * ins * outs).sum()

    def _layer_params(self, widths: torch.Tensor) -> torch.Tensor:
        ins, outs = self._widths(widths)
        return (self.weight_coef * ins * outs + self.per_out_params * outs).sum()

    def flops(self, widths: torch.Tensor) -> torch.Tensor:
        """FLOPs at the given group widths (a tensor with the widths' gradient)."""
        return self._layer_flops(widths) + self.fixed_flops

    def params(self, widths: torch.Tensor) -> torch.Tensor:
        """Parameter count at the given group widths."""
        return self._layer_params(widths) + self.fixed_params


def _record_output_shapes(model: nn.Module, example_inputs) -> dict[str, list[torch.Size]]:
    """Output shape of every call of every conv/linear layer on ``example_inputs``."""
    shapes: dict[str, list[torch.Size]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # the query of each call

            def pre(mod, inputs, kwargs, name=name):
                query = inputs[0] if inputs else kwargs["query"]
                shapes.setdefault(name, []).append(query.shape)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):

            def hook(mod, inputs, output, name=name):
                shapes.setdefault(name, []).append(output.shape)

            handles.append(module.register_forward_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            model(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return shapes
