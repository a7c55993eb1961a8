"""The weight optimizer and learning-rate schedule of a run: ONE builder, used by S2HPruner
runs and by every baseline of the benchmarks, so that "the same recipe" holds by code."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RunConfig


def build_weight_optimizer(
    model: nn.Module, cfg: RunConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with (Nesterov) momentum, or AdamW, and a cosine schedule with optional linear
    warm-up over ``total_steps``. Norms and biases get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    warmup = cfg.lr_warmup_steps

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def set_mask_lr(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, schedule: torch.optim.lr_scheduler.LambdaLR
) -> None:
    """The width logits' learning rate now: ``mask_lr``, or (``mask_lr_schedule: cosine``)
    ``mask_lr`` times the weights' schedule factor. Derived from the weights' schedule, so it
    needs no state of its own and a resumed run gets it exactly."""
    factor = 1.0
    if cfg.mask_lr_schedule == "cosine":
        factor = schedule.lr_lambdas[0](schedule.last_epoch)
    for group in optimizer.param_groups:
        group["lr"] = cfg.mask_lr * factor


def build_mask_optimizer(parameters, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam (or SGD with momentum) for the width logits, without weight decay."""
    if cfg.mask_optimizer == "adam":
        return torch.optim.Adam(parameters, lr=cfg.mask_lr, betas=(0.9, 0.999))
    return torch.optim.SGD(parameters, lr=cfg.mask_lr, momentum=0.9)
