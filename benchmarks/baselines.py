"""Baselines that end, like S2HPruner, with a physically pruned model at a FLOPs target.

Every baseline trains with the recipe of s2hpruner's own runs, read from the same
:class:`~s2hpruner.app.config.RunConfig` and built by the same code
(:func:`s2hpruner.app.optim.build_weight_optimizer`: SGD with Nesterov momentum or AdamW,
weight decay on weights only, a cosine learning rate, here over each training stage), with the
same batch size, data splits, augmentation, batch order
(:class:`~s2hpruner.app.sampling.EpochSampler`) and initial weights
(:func:`s2hpruner.app.run.build_model`). So a difference in accuracy comes from the method,
not from the training. All of them train for
``cfg.epochs`` epochs in total:

* ``l1``: train the full model for the whole budget, prune it by global L1 magnitude to the
  target FLOPs, no fine-tuning.
* ``l1-ft``: train for ``pretrain_fraction`` of the budget, prune as ``l1``, fine-tune for the
  rest. With ``pretrain_fraction`` 0 (a run from trained weights, ``cfg.init``) it prunes the
  starting model at once and fine-tunes for the whole budget. ``l1_global`` chooses global
  allocation (one threshold over all layers) or uniform (every layer loses the same share).
  With ``l1_steps`` > 1 it prunes iteratively, with fine-tuning between: the first
  ``l1_descent`` share of the fine-tuning is cut into that many equal pieces, and the end of
  piece i prunes to 1 - (1 - target) i / n of the full model's FLOPs (a linear schedule, as
  torch-pruning's iterative pruning), so the last prune lands where S2HPruner's ``--descent``
  aim reaches the budget; each prune ranks the channels on the weights trained so far.
* ``group-sl``: sparse training with torch-pruning's ``GroupNormPruner`` regulariser for
  ``sparse_fraction`` of the budget, prune by group L2 norm, fine-tune for the rest.
* ``random``: random widths at the target FLOPs (S2HPruner with random width logits, projected
  to the budget, exported with the kept channels' starting weights: random from scratch, the
  trained ones from ``cfg.init``), trained for the whole budget.

Importance-based methods reach the target by searching (bisection with interpolation)
torch-pruning's global pruning ratio on deep copies until the exported FLOPs (counted by
:func:`s2hpruner.count_flops`) are within ``flops_tolerance`` of the target, then prune the real
model with that ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from s2hpruner import S2HPruner, count_flops, count_params
from s2hpruner.app import run as app_run
from s2hpruner.app.checkpoint import seed_everything
from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import DataSplits
from s2hpruner.app.files import atomic_torch_save, atomic_write_bytes
from s2hpruner.app.optim import build_weight_optimizer
from s2hpruner.app.sampling import EpochSampler, train_loader
from s2hpruner.core.layout import tune_module_layout
from s2hpruner.core.measure import MEMORY_FORMATS
from s2hpruner.core.sliced import narrow_pointwise_in_nchw
from s2hpruner.core.structure import build_graph, classifier_layers
from s2hpruner.core.trainer import evaluate, project_to_budget

from .fresh_process import in_fresh_process

BASELINES = ("l1", "l1-ft", "group-sl", "random")

# (model, example inputs, global pruning ratio, ignored layers) -> a torch-pruning pruner
PrunerFactory = Callable[[nn.Module, torch.Tensor, float, list], tp.pruner.BasePruner]


@dataclass(frozen=True)
class BaselineOptions:
    """Method-specific choices; documented in RESULTS.md next to the numbers."""

    pretrain_fraction: float = 0.5  # l1-ft: share of the budget trained before pruning (may be 0)
    l1_global: bool = True  # l1, l1-ft: global allocation (True) or uniform per layer (False)
    l1_steps: int = 1  # l1-ft: pruning steps (1: at once; more: iterative, see l1_descent)
    l1_descent: float = 0.0  # l1-ft: share of the fine-tuning the iterative steps span
    # l1, l1-ft: kept widths in multiples of this (torch-pruning's round_to), as S2HPruner's
    # round_to keeps them; None: any width
    l1_round_to: int | None = None
    sparse_fraction: float = 0.5  # group-sl: share of the budget spent in sparse training
    group_sl_reg: float = 5e-4  # GroupNormPruner reg (torch-pruning's benchmark default)
    # torch-pruning's benchmark turns weight decay off while its regulariser is on: the
    # regulariser already decays every prunable weight by at least reg (gamma >= 1).
    sparse_weight_decay: float = 0.0
    random_logit_std: float = 3.0  # spread of the random width logits (larger: more varied)
    flops_tolerance: float = 0.005  # |exported FLOPs ratio - target| the search aims for
    # when the target falls inside one channel's FLOPs jump, the most the kept ratio may exceed
    # the target by (the SPEC's "budget met": 0.01); None: the closer side, above or below
    flops_ceiling: float | None = None
    max_probes: int = 30  # search steps before settling for the closest ratio seen
    # cfg.epochs counts full-model epochs of wall time, and the method trains as many of its
    # own steps as they pay for, each priced by timing its network against the full model
    # (a compute budget that charges the baselines' pruned steps as S2HPruner's are charged)
    own_step_pricing: bool = False
    pricing_turns: int = 5  # pairs of timed blocks (each order) for that price
    # that price timed in a newly spawned process (benchmarks.fresh_process), not in the
    # benchmark's, whose earlier runs may have changed how fast a network trains there
    price_in_fresh_process: bool = False

    def __post_init__(self) -> None:
        if self.l1_steps < 1:
            raise ValueError(f"l1_steps is {self.l1_steps}; give 1 (prune at once) or more")
        if not 0.0 <= self.l1_descent < 1.0:
            raise ValueError(f"l1_descent is {self.l1_descent}; give a share in [0, 1)")
        if (self.l1_steps > 1) != (self.l1_descent > 0.0):
            raise ValueError(
                f"l1_steps {self.l1_steps} with l1_descent {self.l1_descent}: iterative pruning "
                "needs both (steps > 1 over a descent > 0), pruning at once neither"
            )


@dataclass
class Data:
    """The splits, the seeded training order and the example input of one run."""

    splits: DataSplits
    sampler: EpochSampler
    loader: DataLoader
    steps_per_epoch: int
    example: torch.Tensor
    device: torch.device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(cfg: RunConfig, device: torch.device) -> Data:
    """The same splits and batch order as ``s2hpruner.app.run.prune`` builds for ``cfg``."""
    splits = app_run.build_splits(cfg)
    app_run.fit_batch_to_split(cfg, len(splits.train))
    sampler = EpochSampler(len(splits.train), cfg.seed, cfg.batch_size)
    if cfg.workers > 0:  # each sample seeded by its key, as the run's loader does
        loader = train_loader(splits.train, sampler, cfg.workers)
    else:  # the stored benchmark runs: the loader draws its workers' seed from torch's RNG
        loader = DataLoader(splits.train, batch_size=cfg.batch_size, sampler=sampler,
                            drop_last=True)  # fmt: skip
    steps_per_epoch = len(sampler.order()) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError("the training split is smaller than one batch; lower the batch size")
    spec = splits.spec
    example = torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size, device=device)
    return Data(splits, sampler, loader, steps_per_epoch, example, device)


def build_model(cfg: RunConfig, data: Data) -> nn.Module:
    """The model with the initial weights S2HPruner's run of the same seed starts from (built
    by the run's own code: ``--init``/``--pretrained`` and ``channels_last`` included)."""
    return app_run.build_model(cfg, data.splits.spec, data.device)


