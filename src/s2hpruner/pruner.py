"""S2HPruner: the width search over a wrapped model, its three forward modes, and export.

The pruner owns the width logits u (one per channel group). Inside ``pruner.mode("soft")`` the
model's forward multiplies each group's channels by the relaxed mask w(u); inside
``pruner.mode("hard")`` by the hard mask m_hat(u); ``"full"`` (and outside any mode) runs the
model untouched. The masks are attached as forward hooks only while the context is open, so
the wrapped model stays a plain ``nn.Module`` and ``export()`` can copy it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import masks as M
from .errors import BudgetError, UnsupportedModelError
from .groups import ChannelGroup, build_graph, find_groups, module_channel_dim
from .resources import ResourceModel

MODES = ("full", "soft", "hard")


class WidthSearch(nn.Module):
    """The learnable width logits of every group, and the constants the masks need."""

    def __init__(self, groups: list[ChannelGroup], temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.logits = nn.ParameterList(
            [nn.Parameter(M.initial_logits(g.candidates, g.step)) for g in groups]
        )
        for i, g in enumerate(groups):
            cand = torch.tensor(g.candidates, dtype=torch.float32)
            self.register_buffer(f"candidates_{i}", cand)
            self.register_buffer(f"keep_{i}", M.keep_matrix(cand, g.channels))
            self.register_buffer(f"ranks_{i}", torch.arange(g.channels))

    def candidates(self, i: int) -> torch.Tensor:
        return getattr(self, f"candidates_{i}")

    def keep(self, i: int) -> torch.Tensor:
        return getattr(self, f"keep_{i}")

    def ranks(self, i: int) -> torch.Tensor:
        return getattr(self, f"ranks_{i}")

    def probabilities(self, i: int) -> torch.Tensor:
        return M.width_probabilities(self.logits[i], self.temperature)

    def expected_widths(self) -> torch.Tensor:
        """E_g for every group, differentiable in the logits."""
        return torch.stack(
            [M.expected_width(self.probabilities(i), self.candidates(i)) for i in range(len(self))]
        )

    def hard_widths(self) -> torch.Tensor:
        """H_g for every group (straight-through gradient to E_g)."""
        expected = self.expected_widths()
        return torch.stack(
            [M.hard_width(expected[i], self.candidates(i)) for i in range(len(self))]
        )

    def __len__(self) -> int:
        return len(self.logits)


class S2HPruner:
    """Differentiable width search with soft and hard masks over a model's channel groups.

    Args:
        model: the network to prune; it is not modified (masks act through temporary hooks).
        example_inputs: a batch (or tuple of inputs) used to trace the model and count FLOPs.
        target_flops: the budget rho*, a fraction of the full model's FLOPs in (0, 1].
        width_step: channel step d of every group (default: smallest divisor with <= 32 widths).
        ignored_layers: modules (or their names) whose output channels are never pruned; the
            classifier is always ignored.
        temperature: tau of p = softmax(u / tau); constant, never annealed.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        target_flops: float = 0.35,
        width_step: int | None = None,
        ignored_layers: Iterable[nn.Module | str] = (),
        temperature: float = 1.0,
        max_candidates: int = 32,
    ):
        if not 0.0 < float(target_flops) <= 1.0:
            raise BudgetError(
                f"target_flops must be a fraction of the full FLOPs in (0, 1], got {target_flops}"
            )
        self.model = model
        self.example_inputs = example_inputs
        self.target_flops = float(target_flops)
        groups, _ = find_groups(model, example_inputs, width_step, ignored_layers, max_candidates)
        self.groups = [g for g in groups if len(g.candidates) > 1]
        if not self.groups:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no prunable channel group (every conv/linear is "
                "ignored, fixed, or has a single candidate width); nothing to search"
            )
        self.search = WidthSearch(self.groups, temperature)
        self.resources = ResourceModel(model, example_inputs, self.groups)
        self.freeze_ranks = False
        self._modules = dict(model.named_modules())
        self._sites = self._site_index()
        device = next(model.parameters()).device
        self.to(device)
        self.update_ranks(force=True)
        minimum = self.min_flops_ratio()
        if self.target_flops < minimum:
            raise BudgetError(
                f"target_flops={self.target_flops:g} is below the smallest FLOPs ratio this model "
                f"can reach with its candidate widths ({minimum:.4f}); choose a target >= "
                f"{minimum:.4f} or a smaller width_step"
            )

    # ----------------------------------------------------------------- state
    def to(self, device: torch.device | str) -> S2HPruner:
        self.search.to(device)
        self.resources.to(device)
        self._sites = {k: (idx.to(device), dim) for k, (idx, dim) in self._sites.items()}
        return self

    def mask_parameters(self) -> list[nn.Parameter]:
        """The width logits u, one ``nn.Parameter`` per group (give them their own optimizer)."""
        return list(self.search.logits)

    def state_dict(self) -> dict:
        return {"search": self.search.state_dict(), "freeze_ranks": self.freeze_ranks,
                "groups": [(g.name, g.channels, g.candidates) for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        mine = [(g.name, g.channels, g.candidates) for g in self.groups]
        theirs = [tuple(x) for x in state["groups"]]
        if [(n, c, list(k)) for n, c, k in theirs] != mine:
            raise ValueError("pruner state belongs to a model with other channel groups")
        self.search.load_state_dict(state["search"])
        self.freeze_ranks = state["freeze_ranks"]

    # ------------------------------------------------------------ importance
    @torch.no_grad()
    def update_ranks(self, force: bool = False) -> None:
        """Rank each group's channels by the L1 norm of their producers' weights (rank 0 first).

        Called once per training step; a no-op when ``freeze_ranks`` is set (unless forced).
        """
        if self.freeze_ranks and not force:
            return
        for i, g in enumerate(self.groups):
            self.search.ranks(i).copy_(M.channel_ranks(self.importance(g)))

    def importance(self, group: ChannelGroup) -> torch.Tensor:
        """Mean over the group's producers of each channel's L1 weight norm."""
        total = None
        for piece in group.producers:
            weight = self._modules[piece.module_name].weight.detach()
            per_channel = weight.abs().flatten(1).sum(1)
            if isinstance(self._modules[piece.module_name], nn.Linear):
                per_channel = weight.abs().sum(1)
            scores = torch.zeros(group.channels, device=weight.device, dtype=weight.dtype)
            scores.index_add_(
                0,
                torch.tensor(piece.root_idxs, device=weight.device),
                per_channel[torch.tensor(piece.module_idxs, device=weight.device)],
            )
            total = scores if total is None else total + scores
        return total / len(group.producers)

    # ----------------------------------------------------------------- masks
    def relaxed_masks(self) -> list[torch.Tensor]:
        """w per group, indexed by channel (not rank)."""
        return [
            M.relaxed_mask(self.search.probabilities(i), self.search.keep(i))[self.search.ranks(i)]
            for i in range(len(self.groups))
        ]

    def hard_masks(self) -> list[torch.Tensor]:
        """m_hat per group, indexed by channel: value 0/1, gradient only through kept channels."""
        kept = self.search.hard_widths().detach().round().long().tolist()
        out = []
        for i in range(len(self.groups)):
            relaxed = M.relaxed_mask(self.search.probabilities(i), self.search.keep(i))
            out.append(M.hard_mask(relaxed, kept[i])[self.search.ranks(i)])
        return out

    def _site_index(self) -> dict[str, tuple[torch.Tensor, int]]:
        """For every module output a mask acts on: which entry of the concatenated group masks
        (or the trailing constant 1) multiplies each of its channels."""
        offsets, total = [], 0
        for g in self.groups:
            offsets.append(total)
            total += g.channels
        ones_index = total
        sites: dict[str, torch.Tensor] = {}
        for gi, g in enumerate(self.groups):
            for piece in g.mask_sites:
                module = self._modules[piece.module_name]
                size = _out_channels(module)
                index = sites.setdefault(piece.module_name, torch.full((size,), ones_index))
                index[torch.tensor(piece.module_idxs)] = torch.tensor(piece.root_idxs) + offsets[gi]
        return {n: (idx, module_channel_dim(self._modules[n])) for n, idx in sites.items()}

    def site_multipliers(self, mode: str) -> dict[str, torch.Tensor]:
        """The per-channel multiplier of every mask site for ``mode`` ("soft" or "hard")."""
        group_masks = self.relaxed_masks() if mode == "soft" else self.hard_masks()
        device = group_masks[0].device
        flat = torch.cat(group_masks + [torch.ones(1, device=device)])
        return {name: flat[index] for name, (index, _) in self._sites.items()}

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        """Forward the wrapped model inside this context to get the ``mode`` network."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        if mode == "full":
            yield
            return
        multipliers = self.site_multipliers(mode)
        handles = []
        for name, (_, dim) in self._sites.items():
            handles.append(
                self._modules[name].register_forward_hook(_mask_hook(multipliers[name], dim))
            )
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------- resources
    def widths(self, mode: str) -> torch.Tensor:
        """Group widths of ``mode``: expected E ("soft"), hard H ("hard") or all channels."""
        if mode == "soft":
            return self.search.expected_widths()
        if mode == "hard":
            return self.search.hard_widths()
        if mode == "full":
            return self.resources.channels.float()
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")

    def flops(self, mode: str = "hard") -> torch.Tensor:
        """FLOPs of the ``mode`` network on the example inputs (soft: differentiable in u)."""
        return self.resources.flops(self.widths(mode))

    def flops_ratio(self, mode: str = "hard") -> torch.Tensor:
        return self.flops(mode) / self.resources.full_flops

    def params(self, mode: str = "hard") -> torch.Tensor:
        return self.resources.params(self.widths(mode))

    def min_flops_ratio(self) -> float:
        """FLOPs ratio with every group at its smallest candidate width."""
        smallest = torch.stack([self.search.candidates(i)[0] for i in range(len(self.groups))])
        return float(self.resources.flops(smallest) / self.resources.full_flops)

    def kept_widths(self) -> dict[str, int]:
        """Hard width of every group, by group name."""
        widths = self.search.hard_widths().detach().round().long().tolist()
        return {g.name: w for g, w in zip(self.groups, widths, strict=True)}

    def kept_channels(self) -> dict[str, list[int]]:
        """Channel indices each group keeps in the hard network (its H most important)."""
        kept = {}
        for i, (g, width) in enumerate(zip(self.groups, self.kept_widths().values(), strict=True)):
            ranks = self.search.ranks(i)
            kept[g.name] = sorted(torch.nonzero(ranks < width).flatten().tolist())
        return kept

    # ----------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """A new, physically pruned copy of the model: exactly the current hard network."""
        pruned = copy.deepcopy(self.model)
        graph = build_graph(pruned, self.example_inputs)
        modules = dict(pruned.named_modules())
        for g, keep in zip(self.groups, self.kept_channels().values(), strict=True):
            remove = sorted(set(range(g.channels)) - set(keep))
            if not remove:
                continue
            root = modules[g.root_module]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            tp_group = graph.get_pruning_group(root, handler, remove)
            tp_group.prune()
        return pruned


def _out_channels(module: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise UnsupportedModelError(f"cannot tell the channel count of {type(module).__name__}")


def _mask_hook(multiplier: torch.Tensor, dim: int):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.dim()
        shape[dim] = -1
        return output * multiplier.view(shape)

    return hook

