"""Norm balancing of the width logits' three gradient sources (SPEC section 5).

The rule, applied to the gradients flattened over all groups:

    g_acc = g_task + beta  * (|g_task| / |g_gap|) * g_gap
    g_u   = g_acc  + gamma * (|g_acc|  / |g_res|) * g_res

so the gap gradient always has ``beta`` times the task gradient's norm, and the resource
gradient ``gamma`` times the accuracy gradient's norm, whatever the raw scales of the losses.
``gamma`` grows by ``growth`` per step while the hard resource ratio is farther than
``tolerance`` from the target, and shrinks by the same factor (down to ``gamma_min``) once it
is inside: the budget is always reached, and once it is, accuracy drives the search.

``scope="per_group"`` applies the same rule to each group's logits on its own (reported to be
the official implementation's choice): every group then feels the budget in proportion to its
own accuracy gradient, where the global rule lets the groups that dominate the resource
gradient move most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Grads = Sequence[torch.Tensor | None]
SCOPES = ("global", "per_group")  # what one application of the rule spans


def _flat(grads: Grads, like: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, like, strict=True)
        ]
    )


@dataclass
class GradientBalancer:
    beta: float = 1.0
    gamma: float = 1.0
    growth: float = 1.05
    gamma_min: float = 0.1
    gamma_max: float = 100.0
    tolerance: float = 0.005
    scope: str = "global"  # one of SCOPES
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    def update(self, budget_error: float) -> None:
        """Grow gamma while the budget is missed by more than the tolerance (``budget_error``
        is ratio - target, of the binding budget), else let it decay."""
        if abs(budget_error) > self.tolerance:
            self.gamma = min(self.gamma * self.growth, self.gamma_max)
        else:
            self.gamma = max(self.gamma / self.growth, self.gamma_min)

    def combine(
        self,
        params: Sequence[torch.Tensor],
        task: Grads,
        gap: Grads | None,
        resource: Grads,
    ) -> list[torch.Tensor]:
        """The balanced gradient of every width-logit tensor in ``params``."""
        if self.scope == "per_group":
            return [
                self._rule(_flat([t], [p]), None if gap is None else _flat([g], [p]),
                           _flat([r], [p])).view_as(p)
                for p, t, g, r in zip(params, task, gap or [None] * len(params), resource,
                                      strict=True)
            ]  # fmt: skip
        g_u = self._rule(_flat(task, params), None if gap is None else _flat(gap, params),
                         _flat(resource, params))  # fmt: skip
        out, offset = [], 0
        for p in params:
            out.append(g_u[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def _rule(
        self, g_task: torch.Tensor, g_gap: torch.Tensor | None, g_res: torch.Tensor
    ) -> torch.Tensor:
        g_acc = g_task
        if g_gap is not None:
            gap_norm = g_gap.norm()
            if gap_norm > self.eps:
                g_acc = g_task + self.beta * (g_task.norm() / gap_norm) * g_gap
        res_norm = g_res.norm()
        scale = g_acc.norm() if g_acc.norm() > self.eps else torch.ones_like(res_norm)
        if res_norm > self.eps:
            return g_acc + self.gamma * (scale / res_norm) * g_res
        return g_acc

    def state_dict(self) -> dict:
        return {"gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.gamma = float(state["gamma"])