def flops_target(cfg: RunConfig) -> float:
    """The FLOPs budget of ``cfg`` (the run's default when none is given); the baselines
    prune to FLOPs only."""
    budgets = cfg.budgets()
    if set(budgets) != {"flops"}:
        raise ValueError(
            f"the baselines prune to a FLOPs target only; this config has budgets {budgets}"
        )
    return budgets["flops"]


def _run_layout(cfg: RunConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _memory_format(model: nn.Module, cfg: RunConfig,
                   layout: torch.memory_format | None = None) -> nn.Module:  # fmt: skip
    # torch-pruning builds new parameters when it prunes, so this is re-applied after pruning
    return model.to(memory_format=layout or _run_layout(cfg))


def tunes_pruned_layout(cfg: RunConfig) -> bool:
    """Whether a pruned network trains in the faster of NCHW and channels_last, timed: the
    rule of S2HPruner's own pruned last phase (``pruned_layout="auto"`` in s2hpruner.app.run
    when ``hard_layout`` is "auto" and the run is not deterministic), so that a baseline
    priced by its own steps pays for the same layout choice S2HPruner does."""
    return cfg.hard_layout == "auto" and not cfg.deterministic


def pruned_layout(model: nn.Module, cfg: RunConfig, example: torch.Tensor) -> torch.memory_format:
    """The memory layout a pruned network trains in (see :func:`tunes_pruned_layout`): timed
    with :func:`s2hpruner.core.layout.tune_module_layout` on a batch of the run's size, as
    S2HPruner times its pruned network; else the layout S2HPruner's would have (the one
    ``hard_layout`` names, else the run's own). Every forward takes the NCHW detour of narrow
    strided 1x1 convs (:func:`s2hpruner.core.sliced.narrow_pointwise_in_nchw`), as
    S2HPruner's pruned network does."""
    if not (tunes_pruned_layout(cfg) and example.dim() == 4):
        return app_run.given_hard_layout(cfg) or _run_layout(cfg)
    batch = example[:1].expand(cfg.batch_size, *example.shape[1:]).contiguous()
    trial = copy.deepcopy(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with narrow_pointwise_in_nchw(trial):
            return trial(x)

    return tune_module_layout(trial, batch, forward)


def train(
    model: nn.Module,
    data: Data,
    cfg: RunConfig,
    first_step: int,
    steps: int,
    desc: str = "train",
    weight_decay: float | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    schedule_span: tuple[int, int] | None = None,
    layout: torch.memory_format | None = None,
) -> float:
    """Plain cross-entropy training for ``steps`` steps; returns the training seconds.

    Batches continue the run's global order from ``first_step``, so a method split into
    stages sees the same batches as one trained in a single stage. ``after_backward`` runs
    between ``backward()`` and the optimizer step (where Group-SL adds its regulariser).
    ``schedule_span`` (offset, length): this stage is a piece of one cosine of that length,
    starting ``offset`` steps in (iterative pruning rebuilds the optimizer between pieces,
    since torch-pruning replaces the parameters it prunes); None: a cosine of its own.
    ``layout``: the batches' memory layout, the network's (None: the run's own).
    """
    layout = layout or _run_layout(cfg)
    if weight_decay is not None:  # a stage with its own decay (Group-SL's sparse training)
        cfg = dataclasses.replace(cfg, weight_decay=weight_decay)
    # s2hpruner's weight optimizer and schedule, the cosine stretched over this stage
    offset, length = schedule_span or (0, steps)
    optimizer, schedule = build_weight_optimizer(model, cfg, length)
    if offset:  # jump the schedule to the piece's start
        schedule.last_epoch = offset
        for group, base, factor in zip(
            optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(offset)
    model.train()
    step, end, seconds = first_step, first_step + steps, 0.0
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not cfg.progress, dynamic_ncols=True)
    while step < end:
        data.sampler.epoch, data.sampler.start_batch = divmod(step, data.steps_per_epoch)
        start = time.perf_counter()
        for x, y in data.loader:
            x, y = x.to(data.device, non_blocking=True), y.to(data.device, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=layout)
            with narrow_pointwise_in_nchw(model):  # (the backward keeps the forward's copies)
                logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == end or step % data.steps_per_epoch == 0:
                break
        seconds += time.perf_counter() - start
    bar.close()
    return seconds


# ----------------------------------------------------------------------------- pruning


def l1_pruner(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    ignored: list,
    global_pruning: bool = True,
    round_to: int | None = None,
):
    """L1-magnitude channel pruning (group mean, torch-pruning's mean normaliser): one global
    threshold over all layers, or (``global_pruning=False``) the same share in every layer;
    ``round_to``: kept channels in multiples of it."""
    return tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
    )


def group_sl_pruner(
    model: nn.Module, example: torch.Tensor, ratio: float, ignored: list, reg: float = 5e-4
):
    """Group-SL (DepGraph, CVPR 2023) as in torch-pruning's benchmarks: group L2 importance
    normalised by its max, GroupNormPruner's regulariser for the sparse training."""
    return tp.pruner.GroupNormPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
        reg=reg,
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )


