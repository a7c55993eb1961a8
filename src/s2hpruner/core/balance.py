"""Norm balancing of the width logits' three gradient sources (SPEC section 5).

The rule, applied to the gradients flattened over all groups:

    g_acc = g_task + beta  * (|g_task| / |g_gap|) * g_gap
    g_u   = g_acc  + gamma * (|g_acc|  / |g_res|) * g_res

so the gap gradient always has ``beta`` times the task gradient's norm, and the resource
gradient ``gamma`` times the accuracy gradient's norm, whatever the raw scales of the losses.
``gamma`` grows by ``growth`` per step while the hard resource ratio is farther than
``tolerance`` from the target, and shrinks by the same factor (down to ``gamma_min``) once it
is inside: the budget is always reached, and once it is, accuracy drives the search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Grads = Sequence[torch.Tensor | None]


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
    eps: float = 1e-12

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
        g_task = _flat(task, params)
        g_acc = g_task
        if gap is not None:
            g_gap = _flat(gap, params)
            gap_norm = g_gap.norm()
            if gap_norm > self.eps:
                g_acc = g_task + self.beta * (g_task.norm() / gap_norm) * g_gap
        g_res = _flat(resource, params)
        res_norm = g_res.norm()
        scale = g_acc.norm() if g_acc.norm() > self.eps else torch.ones_like(res_norm)
        g_u = g_acc
        if res_norm > self.eps:
            g_u = g_acc + self.gamma * (scale / res_norm) * g_res
        out, offset = [], 0
        for p in params:
            out.append(g_u[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def state_dict(self) -> dict:
        return {"gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.gamma = float(state["gamma"])
