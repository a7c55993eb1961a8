"""The compute ratio of a benchmark, timed side by side: S2HPruner's step against a plain
step of the full model, in turns, in one process.

Dividing the wall time of an S2HPruner run by that of a plain run timed minutes apart lets
the host's drift into the ratio (round 12 measured 1.16-1.60 for one recipe within an hour,
``MEASUREMENTS.md``). Here both sides run on the same batches, in blocks that alternate
(ABBA, so a linear drift cancels), and each S2HPruner phase (warm-up, joint search, frozen
widths) is timed against its own neighbouring plain blocks; the ratio is the phases' median
ratios weighted by their share of the run's steps.

The S2HPruner side is the run ``cfg`` describes (``s2hpruner.app.run`` builds its model,
pruner and trainer); the plain side trains the same starting model with the same recipe as the
baselines' dense stage (``benchmarks.baselines.train``). Like a one-epoch run, the sliced hard
pass's layout is tuned once at the start (``hard_layout: auto``).
"""

from __future__ import annotations

import statistics
import time

import torch

from s2hpruner.app import run as app_run
from s2hpruner.app.checkpoint import seed_everything
from s2hpruner.app.config import RunConfig
from s2hpruner.app.optim import set_mask_lr
from s2hpruner.core.layout import tune_hard_layout

from .baselines import Data, build_model, load_data, pick_device, train


def phase_steps(warmup_end: int, freeze_start: int, total: int) -> dict[str, int]:
    """Steps of each phase of a run that has any (warm-up, joint search, frozen widths)."""
    steps = {"warmup": warmup_end, "joint": freeze_start - warmup_end,
             "freeze": total - freeze_start}  # fmt: skip
    return {phase: n for phase, n in steps.items() if n > 0}


def _s2h_block(trainer, schedule, cfg: RunConfig, data: Data, first_step: int, steps: int,
               trainer_step: int) -> float:  # fmt: skip
    """Seconds of ``steps`` S2HPruner steps on the batches from ``first_step``, the trainer
    held at ``trainer_step`` (a step of the phase being timed)."""
    data.sampler.epoch, data.sampler.start_batch = divmod(first_step, data.steps_per_epoch)
    start = time.perf_counter()
    for done, (x, y) in enumerate(data.loader, start=1):
        x, y = x.to(data.device, non_blocking=True), y.to(data.device, non_blocking=True)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        trainer.step_count = trainer_step
        trainer.step(x, y)
        schedule.step()
        set_mask_lr(trainer.mask_optimizer, cfg, schedule)
        if done == steps:
            break
    if data.device.type == "cuda":
        torch.cuda.synchronize(data.device)
    return time.perf_counter() - start


def time_side_by_side(cfg: RunConfig, turns: int = 9, block: int = 10) -> dict:
    """S2HPruner's seconds per step over a plain full-model step's, for the run ``cfg``.

    Returns ``ratio`` (phases weighted by their steps), and per phase its ``fraction`` of the
    run, ``ratio`` (median of the turns) and every turn's ratio."""
    if turns < 1 or block < 1:
        raise ValueError(f"turns and block must be >= 1, got {turns} and {block}")
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_data(cfg, device)
    block = min(block, data.steps_per_epoch)
    plain = build_model(cfg, data)
    model, pruner, _ = app_run.build_model_and_pruner(cfg, data.splits.spec, device)
    total = max(1, round(cfg.epochs * data.steps_per_epoch))
    trainer, schedule = app_run.build_trainer(cfg, model, pruner, total, data.splits.spec)
    model.train()
    if cfg.hard_layout == "auto" and not cfg.deterministic:
        x, _ = next(iter(data.loader))
        x = x.to(device)
        tune_hard_layout(pruner, x.contiguous(memory_format=torch.channels_last)
                         if cfg.channels_last and x.dim() == 4 else x)  # fmt: skip
    steps = phase_steps(trainer.warmup_end, trainer.freeze_start, total)
    first = {"warmup": 0, "joint": trainer.warmup_end, "freeze": trainer.freeze_start}
    # batch positions cycle through the epoch in whole blocks; both sides see the same ones
    slots = max(1, data.steps_per_epoch // block)
    position = 0

    def next_batches() -> int:
        nonlocal position
        position += 1
        return (position % slots) * block

    phases: dict[str, dict] = {}
    plain_seconds: list[float] = []
    for phase, n in steps.items():
        at = first[phase]
        start = next_batches()  # untimed: allocations, and the widths' freeze and projection
        _s2h_block(trainer, schedule, cfg, data, start, block, at)
        train(plain, data, cfg, start, block, desc="plain (warm)")
        ratios = []
        for turn in range(turns):
            start = next_batches()
            if turn % 2 == 0:
                p = train(plain, data, cfg, start, block, desc="plain")
                s = _s2h_block(trainer, schedule, cfg, data, start, block, at)
            else:
                s = _s2h_block(trainer, schedule, cfg, data, start, block, at)
                p = train(plain, data, cfg, start, block, desc="plain")
            ratios.append(s / p)
            plain_seconds.append(p / block)
        phases[phase] = {"fraction": n / total, "steps": n,
                         "ratio": statistics.median(ratios), "ratios": ratios}  # fmt: skip
    ratio = sum(p["fraction"] * p["ratio"] for p in phases.values())
    plain_step = statistics.median(plain_seconds)
    return {
        "ratio": ratio,
        "timing": "side by side",
        "turns": turns,
        "block_steps": block,
        "phases": phases,
        "plain_seconds_per_epoch": plain_step * data.steps_per_epoch,
        "s2h_seconds_per_epoch": ratio * plain_step * data.steps_per_epoch,
        "steps_per_epoch": data.steps_per_epoch,
    }