def classifier_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The layers S2HPruner never prunes (the classifier), by name, so copies can find them."""
    names = {m: n for n, m in model.named_modules()}
    return [names[m] for m in classifier_layers(model, build_graph(model, example))]


def ignored_names(model: nn.Module, example: torch.Tensor, extra: Sequence[str]) -> list[str]:
    """The classifier and ``extra`` (``RunConfig.ignored_layers``, the list S2HPruner runs
    keep whole): torch-pruning then skips every group that holds one of them, as S2HPruner
    fixes the group of an ignored layer at full width. Layers only: torch-pruning would also
    ignore a container's children, S2HPruner would not, and the methods would differ."""
    names = dict(model.named_modules())
    unknown = [name for name in extra if name not in names]
    if unknown:
        raise ValueError(f"ignored layers {unknown} are not modules of the model")
    containers = [name for name in extra if any(True for _ in names[name].children())]
    if containers:
        raise ValueError(f"ignored layers {containers} hold other modules; name their layers")
    return [*classifier_names(model, example), *extra]


def make_pruner(
    factory: PrunerFactory, model: nn.Module, example: torch.Tensor, ratio: float, ignored: list
):
    """Build a pruner in eval mode: tracing runs a forward that would otherwise move the
    BatchNorm running statistics of the trained model."""
    was_training = model.training
    model.eval()
    try:
        modules = [model.get_submodule(name) for name in ignored]
        return factory(model, example, ratio, modules)
    finally:
        model.train(was_training)


