"""WidthSearch: the learnable width logits u of every group, and the widths and masks they give.

Pure maths over the groups (SPEC section 2), batched: an ``nn.Module``, so ``.to()`` and
``state_dict()`` move and save everything.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import masks as M
from .index import ChannelIndex
from .structure import ChannelGroup


def check_temperature(temperature: float) -> None:
    """tau of p = softmax(u / tau) must be a positive number."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")


class WidthSearch(nn.Module):
    """The learnable width logits of every group, and the constant tables the masks need.

    Groups differ in channels and candidates, so the tables are padded to the largest group
    (padded candidates repeat the group's largest one and get probability 0): the widths and
    masks of all groups then take a handful of batched ops per step instead of a loop.
    Channels are numbered in the flat index of :class:`ChannelIndex`.

    ``round_to`` m makes every hard width of a channel group a multiple of m (or the group's
    full width): H is the such width nearest to E (rounding up, as the SPEC's H does for the
    fine candidates, would make the hard network up to m - 1 channels a group wider than the
    soft one). The search keeps its fine candidates; only the kept widths snap to what vector
    units and tensor cores run at full speed (as torch-pruning's ``round_to``). Head groups
    keep theirs.
    """

    def __init__(
        self,
        groups: list[ChannelGroup],
        index: ChannelIndex | None = None,
        temperature: float = 1.0,
        round_to: int | None = None,
    ):
        super().__init__()
        check_temperature(temperature)
        # the flat channel numbering, shared with the pruner (alone: the groups' own)
        self.index = index if index is not None else ChannelIndex(groups, {})
        self.temperature = temperature
        # p = softmax(u / tau): the starting logits scale with tau, for E = C - d at any tau
        self.logits = nn.ParameterList(
            [nn.Parameter(temperature * M.initial_logits(g.candidates, g.step)) for g in groups]
        )
        n_cand = max(len(g.candidates) for g in groups)
        n_chan = max(g.channels for g in groups)
        candidates = torch.stack(
            [torch.tensor(g.candidates + g.candidates[-1:] * (n_cand - len(g.candidates)),
                          dtype=torch.float32) for g in groups]
        )  # fmt: skip
        hard = [_hard_widths(g, round_to) for g in groups]
        self.all_hard_widths = hard  # per group, before restrict_hard_widths
        # channels a kept width moves by, per group (what a step of the search costs or saves)
        self.hard_steps = [_hard_step(g, round_to) for g in groups]
        n_hard = max(len(h) for h in hard)
        hard_candidates = torch.stack(
            [torch.tensor(h + h[-1:] * (n_hard - len(h)), dtype=torch.float32) for h in hard]
        )
        real = torch.stack([torch.arange(n_cand) < len(g.candidates) for g in groups])
        first = M.first_keeping(candidates, n_chan)  # padding candidates have p = 0
        self.register_buffer("candidates", candidates)  # (G, K)
        # (G, K'): the widths H may take, and whether H rounds to the nearest of them (round_to)
        # or up (SPEC); derived from round_to, so not in the state dict
        self.register_buffer("hard_candidates", hard_candidates, persistent=False)
        nearest = [_aligned(g, round_to) for g in groups]
        self.register_buffer("nearest", torch.tensor(nearest), persistent=False)
        self.any_nearest = any(nearest)  # a Python bool: no device sync on the hot path
        self.register_buffer("real_candidate", real)  # (G, K) bool
        self.register_buffer("first", first, persistent=False)  # (G, C): see M.first_keeping
        index = self.index
        # rank of every flat channel, first by position (importance fills it in)
        ranks = torch.arange(index.constant) - index.group_offsets[index.group_of]
        self.register_buffer("ranks", ranks)  # rank of every flat channel (state: importance)
        self.sizes = index.sizes

    def restrict_hard_widths(self, allowed: list[list[int]]) -> None:
        """Let group i's hard width take only ``allowed[i]`` (sorted, ending at the full
        width): H becomes the smallest allowed width >= E (or the nearest, with round_to)."""
        n = max(len(a) for a in allowed)
        table = [torch.tensor(a + a[-1:] * (n - len(a)), dtype=torch.float32) for a in allowed]
        self.hard_candidates = torch.stack(table).to(self.hard_candidates.device)

    def group_ranks(self, i: int) -> torch.Tensor:
        """Rank of each channel of group ``i`` (0 = most important)."""
        start = self.index.offsets[i]
        return self.ranks[start : start + self.sizes[i]]

    def probabilities(self) -> torch.Tensor:
        """p (G, K): softmax of each group's logits over its own candidates."""
        logits = torch.cat(list(self.logits))
        padded = torch.full(
            self.candidates.shape, float("-inf"), device=logits.device, dtype=logits.dtype
        ).masked_scatter(self.real_candidate, logits)
        return M.width_probabilities(padded, self.temperature)

    def expected_widths(self) -> torch.Tensor:
        """E_g for every group, differentiable in the logits."""
        return M.expected_width(self.probabilities(), self.candidates)

    def hard_widths(self) -> torch.Tensor:
        """H_g for every group (straight-through gradient to E_g)."""
        return self.hard_widths_of(self.expected_widths())

    def hard_widths_of(self, expected: torch.Tensor) -> torch.Tensor:
        """H for given expected widths: the SPEC's d * ceil(E / d), or the nearest multiple
        of round_to for the groups it applies to (both straight-through).

        Below the smallest width H may take (round_to's m, or a restricted table's first),
        lowering E no longer changes H, so no gradient reaches E there: else the resource
        term pushes E on down, the soft network narrows while the hard one cannot, and the
        soft network collapses. Without round_to, E never is below it (SPEC unchanged)."""
        floor = self.hard_candidates[:, 0]
        expected = torch.where(expected < floor, floor, expected)
        ceil = M.hard_width(expected, self.hard_candidates)
        if not self.any_nearest:
            return ceil
        return torch.where(self.nearest, M.nearest_width(expected, self.hard_candidates), ceil)

    def flat_masks(self, mode: str) -> torch.Tensor:
        """The relaxed ("soft") or hard mask of every channel, in the flat channel index."""
        probs = self.probabilities()
        relaxed = M.relaxed_mask_by_index(probs, self.first)  # (G, C) by rank
        if mode == "hard":
            hard = self.hard_widths_of(M.expected_width(probs, self.candidates))
            relaxed = M.hard_mask(relaxed, hard.detach().round())
        return relaxed.flatten()[self.index.group_of * relaxed.shape[1] + self.ranks]

    def __len__(self) -> int:
        return len(self.logits)


def _aligned(group: ChannelGroup, round_to: int | None) -> bool:
    """Does ``round_to`` apply to this group? (Heads and grouped-conv units keep theirs.)"""
    return round_to is not None and group.kind == "channels"


def _hard_step(group: ChannelGroup, round_to: int | None) -> int:
    """Channels between a group's neighbouring hard widths (see :func:`_hard_widths`)."""
    return round_to if _aligned(group, round_to) else group.step


def _hard_widths(group: ChannelGroup, round_to: int | None) -> list[int]:
    """The widths a group's hard network may keep: its candidates, or with ``round_to`` m the
    multiples of m below its full width, and the full width."""
    if not _aligned(group, round_to):
        return list(group.candidates)
    return list(range(round_to, group.channels, round_to)) + [group.channels]
