"""The S2HPruner training step (SPEC section 5) and the loop that runs the phases.

Read :func:`train_step` first: the two forwards, the four losses and where each gradient goes
are all there. Everything else in this file is plumbing (schedules, evaluation, checkpoints).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .balance import GradientBalancer
from .config import RunConfig
from .errors import NonFiniteLossError
from .pruner import S2HPruner


def kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), averaged over the batch."""
    return F.kl_div(
        F.log_softmax(logits, dim=-1),
        F.log_softmax(target_logits, dim=-1),
        log_target=True,
        reduction="batchmean",
    )


@dataclass
class Optimizers:
    weights: torch.optim.Optimizer
    masks: torch.optim.Optimizer
    weights_schedule: torch.optim.lr_scheduler.LRScheduler
    balancer: GradientBalancer


def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.detach()


def _sum(*sources: Sequence[torch.Tensor | None] | None) -> list | None:
    """Element-wise sum of per-parameter gradient lists (None entries and lists skipped)."""
    sources = [s for s in sources if s is not None]
    if not sources:
        return None
    out = list(sources[0])
    for source in sources[1:]:
        out = [
            a if b is None else (b if a is None else a + b)
            for a, b in zip(out, source, strict=True)
        ]
    return out


@dataclass
class StepGradients:
    """Gradients of one step, kept apart by the loss they come from, so that where each loss
    reaches (weights, width logits, or both) is explicit and testable."""

    weights: dict[str, list] = field(default_factory=dict)
    masks: dict[str, list] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)

    def add(self, name, loss, weights: list, masks: list, retain_graph: bool = False) -> None:
        self.losses[name] = float(loss.detach())
        if not weights and not masks:
            return
        grads = torch.autograd.grad(
            loss, weights + masks, retain_graph=retain_graph, allow_unused=True
        )
        if weights:
            self.weights[name] = list(grads[: len(weights)])
        if masks:
            self.masks[name] = list(grads[len(weights) :])


def compute_gradients(
    model: nn.Module,
    pruner: S2HPruner,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    phase: str,
) -> StepGradients:
    """The forwards and losses of one step of ``cfg.method``, and where each loss's gradient
    goes. ``phase`` is "warmup" (u frozen), "joint" (u searched) or "freeze" (u fixed)."""
    weights = [p for p in model.parameters() if p.requires_grad]
    masks = pruner.mask_parameters() if phase == "joint" else []
    grads = StepGradients()

    if cfg.method == "dmp":  # soft network only; it is discretised at the end
        with pruner.mode("soft"):
            soft = model(x)
        grads.add(
            "task", F.cross_entropy(soft, y, label_smoothing=cfg.label_smoothing), weights, masks
        )

    elif phase == "freeze":  # widths fixed: train the hard network, distilled from the soft one
        with torch.no_grad(), pruner.mode("soft"):
            soft = model(x)
        with pruner.mode("hard"):
            hard = model(x)
        hard_task = F.cross_entropy(hard, y, label_smoothing=cfg.label_smoothing)
        grads.add("task", hard_task + cfg.alpha * kl(soft, hard), weights, [])

    else:
        # 1. soft forward and task loss L        2. hard forward
        with pruner.mode("soft"):
            soft = model(x)
        task = F.cross_entropy(soft, y, label_smoothing=cfg.label_smoothing)
        with pruner.mode("hard"):
            hard = model(x)
        # 3. gap terms
        gap_hard = kl(soft.detach(), hard)  # G_h: weights via the hard net, u via m_hat
        gap_soft = kl(soft, hard.detach())  # G_s: u only, via the soft mask (decoupled)
        gap_to_masks = [] if cfg.method == "s2h-no-gap-on-mask" else masks
        # G_h's backward first: it frees the hard graph before the two soft backwards
        grads.add("gap_hard", cfg.alpha * gap_hard, weights, gap_to_masks)
        grads.add("task", task, weights, masks, retain_graph=cfg.method != "s2h-no-gs")
        if cfg.method != "s2h-no-gs":
            gap_soft_to_weights = weights if cfg.method == "s2h-coupled" else []
            grads.add("gap_soft", gap_soft, gap_soft_to_weights, gap_to_masks)

    if masks:  # 4. resource loss R, on the width logits only
        resource = (pruner.flops_ratio(cfg.resource_on) - cfg.target_flops) ** 2
        grads.add("resource", resource, [], masks)
    return grads