def prune_to_flops(
    model: nn.Module,
    example: torch.Tensor,
    factory: PrunerFactory,
    target: float,
    tolerance: float = 0.005,
    max_probes: int = 30,
    ignored_layers: Sequence[str] = (),
    reference_flops: float | None = None,
    ceiling: float | None = None,
) -> dict:
    """Prune ``model`` in place to ``target`` x its FLOPs (x ``reference_flops``, the unpruned
    model's, when given: a step of iterative pruning) by searching the global ratio.

    A bracketing search on deep copies: FLOPs fall as the ratio grows (except near 1, where
    torch-pruning skips groups that would lose their last channel, so the bracket ends at 0.9).
    Odd probes interpolate sqrt(FLOPs), which falls about linearly with the ratio because every
    layer loses inputs and outputs (the first probe is 1 - sqrt(target)); even probes bisect, so
    the bracket at least halves every two probes. It stops within ``tolerance``, or when the
    bracket is below 1e-4: then the target lies inside the FLOPs jump of a single channel
    (group), and the closest ratio seen is kept, with a warning; with ``ceiling``, the closest
    of those at most ``ceiling`` above the target (so a coarse width step, e.g. torch-pruning's
    round_to, cannot land off the budget). ``ignored_layers`` (names) keep their groups whole,
    besides the classifier.
    """
    ignored = ignored_names(model, example, ignored_layers)
    full = reference_flops or count_flops(model, example)
    now = count_flops(model, example) / full

    def prune(net: nn.Module, ratio: float) -> float:
        make_pruner(factory, net, example, ratio, ignored).step()
        return count_flops(net, example) / full

    if now <= target + tolerance:  # an iterative step with nothing left to cut
        return {"pruning_ratio": 0.0, "search_probes": 0, "flops_ratio": now}
    # (ratio, FLOPs ratio) at the bracket ends; 0.01 = (1 - 0.9)^2 is a guess, never used as
    # a result
    (lo, f_lo), (hi, f_hi) = (0.0, now), (0.9, 0.01 * now)
    best_ratio, best_flops, probes = 0.0, now, 0

    def better(flops: float, than: float) -> bool:  # within the ceiling beats above it
        if ceiling is not None and (flops > target + ceiling) != (than > target + ceiling):
            return flops <= target + ceiling
        return abs(flops - target) < abs(than - target)

    while probes < max_probes and hi - lo > 1e-4:
        probes += 1
        ratio = 0.5 * (lo + hi)
        if probes % 2 and f_lo > f_hi:
            share = (math.sqrt(f_lo) - math.sqrt(target)) / (math.sqrt(f_lo) - math.sqrt(f_hi))
            ratio = min(max(lo + share * (hi - lo), lo + 1e-5), hi - 1e-5)
        flops = prune(copy.deepcopy(model), ratio)
        if better(flops, best_flops):
            best_ratio, best_flops = ratio, flops
        if abs(flops - target) <= tolerance:
            break
        if flops > target:
            lo, f_lo = ratio, flops
        else:
            hi, f_hi = ratio, flops
    if abs(best_flops - target) > tolerance:
        warnings.warn(
            f"the search reached FLOPs ratio {best_flops:.4f} for target {target} "
            f"(tolerance {tolerance}); channel steps are coarser than the tolerance here",
            stacklevel=2,
        )
    flops = prune(model, best_ratio)  # for real, with the ratio found on the copies
    if abs(flops - best_flops) > 1e-9:
        raise RuntimeError(f"pruning is not deterministic: {flops} on the model, {best_flops}")
    return {"pruning_ratio": best_ratio, "search_probes": probes, "flops_ratio": flops}


