"""The compute ratio of a benchmark, timed side by side: S2HPruner's steps against plain steps
of the full model, in alternating blocks on the same batches, in one process.

Dividing the wall time of an S2HPruner run by that of a plain run timed minutes apart lets
the host's drift into the ratio (round 12 measured 1.16-1.60 for one recipe within an hour,
``MEASUREMENTS.md``). Here every block of S2HPruner steps has a plain block of the same
batches beside it, in the order plain-S2H, S2H-plain, ... so that a drift cancels in each
pair.

- The joint search is walked in full, from its first step to its last: its cost moves with
  the widths (the hard network narrows from full width to the budget).
- Warm-up and frozen-width steps cost the same all phase long: the trainer is held at the
  phase's first step for ``turns`` pairs of blocks and the phase gets the median pair ratio.
- One-off work a run does (tuning the hard pass's memory layout at the start, like a
  one-epoch run, and projecting the widths onto the budget when they freeze, with
  ``prune_at_freeze`` also exporting the pruned network and tuning its layout) is timed and
  added.

The ratio is S2HPruner's seconds over plain seconds for the whole run: each phase's ratio
weighted by its share of the steps, plus the one-off seconds in plain steps. The S2HPruner
side is the run ``cfg`` describes (built by ``s2hpruner.app.run``); the plain side trains the
same starting model with the baselines' recipe (``s2hpruner.app.optim``) and loss.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from s2hpruner.app import run as app_run
from s2hpruner.app.checkpoint import seed_everything
from s2hpruner.app.config import RunConfig
from s2hpruner.app.optim import build_weight_optimizer, set_mask_lr
from s2hpruner.core.layout import tune_hard_layout
from s2hpruner.core.trainer import S2HTrainer

from .baselines import Data, build_model, load_data, pick_device


def phase_steps(warmup_end: int, freeze_start: int, total: int) -> dict[str, int]:
    """Steps of each phase of a run that has any (warm-up, joint search, frozen widths)."""
    steps = {"warmup": warmup_end, "joint": freeze_start - warmup_end,
             "freeze": total - freeze_start}  # fmt: skip
    return {phase: n for phase, n in steps.items() if n > 0}


def whole_run_ratio(phases: dict[str, dict], one_off_seconds: float, total_steps: int,
                    plain_step_seconds: float) -> float:  # fmt: skip
    """S2HPruner's seconds over plain seconds for a run: each phase's ratio weighted by its
    share of the steps, plus the one-off work counted in plain steps."""
    steps = sum(p["fraction"] * p["ratio"] for p in phases.values())
    return steps + one_off_seconds / (total_steps * plain_step_seconds)


def _batches(data: Data, cfg: RunConfig, first_step: int, steps: int):
    """``steps`` training batches of the run's order from ``first_step`` (within one epoch)."""
    data.sampler.epoch, data.sampler.start_batch = divmod(first_step, data.steps_per_epoch)
    for done, (x, y) in enumerate(data.loader, start=1):
        x, y = x.to(data.device, non_blocking=True), y.to(data.device, non_blocking=True)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y
        if done == steps:
            return


