"""Width masks (SPEC section 2): from width logits u to relaxed and hard channel masks.

All functions work on one group, or on a batch of groups padded to the same number of
candidates and channels (leading dimension = group), and index channels by *rank* (rank 0 =
most important); :func:`channel_ranks` maps ranks back to channels. Keeping the maths in plain
functions lets the property tests exercise it without any model.
"""

from __future__ import annotations

import math

import torch


def width_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p_k, the probability that the group keeps c_k channels (constant temperature)."""
    return torch.softmax(logits / temperature, dim=-1)


def keep_matrix(candidates: torch.Tensor, channels: int) -> torch.Tensor:
    """K[r, k] = 1 if candidate width c_k keeps the channel of rank r (c_k > r)."""
    ranks = torch.arange(channels, device=candidates.device)
    return (candidates.unsqueeze(-2) > ranks.unsqueeze(-1)).to(torch.float32)


def relaxed_mask(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """w_r = sum of p_k over candidates with c_k > r: 1 at rank 0, non-increasing, in [0, 1]."""
    return (keep @ probs.unsqueeze(-1)).squeeze(-1)


def first_keeping(candidates: torch.Tensor, channels: int) -> torch.Tensor:
    """F[r] = index of the smallest candidate that keeps rank r (c_k > r), or K if none:
    the number of candidates <= r, since candidates are sorted."""
    ranks = torch.arange(channels, device=candidates.device)
    return (candidates.unsqueeze(-2) <= ranks.unsqueeze(-1)).sum(-1)


def relaxed_mask_by_index(probs: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """:func:`relaxed_mask` as a gather from the tail sums of p (w_r = sum_{k >= F[r]} p_k):
    the same numbers in O(K + C) per group instead of a (C, K) matrix product."""
    tails = probs.flip(-1).cumsum(-1).flip(-1)
    tails = torch.cat([tails, tails.new_zeros(*tails.shape[:-1], 1)], dim=-1)
    return tails.gather(-1, first)


def expected_width(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """E = sum_k p_k c_k, differentiable in the logits."""
    return (probs * candidates).sum(-1)


def hard_width(expected: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Smallest candidate >= E, with a straight-through gradient (dH/dE = 1).

    With candidates k*d this is min(C, d * ceil(E / d)). A tiny tolerance keeps E that sits on
    a candidate (up to float error) from being rounded one step up.
    """
    tol = 1e-4 * candidates[..., 0]
    index = torch.searchsorted(candidates, (expected - tol).detach().unsqueeze(-1))
    index = index.clamp(max=candidates.shape[-1] - 1)
    rounded = candidates.gather(-1, index).squeeze(-1).to(expected.dtype)
    return expected + (rounded - expected).detach()


def nearest_width(expected: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The width in ``widths`` (sorted) closest to E, ties going up, with a straight-through
    gradient. Used for hardware-aligned widths (``round_to``), where rounding up as
    :func:`hard_width` does would add up to m - 1 channels to every group."""
    above = torch.searchsorted(widths.contiguous(), expected.detach().unsqueeze(-1).contiguous())
    above = above.clamp(max=widths.shape[-1] - 1)
    below = (above - 1).clamp(min=0)
    up = widths.gather(-1, above).squeeze(-1).to(expected.dtype)
    down = widths.gather(-1, below).squeeze(-1).to(expected.dtype)
    e = expected.detach()
    rounded = torch.where((e - down < up - e) & (down <= e), down, up)
    return expected + (rounded - expected).detach()


def hard_mask(relaxed: torch.Tensor, kept: int | torch.Tensor) -> torch.Tensor:
    """m_hat = m * (1 + w - stopgrad(w)): value m (1 for the first ``kept`` ranks, else 0),
    gradient w.r.t. the logits only through kept channels."""
    ranks = torch.arange(relaxed.shape[-1], device=relaxed.device)
    kept = torch.as_tensor(kept, device=relaxed.device)
    keep = (ranks < kept.unsqueeze(-1)).to(relaxed.dtype)
    return keep * (1.0 + (relaxed - relaxed.detach()))  # value exactly m


def channel_ranks(importance: torch.Tensor) -> torch.Tensor:
    """rank[c] of each channel c: 0 for the most important. Ties break by channel index."""
    order = torch.sort(importance, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def grouped_ranks(
    importance: torch.Tensor, group_of: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """:func:`channel_ranks` of every group at once, on channels numbered group by group
    (``group_of[c]`` is channel c's group, ``offsets[g]`` the first channel of group g)."""
    order = torch.sort(importance, descending=True, stable=True).indices
    order = order[torch.sort(group_of[order], stable=True).indices]  # by group, then importance
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device) - offsets[group_of[order]]
    return ranks


def peaked_logits(candidates: list[int], expected: float, sharpness: float = 2.0) -> torch.Tensor:
    """Logits of a bump over the candidates (each step away from its centre costs
    ``sharpness``), its centre placed by bisection so that E = ``expected``: a search that
    starts at a chosen width, with every logit finite so that it can move from there. Near
    the smallest or largest candidate the bump is made sharper until E reaches that far."""
    c = torch.tensor(candidates, dtype=torch.float64)
    step = float(c[1] - c[0]) if len(c) > 1 else 1.0
    lo, hi = float(c[0]) - 2 * step, float(c[-1]) + 2 * step  # beyond: E no longer moves

    def mean_width(centre: float, sharp: float) -> float:
        return float((torch.softmax(-sharp * (c - centre).abs() / step, 0) * c).sum())

    while mean_width(lo, sharpness) > expected or mean_width(hi, sharpness) < expected:
        if sharpness >= 16:  # e^-16: the far candidates would hardly get a gradient
            raise ValueError(f"no finite logits give an expected width of {expected} over "
                             f"the candidates {candidates[0]}..{candidates[-1]}")  # fmt: skip
        sharpness *= 2
    for _ in range(80):  # E grows with the centre
        mid = 0.5 * (lo + hi)
        if mean_width(mid, sharpness) < expected:
            lo = mid
        else:
            hi = mid
    return (-sharpness * (c - 0.5 * (lo + hi)).abs() / step).float()


def initial_logits(candidates: list[int], step: int) -> torch.Tensor:
    """Logits whose mass sits on the full width so that E is about C - d (SPEC section 2).

    Only the last logit is raised; its value is found by bisection. With two candidates
    E = C - d would put all mass on the smaller one, so the target is C - d/2 there.
    """
    n = len(candidates)
    logits = torch.zeros(n)
    if n == 1:
        return logits
    channels = candidates[-1]
    target = channels - (step if n > 2 else step / 2)
    c = torch.tensor(candidates, dtype=torch.float64)

    def mean_width(a: float) -> float:
        z = torch.zeros(n, dtype=torch.float64)
        z[-1] = a
        return float((torch.softmax(z, 0) * c).sum())

    lo, hi = 0.0, 60.0
    if mean_width(lo) >= target:
        return logits
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if mean_width(mid) < target:
            lo = mid
        else:
            hi = mid
    logits[-1] = hi
    assert math.isfinite(hi)
    return logits