def random_architecture(
    model: nn.Module,
    example: torch.Tensor,
    target: float,
    seed: int,
    logit_std: float,
    ignored_layers: Sequence[str] = (),
) -> tuple[nn.Module, int]:
    """A physically pruned copy of ``model`` with random widths at ``target`` FLOPs.

    Random width logits, moved by ``project_to_budget`` until the hard FLOPs meet the pruner's
    target, then exported: the kept channels keep their (random) initial weights. Returns the
    model and the projection steps taken.
    """
    pruner = S2HPruner(model, example, target_flops=target, ignored_layers=ignored_layers)
    generator = torch.Generator().manual_seed(10_007 * seed + 1)  # leaves torch's RNG alone
    with torch.no_grad():
        for logits in pruner.mask_parameters():
            noise = torch.randn(logits.shape, generator=generator) * logit_std
            logits.copy_(noise.to(logits.device))
    steps = project_to_budget(pruner, tolerance=0.004)
    if abs(pruner.ratio("hard") - target) > 0.004:
        warnings.warn(
            f"random widths reach FLOPs {pruner.ratio('hard'):.4f}, not {target}", stacklevel=2
        )
    pruner.freeze_ranks = True
    return pruner.export(), steps


# ----------------------------------------------------------------------------- pricing


def pruned_proxy(
    method: str,
    model: nn.Module,
    example: torch.Tensor,
    target: float,
    cfg: RunConfig,
    options: BaselineOptions,
    full_flops: float,
) -> tuple[nn.Module, torch.memory_format]:
    """The network ``method`` fine-tunes, pruned from ``model``'s weights (a copy), and the
    layout it trains in (:func:`pruned_layout`): exactly it for random widths and L1 at once
    from trained weights; for iterative L1 the same schedule of prunes on the starting
    weights, for Group-SL its importance at once (same FLOPs, close widths)."""
    net = copy.deepcopy(model)
    if method == "random":
        net, _ = random_architecture(net, example, target, cfg.seed, options.random_logit_std,
                                     cfg.ignored_layers)  # fmt: skip
    else:
        factory: PrunerFactory = partial(
            l1_pruner, global_pruning=options.l1_global, round_to=options.l1_round_to
        )
        if method == "group-sl":
            factory = partial(group_sl_pruner, reg=options.group_sl_reg)
        for aim in pruning_aims(method, options, target):
            prune_to_flops(net, example, factory, aim, options.flops_tolerance,
                           options.max_probes, ignored_layers=cfg.ignored_layers,
                           reference_flops=full_flops, ceiling=options.flops_ceiling)  # fmt: skip
    layout = pruned_layout(net, cfg, example)
    return _memory_format(net, cfg, layout), layout


def exact_proxy(method: str, options: BaselineOptions) -> bool:
    """Whether :func:`pruned_proxy` is the very network the run trains: random widths, and L1
    pruned once from the starting weights (the others prune weights trained meanwhile)."""
    once = options.pretrain_fraction <= 0.0 and options.l1_steps == 1
    return method == "random" or (method == "l1-ft" and once)


def pruning_aims(method: str, options: BaselineOptions, target: float) -> list[float]:
    """The FLOPs ratios a method prunes to, in order: iterative L1's step i of n prunes to
    1 - (1 - target) i / n (torch-pruning's linear schedule, ending at the target); the
    others prune once. (With widths in steps of ``l1_round_to`` a single prune can stop far
    above a low target; the steps get there.)"""
    pieces = options.l1_steps if method == "l1-ft" else 1
    if pieces == 1:
        return [target]
    return [1.0 - (1.0 - target) * i / pieces for i in range(1, pieces + 1)]


# how the pricing proxy is built; a price stored by an earlier version is measured anew.
# 2 (round 37): the pruned network trains in the layout S2HPruner's rule picks
# (:func:`pruned_layout`), and iterative L1's proxy follows its schedule of prunes
PROXY_VERSION = 2