def _timed(device: torch.device, work) -> float:
    """Seconds of ``work()``, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class _Sides:
    """The two networks being timed, each stepping through the same batches on demand."""

    def __init__(self, cfg: RunConfig, data: Data, plain: nn.Module, trainer: S2HTrainer,
                 schedule) -> None:  # fmt: skip
        self.cfg, self.data, self.plain, self.trainer, self.schedule = (
            cfg, data, plain, trainer, schedule)  # fmt: skip
        self.optimizer, _ = build_weight_optimizer(plain, cfg, 1)  # kept: momentum persists
        self.log: list[tuple[str, int, int, float]] = []  # (side, first step, steps, s)

    def plain_block(self, first_step: int, steps: int) -> float:
        def work() -> None:
            for x, y in _batches(self.data, self.cfg, first_step, steps):
                loss = F.cross_entropy(self.plain(x), y, label_smoothing=self.cfg.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

        return self._record("plain", first_step, steps, _timed(self.data.device, work))

    def s2h_block(self, first_step: int, steps: int, hold_at: int | None = None) -> float:
        """S2HPruner steps on the batches from ``first_step``; ``hold_at``: the trainer is
        put back to this step before each one (a phase whose steps all cost the same)."""

        def work() -> None:
            for x, y in _batches(self.data, self.cfg, first_step, steps):
                if hold_at is not None:
                    self.trainer.step_count = hold_at
                self.trainer.step(x, y)
                self.schedule.step()
                set_mask_lr(self.trainer.mask_optimizer, self.cfg, self.schedule)

        return self._record("s2h", first_step, steps, _timed(self.data.device, work))

    def _record(self, side: str, first_step: int, steps: int, seconds: float) -> float:
        self.log.append((side, first_step, steps, seconds))
        return seconds

    def pair(self, first_step: int, steps: int, s2h_first: bool, hold_at: int | None):
        """(S2HPruner seconds, plain seconds) of one block each on the same batches."""
        if s2h_first:
            s = self.s2h_block(first_step, steps, hold_at)
            return s, self.plain_block(first_step, steps)
        p = self.plain_block(first_step, steps)
        return self.s2h_block(first_step, steps, hold_at), p


def time_side_by_side(cfg: RunConfig, turns: int = 9, block: int = 10) -> dict:
    """S2HPruner's seconds over a plain full-model run's, for the run ``cfg`` (see the module
    docstring). ``turns``: pairs of blocks (plain-S2H, S2H-plain) per held phase; ``block``:
    steps per block.

    Returns ``ratio``, per phase its ``fraction`` of the run's steps and ``ratio``, the
    one-off seconds and the plain seconds per epoch, and ``order``: (side, first step) of
    every timed block."""
    if turns < 1 or block < 1:
        raise ValueError(f"turns and block must be >= 1, got {turns} and {block}")
    cfg.validate()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_data(cfg, device)
    block = min(block, data.steps_per_epoch)
    plain = build_model(cfg, data)
    plain.train()
    model, pruner, _ = app_run.build_model_and_pruner(cfg, data.splits.spec, device)
    total = max(1, round(cfg.resolve_epochs(data.steps_per_epoch) * data.steps_per_epoch))
    trainer, schedule = app_run.build_trainer(cfg, model, pruner, total, data.splits.spec)
    model.train()
    load_before = os.getloadavg()  # stored: a timing that shared the CPU shows there
    sides = _Sides(cfg, data, plain, trainer, schedule)
    slots = max(1, data.steps_per_epoch // block)  # batch positions, in whole blocks
    blocks = iter(range(1, 1 << 30))

    def next_start() -> int:
        return (next(blocks) % slots) * block

    sides.plain_block(next_start(), block)  # untimed: the plain side's first allocations
    sides.log.clear()
    one_off = 0.0
    if cfg.hard_layout == "auto" and not cfg.deterministic:  # as a run does at its start
        x, _ = next(_batches(data, cfg, 0, 1))
        one_off += _timed(device, lambda: tune_hard_layout(pruner, x))
    phases = {}
    for phase, n in phase_steps(trainer.warmup_end, trainer.freeze_start, total).items():
        pairs = []
        if phase == "joint":  # walked in full: the cost follows the widths
            trainer.step_count = trainer.warmup_end
            done = 0
            while done < n:
                steps = min(block, n - done)
                pairs.append(sides.pair(next_start(), steps, len(pairs) % 2 == 1, None))
                done += steps
            ratio = sum(s for s, _ in pairs) / sum(p for _, p in pairs)
        else:  # held at its first step: every step of it costs the same
            first = 0 if phase == "warmup" else trainer.freeze_start
            if phase == "freeze":  # the projection onto the budget (and the switch to the
                batch, _ = next(_batches(data, cfg, 0, 1))  # pruned network, tuned), once
                one_off += _timed(device, functools.partial(trainer.freeze_widths, batch))
            sides.s2h_block(next_start(), block, hold_at=first)  # untimed warm-up
            sides.log.pop()
            for _ in range(turns):
                start = next_start()
                a = sides.pair(start, block, False, first)
                b = sides.pair(start, block, True, first)
                pairs += [a, b]
            ratio = statistics.median(
                (pairs[i][0] + pairs[i + 1][0]) / (pairs[i][1] + pairs[i + 1][1])
                for i in range(0, len(pairs), 2)
            )
        phases[phase] = {"fraction": n / total, "steps": n, "ratio": ratio,
                         "blocks": len(pairs)}  # fmt: skip
    plain_step = statistics.median(sec / steps for side, _, steps, sec in sides.log
                                   if side == "plain")  # fmt: skip
    ratio = whole_run_ratio(phases, one_off, total, plain_step)
    return {
        "ratio": ratio,
        "timing": "side by side",
        "turns": turns,
        "block_steps": block,
        "phases": phases,
        "one_off_seconds": one_off,
        "plain_seconds_per_epoch": plain_step * data.steps_per_epoch,
        # derived: the ratio times the plain epoch (S2HPruner is not timed for a whole epoch)
        "s2h_seconds_per_epoch": ratio * plain_step * data.steps_per_epoch,
        "steps_per_epoch": data.steps_per_epoch,
        "order": [(side, first) for side, first, _, _ in sides.log],
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
