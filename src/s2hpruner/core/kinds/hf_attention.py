"""Hugging Face vision-transformer attention heads (``ViTForImageClassification``, DeiT).

transformers >= 5 builds these blocks from four Linears, ``q_proj``, ``k_proj``, ``v_proj`` and
``o_proj``, and reshapes with ``view(..., -1, head_dim)``, so the block runs with any number of
heads as long as the Linears agree. A head group (as for timm, :mod:`..attention`) has the q,
k and v rows of each head as producers, its mask on the v rows only (a zero value slice zeroes
the head's output) and the o_proj columns as consumer; the sliced pass and export only slice
the Linears, and ``num_attention_heads`` follows. Older layouts (``query`` / ``key`` /
``value``) keep their heads, with a warning.
"""

from __future__ import annotations

from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def looks_like(module: nn.Module) -> bool:
    """An attention module in Hugging Face's style (a ``num_attention_heads`` attribute)."""
    return isinstance(getattr(module, "num_attention_heads", None), int) and any(
        isinstance(getattr(module, n, None), nn.Linear) for n in (*PROJECTIONS, "query")
    )


def unsupported_reason(module: nn.Module) -> str | None:
    """Why this module's heads cannot be pruned (None: they can)."""
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in PROJECTIONS):
        return "its layout is not q_proj/k_proj/v_proj/o_proj (transformers >= 5)"
    heads, dim = module.num_attention_heads, head_dim(module)
    if any(getattr(module, n).out_features != heads * dim for n in PROJECTIONS[:3]):
        return "its q/k/v widths are not num_attention_heads * head_dim"
    return None


def head_dim(module: nn.Module) -> int:
    """Channels per head."""
    return int(getattr(module, "head_dim", 0) or module.v_proj.out_features
               // module.num_attention_heads)  # fmt: skip


def linears(module: nn.Module) -> list[nn.Module]:
    """Layers torch-pruning must leave alone."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def pieces(name: str, module: nn.Module):
    """(producers, consumers, mask sites) of the head group, as (layer, idxs, heads)."""
    heads, dim = module.num_attention_heads, head_dim(module)
    roots = [h for h in range(heads) for _ in range(dim)]
    idxs = list(range(heads * dim))
    producers = [(f"{name}.{p}", idxs, roots) for p in PROJECTIONS[:3]]
    return producers, [(f"{name}.o_proj", idxs, roots)], [(f"{name}.v_proj", idxs, roots)]


def set_heads(module: nn.Module, heads: int) -> dict[str, object]:
    """Set the head count attributes; returns the old values."""
    saved = {"num_attention_heads": module.num_attention_heads}
    module.num_attention_heads = heads
    return saved