def train_step(
    model: nn.Module,
    pruner: S2HPruner,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: Optimizers,
    cfg: RunConfig,
    phase: str,
) -> dict[str, float]:
    """One optimisation step: weights get the sum of their gradients, the width logits the
    norm-balanced combination of task, gap and resource gradients (balance.py)."""
    weights = [p for p in model.parameters() if p.requires_grad]
    masks = pruner.mask_parameters()
    pruner.update_ranks()
    grads = compute_gradients(model, pruner, x, y, cfg, phase)
    loss = sum(v for k, v in grads.losses.items() if k != "resource")
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss {loss} ({grads.losses})")

    _set_grads(weights, _sum(*grads.weights.values()))
    D.average_gradients(weights)
    search = "resource" in grads.masks
    if search:  # balance the rank-averaged sources, so N processes = one with N times the batch
        task = D.average_gradient_list(grads.masks["task"], masks)
        gap = _sum(grads.masks.get("gap_hard"), grads.masks.get("gap_soft"))
        gap = None if gap is None else D.average_gradient_list(gap, masks)
        opt.balancer.update(pruner.ratio("hard"), cfg.target_flops)
        _set_grads(masks, opt.balancer.combine(masks, task, gap, grads.masks["resource"]))
    opt.weights.step()
    if search:
        opt.masks.step()
    opt.weights_schedule.step()
    opt.weights.zero_grad(set_to_none=True)
    opt.masks.zero_grad(set_to_none=True)
    return {**grads.losses, "gamma": opt.balancer.gamma}


def build_optimizers(model: nn.Module, pruner: S2HPruner, cfg: RunConfig, total_steps: int):
    """SGD (or AdamW) + cosine for the weights; Adam (or SGD) without weight decay for the
    width logits. Norms and biases get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        weights = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        weights = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.mask_optimizer == "adam":
        masks = torch.optim.Adam(pruner.mask_parameters(), lr=cfg.mask_lr, betas=(0.9, 0.999))
    else:
        masks = torch.optim.SGD(pruner.mask_parameters(), lr=cfg.mask_lr, momentum=0.9)

    def cosine(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        t = (step - cfg.lr_warmup_steps) / max(1, total_steps - cfg.lr_warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    schedule = torch.optim.lr_scheduler.LambdaLR(weights, cosine)
    balancer = GradientBalancer(
        beta=cfg.beta,
        gamma=cfg.gamma_init,
        growth=cfg.gamma_growth,
        gamma_min=cfg.gamma_min,
        gamma_max=cfg.gamma_max,
        tolerance=cfg.budget_tolerance,
    )
    return Optimizers(weights, masks, schedule, balancer)


def _set_training(model: nn.Module, training: bool) -> None:
    """``model.train(training)``; a loaded torch.export program has no modes (always eval)."""
    with contextlib.suppress(NotImplementedError):
        model.train(training)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    pruner: S2HPruner | None = None,
    mode: str = "full",
    progress: bool = False,
    desc: str = "eval",
) -> float:
    """Top-1 accuracy (percent) of ``model`` (in ``mode`` of ``pruner`` if given)."""
    from tqdm.auto import tqdm

    was_training = model.training
    _set_training(model, False)
    correct = torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if pruner is None:
                logits = model(x)
            else:
                with pruner.mode(mode):
                    logits = model(x)
            correct += (logits.argmax(-1) == y).sum()
            total += y.numel()
    finally:
        _set_training(model, was_training)
    correct, total = D.all_reduce_sum(correct), D.all_reduce_sum(total)
    return float(100.0 * correct / total.clamp_min(1))


def phase_of(epoch_progress: float, cfg: RunConfig) -> str:
    """Which phase the run is in, given the fractional epoch."""
    if epoch_progress < cfg.warmup_epochs:
        return "warmup"
    if cfg.method != "dmp" and epoch_progress >= cfg.epochs - cfg.freeze_epochs:
        return "freeze"
    if cfg.method == "dmp" and epoch_progress >= cfg.epochs - cfg.freeze_epochs:
        return "dmp-freeze"
    return "joint"


def project_to_budget(
    pruner: S2HPruner, target: float, tolerance: float, lr: float = 0.02, max_steps: int = 5000
) -> int:
    """Move the width logits, on the resource loss alone, until the hard FLOPs ratio is within
    ``tolerance`` of ``target``. Used once when the widths freeze, so that the exported model
    always meets the budget; during a healthy search it does nothing. Where one channel of a
    large residual group moves the FLOPs by more than the tolerance, the closest widths seen
    are kept. Returns the steps taken."""
    masks = pruner.mask_parameters()
    optimizer = torch.optim.Adam(masks, lr=lr)
    best = (float("inf"), [u.detach().clone() for u in masks])
    for step in range(max_steps):
        ratio = pruner.flops_ratio("hard")  # straight-through gradient to the expected widths
        error = abs(float(ratio.detach()) - target)
        if error < best[0]:
            best = (error, [u.detach().clone() for u in masks])
        if error <= tolerance:
            return step
        optimizer.zero_grad()
        ((ratio - target) ** 2).backward(inputs=masks)
        optimizer.step()
    with torch.no_grad():
        for u, kept in zip(masks, best[1], strict=True):
            u.copy_(kept)
    return max_steps
