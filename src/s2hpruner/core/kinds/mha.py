"""``nn.MultiheadAttention`` heads (torchvision's ``vit_b_16``).

The module keeps q, k and v in one parameter, ``in_proj_weight`` (3E x E), and its functional
forward derives the head width from the embedding width (``E // num_heads``), so it cannot run
with fewer heads. Here:

* mask (soft and masked hard): the mask multiplies the v rows of ``in_proj_weight`` and
  ``in_proj_bias`` for the forward (a zero value slice zeroes the head's output);
* sliced hard pass: the module's forward is replaced by :func:`attention` over the kept heads'
  rows and the matching ``out_proj`` columns;
* export: the kept rows and columns are kept and the module becomes a
  :class:`PrunedMultiheadAttention` (a subclass whose forward is :func:`attention`), so it
  stays an ``nn.MultiheadAttention`` for the code around it.

Only self-attention without masks, ``bias_k``/``bias_v`` or ``add_zero_attn`` is supported;
other uses keep their heads, with a warning. Costs per head: the q/k/v and output projections
(which run as functional linears, not as modules) and the two attention matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError


def unsupported_reason(module: nn.MultiheadAttention) -> str | None:
    """Why this module's heads cannot be pruned (None: they can)."""
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        return "its q, k and v have separate widths (kdim/vdim)"
    if module.bias_k is not None or module.add_zero_attn:
        return "it uses bias_k/bias_v or add_zero_attn"
    return None


def head_dim(module: nn.MultiheadAttention) -> int:
    """Channels per head (set at construction; pruning heads keeps it)."""
    return int(module.head_dim)


def pieces(name: str, module: nn.MultiheadAttention):
    """(producers, consumers, mask sites) of the head group, as (layer, idxs, heads): the
    module's own in_proj rows (q, k, v), out_proj's columns, and the v rows."""
    heads, dim, width = module.num_heads, head_dim(module), module.embed_dim
    roots = [h for h in range(heads) for _ in range(dim)]
    rows = list(range(3 * width))
    v_rows = list(range(2 * width, 3 * width))
    return ([(name, rows, roots * 3)], [(f"{name}.out_proj", list(range(width)), roots)],
            [(name, v_rows, roots)])  # fmt: skip


def rows_of(module: nn.MultiheadAttention, kept: torch.Tensor) -> torch.Tensor:
    """in_proj rows (q, k, v) of the ``kept`` heads, and their out_proj columns."""
    dim, width = head_dim(module), module.num_heads * head_dim(module)
    cols = (kept.unsqueeze(1) * dim + torch.arange(dim, device=kept.device)).flatten()
    return torch.cat([cols + p * width for p in range(3)]), cols


def attention(module, query, key, value, w_in, b_in, w_out, b_out, heads: int):
    """Multi-head attention with ``heads`` heads of ``module``'s head width."""
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    w_q, w_k, w_v = w_in.chunk(3)
    b_q, b_k, b_v = b_in.chunk(3) if b_in is not None else (None, None, None)
    dim = w_q.shape[0] // heads

    def split(x, w, b):
        y = F.linear(x, w, b)
        return y.unflatten(-1, (heads, dim)).transpose(-3, -2)

    q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
    dropout = module.dropout if module.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    out = F.linear(o.transpose(-3, -2).flatten(-2), w_out, b_out)
    return out if module.batch_first else out.transpose(0, 1)


def _check_call(module, kwargs) -> None:
    if kwargs.get("key_padding_mask") is not None or kwargs.get("attn_mask") is not None or (
            kwargs.get("is_causal")):  # fmt: skip
        raise UnsupportedModelError(
            f"{type(module).__name__} with pruned heads is called with an attention mask; "
            "list it in ignored_layers to keep its heads"
        )


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose heads were pruned (its head width is no longer
    ``embed_dim // num_heads``): self-attention without masks, weights not returned."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):  # fmt: skip
        _check_call(self, {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask,
                           "is_causal": is_causal})  # fmt: skip
        out = attention(self, query, key, value, self.in_proj_weight, self.in_proj_bias,
                        self.out_proj.weight, self.out_proj.bias, self.num_heads)  # fmt: skip
        return out, None


class _Override:
    def __init__(self, module: nn.Module, forward):
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def sliced(module: nn.MultiheadAttention, kept: torch.Tensor, values: torch.Tensor):
    """Run ``module`` with the ``kept`` heads only (their v rows times the mask ``values`` of
    the kept heads) until the handle is removed."""
    rows, cols = rows_of(module, kept)
    dim = head_dim(module)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):  # fmt: skip
        _check_call(module, {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask,
                             "is_causal": is_causal})  # fmt: skip
        scale = torch.cat([torch.ones(2 * len(cols), device=values.device, dtype=values.dtype),
                           values.repeat_interleave(dim)])  # fmt: skip
        w_in = module.in_proj_weight.index_select(0, rows) * scale.unsqueeze(1)
        b_in = module.in_proj_bias
        b_in = None if b_in is None else b_in.index_select(0, rows) * scale
        w_out = module.out_proj.weight.index_select(1, cols)
        out = attention(module, query, key, value, w_in, b_in, w_out, module.out_proj.bias,
                        int(kept.numel()))  # fmt: skip
        return out, None

    return _Override(module, forward)


def mask_hooks(module: nn.MultiheadAttention, values: torch.Tensor) -> list:
    """Multiply the in_proj rows by ``values`` (1 on q and k rows, the mask on v rows) for
    the module's forward."""
    saved = {}

    def pre(mod, inputs):
        for name in ("in_proj_weight", "in_proj_bias"):
            p = mod._parameters.get(name)
            if p is not None:
                saved[name] = p
                mod._parameters[name] = p * (values.unsqueeze(1) if p.dim() == 2 else values)

    def post(mod, inputs, output):
        for name, p in saved.items():
            mod._parameters[name] = p
        saved.clear()
        return output

    return [module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True)]


@torch.no_grad()
def prune(module: nn.MultiheadAttention, keep: list[int]) -> None:
    """Keep only the ``keep`` heads of ``module`` (in place; it becomes a
    :class:`PrunedMultiheadAttention`)."""
    kept = torch.tensor(sorted(keep), device=module.in_proj_weight.device)
    rows, cols = rows_of(module, kept)
    module.in_proj_weight = nn.Parameter(module.in_proj_weight.index_select(0, rows).clone())
    if module.in_proj_bias is not None:
        module.in_proj_bias = nn.Parameter(module.in_proj_bias.index_select(0, rows).clone())
    out = module.out_proj
    out.weight = nn.Parameter(out.weight.index_select(1, cols).clone())
    out.in_features = len(cols)
    module.num_heads = len(keep)
    module.__class__ = PrunedMultiheadAttention


def flops_and_params(module: nn.MultiheadAttention, query_shapes) -> tuple[float, float]:
    """(FLOPs, parameters) per head: q/k/v and output projections, and the attention matmuls
    (``query_shapes``: the shape of every call's query)."""
    dim, width = head_dim(module), module.embed_dim
    flops = 0.0
    for shape in query_shapes:
        tokens_total = float(torch.Size(shape[:-1]).numel())
        tokens = float(shape[1] if module.batch_first else shape[0])
        sequences = tokens_total / tokens
        flops += 2.0 * tokens_total * width * 3 * dim  # q, k, v
        flops += 2.0 * tokens_total * dim * width  # output projection
        flops += 4.0 * sequences * tokens * tokens * dim
    params = 3.0 * dim * width + (3.0 * dim if module.in_proj_bias is not None else 0.0)
    return flops, params