def own_step_cost(network: nn.Module, data: Data, cfg: RunConfig, turns: int = 5,
                  block: int = 10, layout: torch.memory_format | None = None) -> dict:  # fmt: skip
    """Seconds of a plain training step of ``network`` (in ``layout``; None: the run's) over
    those of the full model, timed side by side as ``step_timing`` times S2HPruner (blocks
    of the same batches, in the order full-pruned, pruned-full, ...; the median over pairs
    of blocks): what one of its steps costs in the full-model steps a compute budget
    counts. Copies are trained."""
    load_before = os.getloadavg()  # stored: a timing that shared the CPU shows there
    full, pruned = build_model(cfg, data), copy.deepcopy(network)
    block = min(block, data.steps_per_epoch)
    slots = max(1, data.steps_per_epoch // block)
    train(full, data, cfg, 0, block, "price: warm-up")  # untimed: first allocations
    train(pruned, data, cfg, 0, block, "price: warm-up", layout=layout)
    ratios, position = [], 0
    for _ in range(turns):
        seconds = {"full": 0.0, "pruned": 0.0}
        for order in (("full", "pruned"), ("pruned", "full")):
            position += 1
            start = (position % slots) * block  # both sides on the same batches
            for side in order:
                net, net_layout = (full, None) if side == "full" else (pruned, layout)
                seconds[side] += train(net, data, cfg, start, block, f"price: {side}",
                                       layout=net_layout)  # fmt: skip
        ratios.append(seconds["pruned"] / seconds["full"])
    return {"ratio": statistics.median(ratios), "pair_ratios": ratios, "turns": turns,
            "block_steps": block,
            "load_average": {"before": load_before, "after": os.getloadavg()}}  # fmt: skip


def starting_point(cfg: RunConfig) -> tuple[Data, nn.Module]:
    """The run's data and starting model, seeded and built in the order s2hpruner.app.run
    uses: every process that starts from ``cfg`` (a run, a fresh process pricing it) gets
    the same model and the same random state after it."""
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_data(cfg, device)
    return data, build_model(cfg, data)


def _proxy_price(method: str, model: nn.Module, data: Data, target: float, cfg: RunConfig,
                 options: BaselineOptions, full_flops: float) -> dict:  # fmt: skip
    """:func:`own_step_cost` of the network ``method`` trains (:func:`pruned_proxy` of
    ``model``), with that network's FLOPs ratio, layout and the process that timed it."""
    proxy, layout = pruned_proxy(method, model, data.example, target, cfg, options, full_flops)
    price = own_step_cost(proxy, data, cfg, options.pricing_turns, layout=layout)
    return {**price, "proxy_flops_ratio": count_flops(proxy, data.example) / full_flops,
            "proxy_layout": str(layout), "process_id": os.getpid()}  # fmt: skip


def own_step_price(method: str, cfg: RunConfig, options: BaselineOptions) -> dict:
    """:func:`_proxy_price` from scratch, as :func:`run_baseline` starts (the same seeding,
    data, model and so the same proxy): what a fresh process runs
    (``options.price_in_fresh_process``)."""
    data, model = starting_point(cfg)
    full_flops = count_flops(model, data.example)
    return _proxy_price(method, model, data, flops_target(cfg), cfg, options, full_flops)


def _stored_price(path: Path | None, priced_for: dict) -> dict | None:
    """The price an earlier attempt at this run measured, when it was for the same method,
    target, seed and options: a timing is never the same twice, and the steps follow it."""
    if path is None or not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if {k: stored.get(k) for k in priced_for} != json.loads(json.dumps(priced_for)):
        return None
    return {**stored["price"], "reused_from": str(path)}


def mean_step_cost(method: str, options: BaselineOptions, pruned_cost: float) -> float:
    """A baseline's mean step in full-model steps: a stage on the unpruned model costs 1,
    one on the pruned network ``pruned_cost``; iterative L1's piece i trains a network with
    (i - 1) / n of the FLOPs to remove gone, priced in between linearly."""
    if method == "l1":
        return 1.0
    if method == "random":
        return pruned_cost
    first = options.pretrain_fraction if method == "l1-ft" else options.sparse_fraction
    tail = pruned_cost
    if method == "l1-ft" and options.l1_steps > 1:
        n, share = options.l1_steps, options.l1_descent
        pieces = 1.0 - (1.0 - pruned_cost) * (n - 1) / (2 * n)  # mean over the n pieces
        tail = share * pieces + (1.0 - share) * pruned_cost
    return first + (1.0 - first) * tail


# ----------------------------------------------------------------------------- one run


def _split(total: int, fraction: float) -> int:
    """Steps of the first of two stages: at least one step in each, unless ``fraction`` is 0
    (no first stage at all)."""
    if fraction <= 0.0:
        return 0
    if total < 2:
        raise ValueError("a two-stage method needs at least 2 training steps; raise the epochs")
    return min(total - 1, max(1, round(total * fraction)))


def _save_model(model: nn.Module, path: Path) -> None:
    """torch.save via a temporary file and a rename: never a truncated file."""
    atomic_torch_save(copy.deepcopy(model).cpu(), path)


def run_baseline(
    method: str, cfg: RunConfig, options: BaselineOptions, run_dir: Path | None = None
) -> dict:
    """Train, prune and evaluate one baseline; returns its record (top-1 on the test split).

    The validation split is only reported (``val_top1``); no choice is made on the test split.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")
    data, model = starting_point(cfg)
    device = data.device
    example = data.example
    ignored_names(model, example, cfg.ignored_layers)  # a wrong name fails before training
    target = flops_target(cfg)
    full_flops, full_params = count_flops(model, example), count_params(model)
    total = max(1, round(cfg.resolve_epochs(data.steps_per_epoch) * data.steps_per_epoch))
    eval_loader = partial(DataLoader, batch_size=cfg.eval_batch_size, num_workers=cfg.workers)
    test_loader = eval_loader(data.splits.test)
    stages: list[dict] = []
    record: dict = {"top1_dense": None, "pruning_ratio": None, "search_probes": None}
    step = 0
    priced_layout = None  # the layout the price was timed in, when the proxy is the network
    if options.own_step_pricing and method != "l1":  # (l1 trains the full model only)
        # cfg.epochs: full-model epochs of wall time; as many of its own steps as they pay for
        price_file = None if run_dir is None else Path(run_dir) / "own_step_price.json"
        # what the price depends on: another proxy, layout rule or machine is priced anew
        priced_for = {"method": method, "target": target, "seed": cfg.seed,
                      "options": dataclasses.asdict(options), "device": str(device),
                      "threads": torch.get_num_threads(), "host": platform.node(),
                      "cpu": platform.processor(), "proxy": PROXY_VERSION,
                      "ignored_layers": list(cfg.ignored_layers),
                      "channels_last": cfg.channels_last, "batch_size": cfg.batch_size,
                      "tuned_layout": tunes_pruned_layout(cfg), "torch": torch.__version__,
                      "torch_pruning": tp.__version__}  # fmt: skip
        price = _stored_price(price_file, priced_for)
        if price is None:
            if options.price_in_fresh_process:  # it builds the same proxy from the same seed
                price = in_fresh_process(own_step_price, method, cfg, options)
            else:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    price = _proxy_price(method, model, data, target, cfg, options, full_flops)
            if price_file is not None:  # a rerun of this run (a crash) trains the same steps
                price_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(price_file, json.dumps({**priced_for, "price": price},
                                                          indent=1).encode())  # fmt: skip
        if exact_proxy(method, options) and "proxy_layout" in price:  # one timing decides
            priced_layout = MEMORY_FORMATS[price["proxy_layout"]]
        mean = mean_step_cost(method, options, price["ratio"])
        record["own_step_pricing"] = {**price, "mean_step_cost": mean,
                                      "full_model_epochs": cfg.epochs,
                                      "full_model_steps": total}  # fmt: skip
        total = max(1, round(total / mean))

    layout = _run_layout(cfg)  # the full model's; a pruned network's is timed (pruned_layout)

    def stage(name: str, steps: int, network: str, **kwargs) -> None:
        nonlocal step
        seconds = train(model, data, cfg, step, steps, f"{method} {name}", layout=layout,
                        **kwargs)  # fmt: skip
        stages.append(
            {
                "name": name,
                "network": network,
                "steps": steps,
                "epochs": steps / data.steps_per_epoch,
                "seconds": seconds,
                "layout": str(layout),
            }
        )
        step += steps

    def test(desc: str) -> float:
        return evaluate(model, test_loader, device, progress=cfg.progress, desc=desc)

    if cfg.init is not None or cfg.pretrained:  # what the starting weights score (as s2h runs)
        record["top1_start_val"] = evaluate(
            model, eval_loader(data.splits.val), device, progress=cfg.progress, desc="val start"
        )

    if method == "random":
        model, projection_steps = random_architecture(
            model, example, target, cfg.seed, options.random_logit_std, cfg.ignored_layers
        )
        layout = priced_layout or pruned_layout(model, cfg, example)
        model = _memory_format(model, cfg, layout)
        record["projection_steps"] = projection_steps
        stage("train", total, "pruned")
    else:  # importance-based: train (dense or sparse), prune to the target, maybe fine-tune
        factory: PrunerFactory = partial(
        l1_pruner, global_pruning=options.l1_global, round_to=options.l1_round_to
    )
        if method == "l1":
            first = total
            stage("train", total, "dense")
        elif method == "l1-ft":
            first = _split(total, options.pretrain_fraction)
            if first:  # none when pruning a trained model at once
                stage("pretrain", first, "dense")
        else:
            first = _split(total, options.sparse_fraction)
            factory = partial(group_sl_pruner, reg=options.group_sl_reg)
            if first:
                ignored = ignored_names(model, example, cfg.ignored_layers)
                sparse = make_pruner(factory, model, example, 0.0, ignored)
                sparse.update_regularizer()  # groups do not change until the pruning below
                stage(
                    "sparse",
                    first,
                    "dense",
                    weight_decay=options.sparse_weight_decay,
                    after_backward=sparse.regularize,
                )
                del sparse  # its dependency graph describes the unpruned model
        record["top1_dense"] = test("test dense")

        def prune_to(aim: float) -> dict:
            nonlocal model, layout
            found = prune_to_flops(
                model, example, factory, aim, options.flops_tolerance, options.max_probes,
                ignored_layers=cfg.ignored_layers, reference_flops=full_flops,
                ceiling=options.flops_ceiling,
            )  # fmt: skip
            layout = priced_layout or pruned_layout(model, cfg, example)
            model = _memory_format(model, cfg, layout)
            return found

        finetune, pieces = total - first, options.l1_steps if method == "l1-ft" else 1
        if pieces == 1:
            found = prune_to(target)
            record.update(pruning_ratio=found["pruning_ratio"])
            record.update(search_probes=found["search_probes"])
            if finetune:
                stage("finetune", finetune, "pruned")
        else:  # iterative: step i of n prunes to 1 - (1 - target) i / n, i / n into the descent
            descent, done, record["pruning_steps"] = round(finetune * options.l1_descent), 0, []
            for i, aim in enumerate(pruning_aims(method, options, target), start=1):
                end = round(descent * i / pieces)
                if end > done:
                    network = "unpruned" if i == 1 else "partly pruned"
                    stage(f"finetune {i}/{pieces}", end - done, network,
                          schedule_span=(done, finetune))  # fmt: skip
                    done = end
                record["pruning_steps"].append({"step": first + done, "aim": aim, **prune_to(aim)})
            record["pruning_ratio"] = [p["pruning_ratio"] for p in record["pruning_steps"]]
            record["search_probes"] = sum(p["search_probes"] for p in record["pruning_steps"])
            if finetune > done:
                stage("finetune", finetune - done, "pruned", schedule_span=(done, finetune))

    model.eval()
    record["top1_hard"] = test("test")
    record["val_top1"] = evaluate(
        model, eval_loader(data.splits.val), device, progress=cfg.progress, desc="val"
    )
    flops, params = count_flops(model, example), count_params(model)
    # plain training of the full model (the sparse stage also pays for the regulariser)
    first_stage = stages[0] if stages else {}
    plain = first_stage.get("network") == "dense" and first_stage.get("name") != "sparse"
    dense = first_stage if plain else None
    if run_dir is not None:
        _save_model(model, Path(run_dir) / "model_pruned.pt")
    return {
        "method": method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "init": cfg.init,
        "target_flops": target,
        "seed": cfg.seed,
        "epochs": total / data.steps_per_epoch if options.own_step_pricing else cfg.epochs,
        "top1_soft": None,
        "gap": None,
        **record,
        "flops_ratio": flops / full_flops,
        "params_ratio": params / full_params,
        "flops_full": full_flops,
        "flops_pruned": flops,
        "params_full": full_params,
        "params_pruned": params,
        "train_seconds": sum(s["seconds"] for s in stages),
        "dense_seconds_per_epoch": dense["seconds"] / dense["epochs"] if dense else None,
        "stages": stages,
        "conv_out_channels": {
            name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
        },
    }


def time_dense(cfg: RunConfig, steps: int) -> dict:
    """Seconds per epoch of plain training of the full model, timed over ``steps`` steps of the
    run's recipe and batch order (the run's starting weights, thrown away after): the plain
    side of the compute ratio when no method of the benchmark trains the full model."""
    data, model = starting_point(cfg)
    steps = max(1, min(steps, data.steps_per_epoch))
    seconds = train(model, data, cfg, 0, steps, "time plain step")
    return {
        "dense_seconds_per_epoch": seconds / steps * data.steps_per_epoch,
        "timed_steps": steps,
        "timed_seconds": seconds,
        "steps_per_epoch": data.steps_per_epoch,
    }
