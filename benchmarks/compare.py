"""Compare S2HPruner with DMP, its ablations and importance-based baselines (BENCHMARK.md).

    python -m benchmarks.compare --profile quick|full|from-trained [--out benchmarks/results]
        [--resume] [--max-runs N] [--targets ...] [--seeds ...] [--budgets ...]

Every method gets the same model, data splits, augmentation, seed and initial weights, and
ends with an exported, physically pruned model whose FLOPs are counted by
``s2hpruner.count_flops``. Budgets are matched two ways, both reported:

* ``epochs``: every method trains for the profile's epochs;
* ``compute``: an S2HPruner epoch runs two networks, so the single-network methods of
  ``compute_methods`` run again with epochs x (S2HPruner seconds per epoch / plain seconds per
  epoch of the full model), both measured by this benchmark for the same target and seed.
  With ``compute_pricing: own-steps`` that budget counts full-model epochs of wall time, and
  each method trains as many steps of its own (pruned) network as it pays for, priced by
  timing that network against the full model (S2HPruner's last phase on its pruned network
  is priced the same way); ``full-model`` (rounds 6-34) charged every step as a full one.
  With ``timing_process: fresh`` every such timing runs in a newly spawned process
  (``benchmarks.fresh_process``): in the benchmark's own, an earlier run's report had pinned
  glibc's allocator, and a pruned network trained there at another speed (round 41). A run's
  report times in a child process since round 42 (``latency_process``), except in ``same``
  profiles, whose stored files were timed in the held state and whose resumes must be too.

The ``from-trained`` profile starts every method from one trained checkpoint (``init``, made
once by ``benchmarks.pretrain``) and adds:

* ``long`` and ``long-compute`` budgets: ``long_factor`` x the epochs (and x the compute ratio);
* a hyper-parameter search on the validation split: for each method in ``search``, at the
  ``tune_seed``, on the ``tune_budgets`` and at the ``tune_targets``, every candidate is a
  complete run; the one with the best validation top-1 becomes the run (the test split is only
  reported), every candidate is kept in the JSON's ``tuning`` list. Other seeds, budgets and
  targets reuse the choice of the same method at the nearest searched target; the methods of
  ``borrow`` (the S2HPruner ablations) reuse S2HPruner's choice, so that an ablation differs
  from it in one part only;
* the compute ratio's plain side timed on the full model (``dense_timing_steps`` steps), since
  no method trains the full model there.

Each finished run is written at once (whole JSON, atomically) to ``<out>/<profile>.json``
(``-`` in the profile's name becomes ``_``), so ``--resume`` skips runs whose (method, target,
seed, budget) is already there, and every finished search candidate; an interrupted S2HPruner
run also resumes from its own checkpoint. ``RESULTS.md`` (beside ``<out>``) and
``<out>/<profile>.png`` are regenerated from the JSON; ``--report-only`` does only that.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from tqdm.auto import tqdm

from s2hpruner.app.checkpoint import seed_everything
from s2hpruner.app.config import METHODS, ConfigError, RunConfig
from s2hpruner.app.files import atomic_write_bytes
from s2hpruner.app.run import build_model, build_splits, prune
from s2hpruner.app.sampling import eval_loader
from s2hpruner.core.trainer import evaluate

from .baselines import BASELINES, BaselineOptions, pick_device, run_baseline, time_dense
from .fresh_process import in_fresh_process
from .report import BUDGET_SLACK, file_stem, write_reports
from .step_timing import time_side_by_side

ALL_METHODS = (*METHODS, *BASELINES)
MAIN_METHODS = ("s2h", "dmp", "l1-ft", "group-sl", "random")
ABLATIONS = tuple(m for m in METHODS if m not in MAIN_METHODS)
# a budget, and the (base) budget it lengthens; "compute" budgets scale by the compute ratio
BUDGETS = ("epochs", "compute", "long", "long-compute")
LONG = {"long": "epochs", "long-compute": "compute"}
COMPUTE = ("compute", "long-compute")
# what a search candidate may set: RunConfig fields, and BaselineOptions fields
RUN_HYPER = ("lr", "freeze", "freeze_epochs", "weight_decay", "mask_lr", "freeze_teacher",
             "descent", "round_to", "ignored_layers")
OPTION_HYPER = tuple(f.name for f in dataclasses.fields(BaselineOptions))


@dataclass(frozen=True)
class Profile:
    """What a benchmark runs. Fields listed in ``RESULT_FIELDS`` change the numbers, so a
    resumed benchmark must use the values stored in its JSON; the others only select runs."""

    name: str
    targets: tuple[float, ...] = (0.35,)
    methods: tuple[str, ...] = ("s2h", "dmp", "l1", "l1-ft", "group-sl")
    compute_methods: tuple[str, ...] = ("l1-ft",)  # also run on the compute-matched budget
    seeds: tuple[int, ...] = (0,)
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    epochs: float = 4.0
    batch_size: int = 256
    lr: float = 0.1
    val_size: float | None = 5000
    train_subset: int | None = None
    # S2HPruner family: epochs of the last phase, with the widths frozen. Absolute, whatever
    # the epochs: passed as RunConfig.freeze_epochs, which overrides the fraction
    # RunConfig.freeze (so the stored benchmarks keep their meaning); None: the fraction
    freeze_epochs: float | None = 1.0
    freeze: float = 0.25
    options: BaselineOptions = field(default_factory=BaselineOptions)
    # starting weights of every method (None: the seed's random init); a missing file stops
    # the benchmark with ``pretrain_command``
    init: str | None = None
    pretrain_command: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    # the S2HPruner family's round_to: kept widths multiples of this (or the full width); the
    # baselines keep any width (None: so does S2HPruner)
    round_to: int | None = None
    # the S2HPruner family trains the physically pruned network once its widths freeze
    # (RunConfig.prune_at_freeze); the masked hard network when False
    prune_at_freeze: bool = False
    # where the S2HPruner family's width search starts (RunConfig.search_start)
    search_start: str = "full"
    # what ranks the S2HPruner family's channels (RunConfig.importance)
    importance: str = "producers"
    # validation-split search: method -> candidates (overrides of RUN_HYPER / OPTION_HYPER),
    # the first is the base recipe (it wins ties); borrow: method -> method whose choice it uses
    search: dict[str, tuple[dict, ...]] = field(default_factory=dict)
    borrow: dict[str, str] = field(default_factory=dict)
    tune_seed: int = 0
    tune_budgets: tuple[str, ...] = ("epochs", "compute")
    # targets searched (empty: every target); the others reuse the nearest searched target's
    # choice, so the plan runs searched targets first within a seed
    tune_targets: tuple[float, ...] = ()
    # seed of the train/val split of every run (None: the run's seed); fixed to the split the
    # starting checkpoint was trained on, so no seed validates on images it has seen
    split_seed: int | None = None
    long_factor: float = 3.0
    long_targets: tuple[float, ...] = ()
    long_methods: tuple[str, ...] = ()
    # plain seconds per epoch timed on this many steps of the full model when no method trains
    # it (0: taken from an l1/l1-ft run's dense stage, as in the from-scratch profiles); unused
    # when compute_timing_turns > 0
    dense_timing_steps: int = 0
    # > 0: the compute ratio is timed side by side in one process, S2HPruner's step against a
    # plain one in this many alternating turns per phase (benchmarks.step_timing), instead of
    # dividing the s2h run's wall time by a plain one timed apart (host drift enters that)
    compute_timing_turns: int = 0
    # how a compute budget prices a single-network method's steps: "full-model" (each step as
    # one of the full model, whatever the network it trains: rounds 6-34) or "own-steps"
    # (each step at its own network's cost, timed against the full model's: equal wall time,
    # as S2HPruner's last phase on its pruned network is priced; BaselineOptions)
    compute_pricing: str = "full-model"
    # where the compute budget's timings run (S2HPruner's step against a plain one, each
    # baseline's price): "same", the benchmark's process, after whatever ran there before (an
    # S2HPruner run's report there pins glibc's allocator, and a pruned network then trains at
    # another speed), or "fresh", each in a newly spawned process (benchmarks.fresh_process)
    timing_process: str = "same"
    # selection only: method -> the only targets it runs at; target -> the only seeds it runs
    only_at: dict[str, tuple[float, ...]] = field(default_factory=dict)
    seed_limits: dict[float, tuple[int, ...]] = field(default_factory=dict)
    budgets: tuple[str, ...] = BUDGETS
    data_root: str | None = None
    latency_repeats: int = 30
    progress: bool = True

    def __post_init__(self) -> None:
        if self.compute_pricing not in ("full-model", "own-steps"):
            raise ValueError(f"profile {self.name}: compute_pricing {self.compute_pricing!r}; "
                             "choose full-model or own-steps")  # fmt: skip
        if self.timing_process not in ("same", "fresh"):
            raise ValueError(f"profile {self.name}: timing_process {self.timing_process!r}; "
                             "choose same or fresh")  # fmt: skip


RESULT_FIELDS = (
    "model",
    "dataset",
    "epochs",
    "batch_size",
    "lr",
    "val_size",
    "train_subset",
    "freeze_epochs",
    "options",
    "freeze",
    "init",
    "model_kwargs",
    "round_to",
    "prune_at_freeze",
    "search_start",
    "importance",
    "search",
    "borrow",
    "tune_seed",
    "tune_budgets",
    "tune_targets",
    "split_seed",
    "long_factor",
    "dense_timing_steps",
    "compute_timing_turns",
    "compute_pricing",
    "timing_process",
)
# fields added after benchmarks were stored: a stored file without them used these values
LATER_FIELDS = ("freeze", "init", "model_kwargs", "search", "borrow", "tune_seed",
                "tune_budgets", "long_factor", "dense_timing_steps", "tune_targets",
                "split_seed", "compute_timing_turns", "round_to", "prune_at_freeze",
                "search_start", "importance", "compute_pricing",
                "timing_process")  # fmt: skip

CHECKPOINT = "benchmarks/cache/resnet20_fmnist_5ep.pt"
PRETRAIN_COMMAND = f"python -m benchmarks.pretrain --model resnet20 --epochs 5 --out {CHECKPOINT}"
FINE_TUNE_LRS = (0.01, 0.03)  # baselines fine-tuning a trained net: 1/10 and ~1/3 of its lr
SINGLE_NETWORK = ("l1-ft", "group-sl", "random")


def _grid(**values: tuple) -> tuple[dict, ...]:
    """Every combination of ``values``, the first value of each key first (the base recipe)."""
    combos: list[dict] = [{}]
    for key, options in values.items():
        combos = [{**c, key: v} for v in options for c in combos]
    return tuple(combos)


FROM_TRAINED = Profile(
    "from-trained",
    targets=(0.15, 0.35, 0.55),
    methods=(*MAIN_METHODS, *ABLATIONS),
    compute_methods=SINGLE_NETWORK,
    seeds=(0, 1),
    epochs=1.0,  # configs/fmnist_resnet20_from_trained.yaml
    batch_size=128,
    lr=0.02,
    val_size=None,  # the split benchmarks.pretrain held out (seed 0): unseen by the checkpoint
    freeze_epochs=None,
    freeze=0.4,
    # l1-ft prunes the trained model at once; group-sl's sparse share is searched
    options=BaselineOptions(pretrain_fraction=0.0, sparse_fraction=0.25),
    init=CHECKPOINT,
    pretrain_command=PRETRAIN_COMMAND,
    # every method searches its learning rate; s2h also its last phase (distilled from the
    # soft network, or the cheaper hard network alone), the single-network baselines their
    # allocation (l1-ft) or sparse-training share (group-sl): four candidates each
    search={
        "s2h": (*_grid(lr=(0.02, 0.01)),
                *_grid(lr=(0.02, 0.01), freeze_teacher=("none",))),  # fmt: skip
        "dmp": _grid(lr=(0.02, 0.01)),
        "l1-ft": _grid(lr=FINE_TUNE_LRS, l1_global=(True, False)),
        "group-sl": _grid(lr=FINE_TUNE_LRS, sparse_fraction=(0.25, 0.5)),
        "random": _grid(lr=FINE_TUNE_LRS),
    },
    borrow={m: "s2h" for m in ABLATIONS},
    tune_seed=0,
    # searched once, at 0.35 on the epochs budget; the compute budgets and the other targets
    # reuse that choice (a search per target and budget would triple the profile's hours)
    tune_budgets=("epochs",),
    tune_targets=(0.35,),
    split_seed=0,  # the checkpoint's split: seed 1 validates on the same unseen images
    long_factor=3.0,
    long_targets=(0.35,),
    long_methods=MAIN_METHODS,
    dense_timing_steps=100,
    only_at={m: (0.35,) for m in ABLATIONS},
    seed_limits={0.15: (0,), 0.55: (0,)},
)

# What the from-trained search chose on validation for each method (resnet20, 0.35, seed 0;
# `tuning` in results/from_trained.json): the profiles below reuse these, one candidate each.
RESNET20_CHOICES = {
    "s2h": {"lr": 0.01},
    "l1-ft": {"lr": 0.01, "l1_global": True},
    "group-sl": {"lr": 0.01, "sparse_fraction": 0.25},
    "random": {"lr": 0.03},
}

# A deeper network from its own trained checkpoint (issue #15: "also resnet56"), at 0.35 on
# both budgets, one seed. Every method keeps the choice its search made on resnet20 (one
# candidate each): the same transfer for all, and a search here would cost ~2 h more.
CHECKPOINT_RESNET56 = "benchmarks/cache/resnet56_fmnist_5ep.pt"
FROM_TRAINED_RESNET56 = dataclasses.replace(
    FROM_TRAINED,
    name="from-trained-resnet56",
    model="resnet56",
    targets=(0.35,),
    methods=("s2h", "l1-ft", "group-sl", "random"),
    seeds=(0,),
    budgets=("epochs", "compute"),
    init=CHECKPOINT_RESNET56,
    pretrain_command=PRETRAIN_COMMAND.replace("resnet20", "resnet56"),
    search={m: (hyper,) for m, hyper in RESNET20_CHOICES.items()},
    borrow={},
    long_targets=(),
    only_at={},
    seed_limits={},
)

# S2HPruner with a cheaper schedule from the same trained resnet20 (issue #15, item 3: "the
# length of the frozen-width phase", "a cheaper last phase"). The per-step trace of the chosen
# from-trained run shows its search meeting the budget at step 45 and settled by step ~130 of
# 257 joint steps: the rest of the joint phase trains two networks for little architecture
# change. Here the search gets the first 30% of the epoch (129 steps) and the hard network
# alone the rest, so S2HPruner's epoch costs less and the compute budget of the baselines
# shrinks with it. The baselines keep their resnet20 choices; seeds 0-2 at 0.35.
FROM_TRAINED_CHEAP = dataclasses.replace(
    FROM_TRAINED,
    name="from-trained-cheap",
    targets=(0.35,),
    seeds=(0, 1, 2),
    methods=("s2h", "l1-ft", "random"),
    budgets=("epochs", "compute"),
    freeze=0.7,
    search={
        "s2h": ({**RESNET20_CHOICES["s2h"], "freeze_teacher": "none"},),
        "l1-ft": (RESNET20_CHOICES["l1-ft"],),
        "random": (RESNET20_CHOICES["random"],),
    },
    borrow={},
    long_targets=(),
    only_at={},
    seed_limits={},
)

# The same, with the compute ratio timed side by side in one process (benchmarks.step_timing):
# round 12 measured 1.16-1.60 for this recipe by dividing wall times taken minutes apart. The
# search's share (30% as above, or 15%: the search met the budget at steps 45-54, so 64 steps
# reach it, though the trace was still moving by ~0.01 until step ~130; it costs less) and
# S2HPruner's lr (the baselines' grid FINE_TUNE_LRS; 0.03 was the best lr on validation in
# round 10) are chosen on validation. (dense_timing_steps, inherited, is unused here.)
FROM_TRAINED_CHEAP_TIMED = dataclasses.replace(
    FROM_TRAINED_CHEAP,
    name="from-trained-cheap-timed",
    compute_timing_turns=9,
    search={
        **FROM_TRAINED_CHEAP.search,
        "s2h": _grid(lr=FINE_TUNE_LRS, freeze_teacher=("none",), freeze=(0.7, 0.85)),
    },
)

# Every method of issue #15 in one benchmark, with the timed compute ratio: S2HPruner, DMP and
# the three ablations (these borrow S2HPruner's choice, so each differs from it in one part
# only), and the baselines with their from-trained grids, searched again here from the same
# checkpoint as S2HPruner's: four candidates each (random: its two learning rates).
FROM_TRAINED_ALL = dataclasses.replace(
    FROM_TRAINED_CHEAP_TIMED,
    name="from-trained-all",
    targets=(0.15, 0.35, 0.55),
    methods=(*MAIN_METHODS, *ABLATIONS),
    search={
        **{m: FROM_TRAINED.search[m] for m in SINGLE_NETWORK},
        "s2h": FROM_TRAINED_CHEAP_TIMED.search["s2h"],
    },
    borrow={m: "s2h" for m in ("dmp", *ABLATIONS)},
    only_at={m: (0.35,) for m in ABLATIONS},
    seed_limits={0.15: (0,), 0.55: (0,)},
)

# The same with S2HPruner's widths aligned (every kept width a multiple of 8). On an AVX-512 CPU
# the odd widths its search keeps (9, 18, 42) miss the convolution kernels' fast paths, and the
# speed benchmark had its hard pass at 0.35 of the FLOPs at 0.74 of a plain step aligned, 0.95
# not (MEASUREMENTS round 14, section 6): a cheaper epoch would shrink the baselines' compute
# budget. (Measured in round 19: in the runs it is not reliably cheaper.) The baselines keep any
# width: alignment only constrains their accuracy (their compute is counted in full-model
# steps), and torch-pruning's round_to cannot reach every target here (uniform L1 jumps from
# 0.29 to 0.45 of the FLOPs around 0.35).
FROM_TRAINED_ALIGNED = dataclasses.replace(
    FROM_TRAINED_ALL, name="from-trained-aligned", round_to=8
)

# The same as from-trained-all with the last phase on the physically pruned network: once the
# widths freeze, S2HPruner trains the exported network itself (the same updates as the masked
# hard network's), whose own step round 19 measured at 0.69 of a plain step against 0.80-0.87
# for the sliced hard pass. Its epoch costs less, and so does the baselines' compute budget.
FROM_TRAINED_PRUNED = dataclasses.replace(
    FROM_TRAINED_ALL, name="from-trained-pruned", prune_at_freeze=True
)

# Both: aligned widths and the last phase on the pruned network. Measured in round 20 (an
# ad-hoc probe on this CPU, batch 128): the pruned network's own training step costs 0.89 of a
# plain step with the widths the search keeps (9, 19, 38 channels) and 0.69 with widths aligned
# to 8, where the kernels' fast paths apply; the masked hard pass could not use that (round 19).
# With the cheaper epoch, also the longer budget (three times the epochs) at 0.35.
FROM_TRAINED_ALIGNED_PRUNED = dataclasses.replace(
    FROM_TRAINED_ALIGNED, name="from-trained-aligned-pruned", prune_at_freeze=True,
    long_targets=(0.35,), long_methods=("s2h", "l1-ft", "random"),
)

# The same as from-trained-pruned with the search started at uniform pruning's widths. Round 21
# cut each run's widths from the checkpoint and fine-tuned them alike
# (benchmarks.architecture_finetune --uniform): the search's allocation is no better than
# uniform pruning's at 0.35 and 0.55, and 0.4 worse at 0.15, while S2HPruner's training of its
# architecture beats plain fine-tuning of it there by 0.8. Started at the budget, the search
# only moves channels between groups, and accuracy drives it from the first step.
FROM_TRAINED_UNIFORM_START = dataclasses.replace(
    FROM_TRAINED_PRUNED, name="from-trained-uniform-start", search_start="uniform"
)

# The same as from-trained-pruned with the channels ranked by torch-pruning's group L1
# importance, the ranking of the l1-ft baseline. Round 21 cut uniform pruning's widths at 0.15
# from the checkpoint by either ranking and fine-tuned both alike: 90.09 (val 90.02) with the
# group's, 89.60 (89.66) with the producers' alone (the SPEC's rule, S2HPruner's default).
# Round 22: seeds 1 and 2 at 0.15 and 0.55 as well (#15's goal is a mean over seeds).
FROM_TRAINED_GROUP_IMPORTANCE = dataclasses.replace(
    FROM_TRAINED_PRUNED, name="from-trained-group-importance", importance="group",
    seed_limits={},
)

# Both levers together: the group's ranking (S2HPruner's top-1 at equal epochs) and the cheap
# epoch of aligned widths trained physically pruned (1.07 plain epochs at 0.35 in round 20,
# against 1.49 with the widths the search keeps: the baselines' compute budget shrinks with
# it). Seeds 0-2 at every target.
FROM_TRAINED_GROUP_ALIGNED = dataclasses.replace(
    FROM_TRAINED_ALIGNED_PRUNED, name="from-trained-group-aligned", importance="group",
    seed_limits={}, long_targets=(),
)

# The same with S2HPruner fixed to the cheaper of its two search shares: is the search share
# worth choosing per unit of compute rather than at equal epochs? At 0.35, seed 0, validation
# put the 15% search (freeze 0.85) 0.04 below the 30% one (91.44 against 91.48), inside one
# run's noise, while each joint step costs ~2.6 plain steps and a frozen one ~0.7: the short
# search saves ~0.25 plain epochs, which come off the baselines' compute budget. S2HPruner
# keeps lr 0.03 (validation's choice in both group profiles); the baselines search their grids
# again (deterministic: the same choice as from-trained-group-aligned).
# S2HPruner's short recipe (round 23): lr 0.03, the 15% search, the hard network alone after it
SHORT_RECIPE = {"lr": (0.03,), "freeze_teacher": ("none",), "freeze": (0.85,)}
FROM_TRAINED_GROUP_ALIGNED_SHORT = dataclasses.replace(
    FROM_TRAINED_GROUP_ALIGNED, name="from-trained-group-aligned-short",
    search={**FROM_TRAINED_GROUP_ALIGNED.search,
            "s2h": _grid(**SHORT_RECIPE)},
)

# The short profile at 0.15 alone, every method searched on validation at 0.15 itself (the
# other from-trained profiles search at 0.35 and reuse the choice): S2HPruner's candidates are
# the short search as it is and with a slower descent to the budget (RunConfig.descent: the
# search's aim falls linearly from the full model over 80% of the search, ~51 steps where it
# reaches the budget by itself in ~37). Round 24's probes (seed 0, validation): the descent
# helped at 0.15 (90.00 against 89.62; seeds 1, 2: +0.02, +0.10) and not at 0.35 (-0.18) or
# 0.55 (-0.16); over 80% of a 30% search (~103 steps) it cost 0.54-0.56 at 0.15 and 0.35.
FROM_TRAINED_DESCENT = dataclasses.replace(
    FROM_TRAINED_GROUP_ALIGNED_SHORT, name="from-trained-descent", targets=(0.15,),
    tune_targets=(0.15,),
    search={**FROM_TRAINED_GROUP_ALIGNED_SHORT.search,
            "s2h": _grid(**SHORT_RECIPE, descent=(0.0, 0.8))},
)

# The same at 0.55 alone: round 24 left 0.55's baselines searched at 0.35 only, and at 0.15,
# searched at their own target, the strongest baseline got stronger (global L1 over uniform).
# Here every method searches its grid at 0.55; S2HPruner's candidates are the descent
# profile's (the descent cost 0.16 on validation at 0.55 in round 24's probe, seed 0).
FROM_TRAINED_SEARCHED_055 = dataclasses.replace(
    FROM_TRAINED_DESCENT, name="from-trained-searched-055", targets=(0.55,),
    tune_targets=(0.55,),
)

# The same with the width step searched as well: the profiles align S2HPruner's widths to
# multiples of 8 (a cheaper step on AVX-512, rounds 19-20), but resnet20's first stage has 16
# channels, so its residual stream can keep 8 or 16 and nothing between: every seed of
# from-trained-searched-055 kept 8, where global and uniform L1 keep 11 and 12. Round 26's
# probes (seed 0, validation): round_to 4 (the stream kept 12) 92.02 against 91.78 with 8.
# S2HPruner's candidates: its recipe at round_to 8 and 4; the baselines search as before.
# Validation chose 4; S2HPruner's validation top-1 rose, its test top-1 did not (round 26).
FROM_TRAINED_WIDTH_STEP_055 = dataclasses.replace(
    FROM_TRAINED_SEARCHED_055, name="from-trained-width-step-055",
    search={**FROM_TRAINED_SEARCHED_055.search,
            "s2h": _grid(**SHORT_RECIPE, round_to=(8, 4))},
)

# The same at 0.15 (every method searched at 0.15, as in from-trained-descent): there global
# and uniform L1 keep 5-6 channels of that stream, and multiples of 8 allow no fewer than 8.
# S2HPruner's candidates: the descent profile's two (without and with the descent) at each
# step. Round 26's probe (seed 0, validation, with the descent): 89.98 at 4 against 89.84.
# Validation kept 8 with the descent (90.00 against 89.98): from-trained-descent's recipe.
FROM_TRAINED_WIDTH_STEP_015 = dataclasses.replace(
    FROM_TRAINED_DESCENT, name="from-trained-width-step-015",
    search={**FROM_TRAINED_DESCENT.search,
            "s2h": _grid(**SHORT_RECIPE, descent=(0.0, 0.8), round_to=(8, 4))},
)

# resnet56 from its own trained checkpoint with resnet20's strongest recipe at 0.35
# (from-trained-group-aligned-short: the group's ranking, aligned widths, the short search, the
# last phase on the pruned network). from-trained-resnet56 ran S2HPruner's round-11 recipe
# (1.62 plain epochs), with every method's choice carried over from resnet20. Here every method
# searches its grid on resnet56's validation split; S2HPruner's candidates are its short recipe
# at round_to 8 and 4 (resnet56's first stage has 16 channels too, as in round 26). group-sl
# is left out: it was the weakest method on every resnet20 profile and 32.9% on resnet56.
FROM_TRAINED_RESNET56_SHORT = dataclasses.replace(
    FROM_TRAINED_GROUP_ALIGNED_SHORT, name="from-trained-resnet56-short", model="resnet56",
    targets=(0.35,), tune_targets=(0.35,), seeds=(0, 1, 2, 3, 4),
    methods=("s2h", "l1-ft", "random"), compute_methods=("l1-ft", "random"),
    init=CHECKPOINT_RESNET56, pretrain_command=FROM_TRAINED_RESNET56.pretrain_command,
    search={"s2h": FROM_TRAINED_WIDTH_STEP_055.search["s2h"],
            **{m: FROM_TRAINED.search[m] for m in ("l1-ft", "random")}},
    borrow={},
)

# The same resnet56 checkpoint at 0.15, the one target where S2HPruner leads on resnet20
# (from-trained-descent): does that lead hold on a deeper network? Every method searches its
# grid on validation at 0.15 itself. S2HPruner's candidates are resnet20's 0.15 recipe (the
# short search with the slower descent, validation's choice there) at width steps 8 and 4:
# two candidates against l1-ft's four, so the search favours the baseline if anything.
# Round 30, five seeds: +1.05 ± 0.21 against global L1, ahead on every seed.
FROM_TRAINED_RESNET56_015 = dataclasses.replace(
    FROM_TRAINED_RESNET56_SHORT, name="from-trained-resnet56-015", targets=(0.15,),
    tune_targets=(0.15,),
    search={**FROM_TRAINED_RESNET56_SHORT.search,
            "s2h": _grid(**SHORT_RECIPE, descent=(0.8,), round_to=(8, 4))},
)

# from-trained-descent and from-trained-resnet56-015 with iterative L1 as well: S2HPruner's
# candidates there include its slower descent (validation chose it on both), a gradual schedule
# L1 did not have. Here l1-ft also searches torch-pruning's iterative schedule: 5 steps over
# the first 12% of the fine-tuning (0.8 of S2HPruner's 15% search, the share its descent spans),
# at both allocations and learning rates. Everything else is the base profile's, so the runs
# of the other methods are taken from its file (`--reuse-from`) and only l1-ft runs again.
ITERATIVE_L1 = _grid(lr=FINE_TUNE_LRS, l1_global=(True, False), l1_steps=(5,),
                     l1_descent=(0.12,))  # fmt: skip
FROM_TRAINED_ITERATIVE_015 = dataclasses.replace(
    FROM_TRAINED_DESCENT, name="from-trained-iterative-015",
    search={**FROM_TRAINED_DESCENT.search,
            "l1-ft": (*FROM_TRAINED_DESCENT.search["l1-ft"], *ITERATIVE_L1)},
)
FROM_TRAINED_RESNET56_ITERATIVE_015 = dataclasses.replace(
    FROM_TRAINED_RESNET56_015, name="from-trained-resnet56-iterative-015",
    search={**FROM_TRAINED_RESNET56_015.search,
            "l1-ft": (*FROM_TRAINED_RESNET56_015.search["l1-ft"], *ITERATIVE_L1)},
)

# The same resnet56 checkpoint at 0.55, the target where S2HPruner trails on resnet20
# (from-trained-width-step-055: -0.16 ± 0.05): does the deeper network show the same gap?
# Every method searches its grid on validation at 0.55 itself; S2HPruner's candidates are
# resnet20's 0.55 recipe (the short search without the descent, which cost 0.16 there) at
# width steps 8 and 4, as in from-trained-resnet56-short. Validation chose 8 (90.36 against
# 90.24); over five seeds the two methods tie (round 30: +0.05 ± 0.10 against global L1).
FROM_TRAINED_RESNET56_055 = dataclasses.replace(
    FROM_TRAINED_RESNET56_SHORT, name="from-trained-resnet56-055", targets=(0.55,),
    tune_targets=(0.55,),
)

# The same at 0.55 with the first stage's residual stream kept whole by every method alike.
# Round 30: two of five seeds' searches cut the stem's group (conv1 and the first stage's
# block outputs, 16 channels at the highest resolution) to 8, and scored ~0.4 below the seeds
# that kept 16; rerun with `ignored_layers: [conv1]` both scored as those (a probe on seeds
# picked by their scores, without the baselines). Here S2HPruner and L1 + fine-tune both keep
# the stream (torch-pruning's groups skip it as S2HPruner's search does), each at the learning
# rate and width step its search chose in from-trained-resnet56-055; l1-ft still searches its
# allocation (global or uniform). Fixed rather than searched: at the search seed (0) S2HPruner
# kept the stream by itself, so a candidate there would be decided by noise. Random widths,
# behind both in from-trained-resnet56-055, are left out. Rounds 31-32, seeds 0-4: both
# methods gain 0.2-0.3 over that profile and stay level (-0.05 ± 0.09 against uniform L1).
KEEP_STEM = (["conv1"],)
FROM_TRAINED_RESNET56_055_STEM = dataclasses.replace(
    FROM_TRAINED_RESNET56_055, name="from-trained-resnet56-055-stem",
    methods=("s2h", "l1-ft"), compute_methods=("l1-ft",),
    search={"s2h": _grid(**SHORT_RECIPE, round_to=(8,), ignored_layers=KEEP_STEM),
            "l1-ft": _grid(lr=(0.03,), l1_global=(True, False), ignored_layers=KEEP_STEM)},
)

# Rounds 6-34 priced every step of a single-network method as a step of the full model (the
# compute budget's epochs counted full-model epochs), while S2HPruner's last phase on its
# pruned network was priced at that network's measured cost (about 0.5 of a full step at
# 0.15, 0.7 at 0.35 on this CPU): the baselines got less wall time than S2HPruner wherever
# their pruned network is cheaper to train (measured in round 35: torch-pruning's unaligned L1
# networks train at 1.0-1.4 full-model steps here, so they had got more). These profiles
# price both sides alike (compute_pricing "own-steps": equal wall time); everything else is
# the base profile's, whose S2HPruner runs, searches and compute ratios they take over
# (--reuse-from): only the baselines' compute runs run again.
OWN_STEPS_BASES = (FROM_TRAINED_ITERATIVE_015, FROM_TRAINED_GROUP_ALIGNED_SHORT,
                   FROM_TRAINED_WIDTH_STEP_055, FROM_TRAINED_RESNET56_ITERATIVE_015,
                   FROM_TRAINED_RESNET56_SHORT, FROM_TRAINED_RESNET56_055)  # fmt: skip
OWN_STEPS = {f"{base.name}-own-steps": dataclasses.replace(
    base, name=f"{base.name}-own-steps", compute_pricing="own-steps") for base in OWN_STEPS_BASES}

# The same at 0.35 with L1's widths aligned as S2HPruner's are (torch-pruning's round_to 8,
# both allocations and learning rates searched again): priced by its own steps, an unaligned
# pruned resnet20 trains slower here than the full model (round 35: 1.2 full-model steps at
# 0.35), an aligned one faster, so alignment is part of a baseline at its best.
FROM_TRAINED_OWN_STEPS_ALIGNED_L1 = dataclasses.replace(
    OWN_STEPS["from-trained-group-aligned-short-own-steps"],
    name="from-trained-group-aligned-short-own-steps-aligned-l1",
    search={**FROM_TRAINED_GROUP_ALIGNED_SHORT.search,
            "l1-ft": _grid(lr=FINE_TUNE_LRS, l1_global=(True, False), l1_round_to=(8,))},
)


def _aligned(grid: tuple[dict, ...]) -> tuple[dict, ...]:
    """``grid`` with L1's widths in multiples of 8 (torch-pruning's round_to)."""
    return tuple({**candidate, "l1_round_to": 8} for candidate in grid)


# The aligned option at 0.15 and 0.55 too (round 36; a review: unaligned L1 at 0.55 trains at
# 1.3-1.4 full-model steps, so under own-step pricing only 0.35 gave L1 its best form): each
# base's own L1 grid (at 0.15 with the iterative pruning validation chose there), every width
# a multiple of 8, searched again on validation at the target; S2HPruner's runs are reused.
# Round 37: the same on resnet56 at 0.35 and 0.55, whose unaligned L1 networks train at
# 1.24-1.35 full-model steps here (round 36), so at equal wall time get 0.87-1.03 epochs.
ALIGNED_L1 = {
    f"{name}-aligned-l1": dataclasses.replace(
        OWN_STEPS[name], name=f"{name}-aligned-l1",
        search={**OWN_STEPS[name].search, "l1-ft": _aligned(OWN_STEPS[name].search["l1-ft"])})
    for name in ("from-trained-iterative-015-own-steps", "from-trained-width-step-055-own-steps",
                 "from-trained-resnet56-short-own-steps", "from-trained-resnet56-055-own-steps")
}  # fmt: skip

# Round 39, on another machine (an AMD EPYC; rounds 14-38 ran on an Intel Xeon, whose
# checkpoint file, step timings and prices these cannot share): the three own-steps cells of
# resnet20 again, each method at the recipe validation chose for it on the Xeon against the
# strongest other method there (no search here: one candidate each, so neither side is tuned
# to this machine), seeds 0-2 (round 39 added seed 3 on the base budgets: --seeds 3 --budgets
# epochs,compute); at 0.35 and 0.15 also the longer budget (three times the epochs,
# and three times S2HPruner's measured cost for the compute budget) under own-step pricing,
# which round 20's long runs predate.
S2H_SHORT = _grid(**SHORT_RECIPE)[0]  # its one candidate
REPLICATE = {
    f"from-trained-replicate-{target * 100:03.0f}": dataclasses.replace(
        base, name=f"from-trained-replicate-{target * 100:03.0f}", targets=(target,),
        tune_targets=(target,), seeds=(0, 1, 2), methods=("s2h", "l1-ft"),
        compute_methods=("l1-ft",), search={"s2h": (s2h,), "l1-ft": (l1,)}, borrow={},
        budgets=BUDGETS, long_targets=long, long_methods=("s2h", "l1-ft"))
    for target, base, s2h, l1, long in (
        (0.15, OWN_STEPS["from-trained-iterative-015-own-steps"], {**S2H_SHORT, "descent": 0.8},
         {"lr": 0.03, "l1_global": False, "l1_steps": 5, "l1_descent": 0.12}, (0.15,)),
        (0.35, FROM_TRAINED_OWN_STEPS_ALIGNED_L1, S2H_SHORT,
         {"lr": 0.03, "l1_global": True, "l1_round_to": 8}, (0.35,)),
        (0.55, OWN_STEPS["from-trained-width-step-055-own-steps"], {**S2H_SHORT, "round_to": 4},
         {"lr": 0.03, "l1_global": True}, ()))
}  # fmt: skip

# Round 40: from-trained-replicate-035's L1 exported 0.370 of the FLOPs, 0.02 over the budget
# (global pruning with round_to 8 on this machine's checkpoint jumps from 0.328 to 0.370 at the
# target; the SPEC's budget is met within 0.01). Here L1 keeps the closest ratio within 0.01
# above the target (BaselineOptions.flops_ceiling), and since that costs the aligned form FLOPs,
# validation (seed 0) also offers it unaligned (global L1 lands on the target there, but its
# network trains slower per FLOP). S2HPruner's runs and compute ratios are reused
# (--reuse-from from_trained_replicate_035.json): only the search of l1-ft differs.
# Validation chose the unaligned form (91.30 against 90.18); seeds 0-3: -0.63 ± 0.18.
_R035 = REPLICATE["from-trained-replicate-035"]
REPLICATE_035_CEILING = dataclasses.replace(
    _R035, name="from-trained-replicate-035-ceiling",
    search={**_R035.search, "l1-ft": ({**_R035.search["l1-ft"][0], "flops_ceiling": 0.01},
                                      {"lr": 0.03, "l1_global": True})},
)

# The same with S2HPruner's width step searched as well: in multiples of 8 (the replicate's
# recipe) resnet20's 16-channel first stage keeps 8 or 16 channels, and S2HPruner kept 8 on
# every seed, where unaligned global L1 keeps 11 of them. Candidates on validation (seed 0):
# round_to 8 and 4, as searched at 0.55 (from-trained-width-step-055). The baselines' runs on
# the budgets S2HPruner's recipe does not size are reused (--reuse-from the ceiling profile's
# file); its compute runs run again at the new compute ratios. Validation chose 4 (by 0.02).
# With it S2HPruner still kept 8 of the first stage but 20 of the second stage's 32 (16 or 24
# in multiples of 8; L1: 19); seeds 0-3: +0.02 ± 0.05 at equal epochs, -0.26 ± 0.06 at equal
# wall time (MEASUREMENTS, round 40).
REPLICATE_035_WIDTH_STEP = dataclasses.replace(
    REPLICATE_035_CEILING, name="from-trained-replicate-035-width-step",
    search={**REPLICATE_035_CEILING.search, "s2h": (S2H_SHORT, {**S2H_SHORT, "round_to": 4})},
)

# Round 41: the replicate's cells with every timing of the compute budget in a fresh process
# (timing_process "fresh"). Rounds 39-40 timed S2HPruner's step in the benchmark's process
# after its run, whose report had pinned the allocator (a pruned network trains at another
# speed there: MEASUREMENTS, round 41), and the baselines' prices sometimes there, sometimes in
# a fresh process. Everything else is the base profile's, whose runs are reused
# (--reuse-from): only the compute ratios and the baselines' compute runs are made again.
FRESH_BASES = (REPLICATE["from-trained-replicate-015"], REPLICATE_035_WIDTH_STEP,
               REPLICATE["from-trained-replicate-055"])  # fmt: skip
FRESH = {f"from-trained-replicate-{base.targets[0] * 100:03.0f}-fresh": dataclasses.replace(
    base, name=f"from-trained-replicate-{base.targets[0] * 100:03.0f}-fresh",
    timing_process="fresh") for base in FRESH_BASES}  # fmt: skip

PROFILES = {
    # ~1 h on a 2-core CPU: s2h ~4.5 min/epoch, a plain epoch ~1.5-2 min
    "quick": Profile("quick", epochs=3.0),
    "full": Profile(
        "full",
        targets=(0.15, 0.35, 0.55),
        methods=ALL_METHODS,
        compute_methods=BASELINES,
        seeds=(0, 1),
        epochs=8.0,
    ),
    "from-trained": FROM_TRAINED,
    "from-trained-resnet56": FROM_TRAINED_RESNET56,
    "from-trained-cheap": FROM_TRAINED_CHEAP,
    "from-trained-cheap-timed": FROM_TRAINED_CHEAP_TIMED,
    "from-trained-all": FROM_TRAINED_ALL,
    "from-trained-aligned": FROM_TRAINED_ALIGNED,
    "from-trained-pruned": FROM_TRAINED_PRUNED,
    "from-trained-aligned-pruned": FROM_TRAINED_ALIGNED_PRUNED,
    "from-trained-uniform-start": FROM_TRAINED_UNIFORM_START,
    "from-trained-group-importance": FROM_TRAINED_GROUP_IMPORTANCE,
    "from-trained-group-aligned": FROM_TRAINED_GROUP_ALIGNED,
    "from-trained-group-aligned-short": FROM_TRAINED_GROUP_ALIGNED_SHORT,
    "from-trained-descent": FROM_TRAINED_DESCENT,
    "from-trained-searched-055": FROM_TRAINED_SEARCHED_055,
    "from-trained-width-step-055": FROM_TRAINED_WIDTH_STEP_055,
    "from-trained-width-step-015": FROM_TRAINED_WIDTH_STEP_015,
    "from-trained-resnet56-short": FROM_TRAINED_RESNET56_SHORT,
    "from-trained-resnet56-015": FROM_TRAINED_RESNET56_015,
    "from-trained-iterative-015": FROM_TRAINED_ITERATIVE_015,
    "from-trained-resnet56-iterative-015": FROM_TRAINED_RESNET56_ITERATIVE_015,
    "from-trained-resnet56-055": FROM_TRAINED_RESNET56_055,
    "from-trained-resnet56-055-stem": FROM_TRAINED_RESNET56_055_STEM,
    **OWN_STEPS,
    "from-trained-group-aligned-short-own-steps-aligned-l1": FROM_TRAINED_OWN_STEPS_ALIGNED_L1,
    **ALIGNED_L1,
    **REPLICATE,
    "from-trained-replicate-035-ceiling": REPLICATE_035_CEILING,
    "from-trained-replicate-035-width-step": REPLICATE_035_WIDTH_STEP,
    **FRESH,
}


@dataclass(frozen=True)
class RunSpec:
    """One planned run; ``key`` identifies it in the JSON."""

    method: str
    target: float
    seed: int
    budget: str

    @property
    def key(self) -> tuple:
        return (self.method, round(self.target, 6), self.seed, self.budget)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.budget}-t{self.target:g}-s{self.seed}"


def run_key(record: dict) -> tuple:
    return (record["method"], round(record["target_flops"], 6), record["seed"], record["budget"])


def _at(target: float, targets: tuple[float, ...]) -> bool:
    return any(abs(target - t) < 1e-9 for t in targets)


def plan_runs(profile: Profile) -> list[RunSpec]:
    """Per seed and target: every method on the epochs budget, then the compute-matched runs
    (which need that seed's and target's S2HPruner and plain timings), then the long budgets.
    Seeds run in order, so the search seed's choices exist before the other seeds reuse them."""
    plan = []
    for seed in profile.seeds:
        for target in sorted(profile.targets, key=lambda t: not tuned(t, profile)):
            limit = next((v for k, v in profile.seed_limits.items() if _at(target, (k,))), None)
            if limit is not None and seed not in limit:
                continue
            methods = [
                m for m in profile.methods if m not in profile.only_at
                or _at(target, profile.only_at[m])
            ]  # fmt: skip
            single = [m for m in profile.compute_methods if m in methods]
            long = _at(target, profile.long_targets)
            runs = {
                "epochs": methods,
                "compute": single,
                "long": [m for m in methods if m in profile.long_methods] if long else [],
                "long-compute": [m for m in single if m in profile.long_methods] if long else [],
            }
            for budget in BUDGETS:
                if budget in profile.budgets:
                    plan += [RunSpec(m, target, seed, budget) for m in runs[budget]]
    return plan


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def settings(profile: Profile) -> dict:
    """The fields that change results, as stored (JSON types) in the benchmark file; with a
    starting checkpoint, also its sha256 (a resumed benchmark must start from the same one)."""
    values = {k: getattr(profile, k) for k in RESULT_FIELDS}
    values["options"] = dataclasses.asdict(profile.options)
    if profile.init is not None:
        values["init_sha256"] = file_sha256(profile.init)
    return json.loads(json.dumps(values))


def stored_settings(stored: dict) -> dict:
    """A stored file's settings, with the values that fields added later had before."""
    defaults = settings(Profile("defaults"))
    values = {k: stored.get(k, defaults[k]) for k in LATER_FIELDS}
    options = {**defaults["options"], **stored.get("options", {})}
    return {**stored, **values, "options": options}


def run_config(
    profile: Profile, spec: RunSpec, epochs: float, run_dir: Path, hyper: dict | None = None
) -> RunConfig:
    """One RunConfig for every method: the baselines read their recipe from it too. ``hyper``:
    a search candidate's RunConfig values (a ``freeze`` fraction drops ``freeze_epochs``)."""
    cfg = RunConfig(
        model=profile.model,
        model_kwargs=dict(profile.model_kwargs),
        round_to=profile.round_to if spec.method in METHODS else None,
        prune_at_freeze=profile.prune_at_freeze and spec.method in METHODS,
        search_start=profile.search_start if spec.method in METHODS else "full",
        importance=profile.importance if spec.method in METHODS else "producers",
        dataset=profile.dataset,
        data_root=profile.data_root,
        init=profile.init,
        target_flops=spec.target,
        method=spec.method,
        epochs=epochs,
        freeze=profile.freeze,
        freeze_epochs=profile.freeze_epochs,  # absolute: overrides the fraction cfg.freeze
        # the sliced hard pass in the fastest memory layout, timed at every epoch's start, as
        # the benchmark has always run it (the run's default is now "model": reproducible bit
        # for bit, but it can be slower); S2HPruner's seconds per epoch set the compute budget
        hard_layout="auto",
        batch_size=profile.batch_size,
        val_size=profile.val_size,
        train_subset=profile.train_subset,
        lr=profile.lr,
        seed=spec.seed,
        split_seed=profile.split_seed,
        out=str(run_dir),
        latency_repeats=profile.latency_repeats,
        # a "same" profile's timings ran after runs whose reports timed in this process (and so
        # held its allocator: round 41); its runs keep doing that, so that resuming one of its
        # stored files times in the state the file was timed in
        latency_process="same" if profile.timing_process == "same" else "fresh",
        progress=profile.progress,
    )
    values = {k: v for k, v in (hyper or {}).items() if k in RUN_HYPER}
    if "ignored_layers" in values:  # a list, as a run's config.yaml (and its resume) has it
        values["ignored_layers"] = list(values["ignored_layers"])
    if "freeze" in values and "freeze_epochs" not in values:
        values["freeze_epochs"] = None
    return dataclasses.replace(cfg, **values)


def run_options(profile: Profile, hyper: dict | None = None) -> BaselineOptions:
    """The profile's baseline options with a search candidate's values."""
    values = {k: v for k, v in (hyper or {}).items() if k in OPTION_HYPER}
    return dataclasses.replace(profile.options, **values)


def candidate_name(hyper: dict) -> str:
    """A candidate's folder name and label, e.g. ``lr0.02-freeze0.4`` or ``lr0.01-uniform``."""
    parts = []
    for key, value in hyper.items():
        if key == "l1_global":
            parts.append("global" if value else "uniform")
        elif key == "freeze_teacher":
            parts.append(f"teacher-{value}")
        elif key == "ignored_layers":
            parts.append("keep-" + "+".join(value) if value else "keep-none")
        elif isinstance(value, bool):
            parts.append(key if value else f"no-{key}")
        elif isinstance(value, int | float):
            parts.append(f"{key}{value:g}")
        else:
            parts.append(f"{key}{value}")
    return "-".join(parts) or "base"


# ----------------------------------------------------------------------------- storage


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The code a run ran with: commit, whether src/ or benchmarks/ had changes not in it,
    and torch's version (a resumed benchmark can hold runs of several)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=30, check=True)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    # the code only: results and notes under benchmarks/ change as a benchmark runs
    changes = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks/*.py")
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": None if changes is None else bool(changes), "torch": torch.__version__}


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(pick_device("auto")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", "unknown"),
    }


def write_json(path: Path, data: dict) -> None:
    """The whole file, via a temporary file and a rename: a crash never leaves half a JSON."""
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def checkpoint_record(profile: Profile) -> dict:
    """The starting checkpoint: path, sha256, and its validation (the search seed's split) and
    test top-1, measured once here; ``benchmarks.pretrain``'s own record too, if beside it."""
    assert profile.init is not None
    spec = RunSpec("l1-ft", profile.targets[0], profile.tune_seed, "epochs")
    cfg = run_config(profile, spec, profile.epochs, Path("unused"))
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    splits = build_splits(cfg, augment=False)
    model = build_model(cfg, splits.spec, device).eval()  # the runs' own builder, with init

    def top1(dataset, desc: str) -> float:
        loader = eval_loader(dataset, cfg.eval_batch_size, cfg.workers)
        return evaluate(model, loader, device, progress=cfg.progress, desc=desc)

    record = {
        "path": profile.init,
        "sha256": file_sha256(profile.init),
        "val_top1": top1(splits.val, "checkpoint val"),
        "test_top1": top1(splits.test, "checkpoint test"),
        "val_split_seed": profile.tune_seed,
        "pretrain_command": profile.pretrain_command,
        "pretrain": None,
    }
    made = Path(profile.init).with_suffix(".json")
    if made.is_file():
        record["pretrain"] = json.loads(made.read_text())
        stored = record["pretrain"].get("val_top1")
        if stored is not None and abs(stored - record["val_top1"]) > 0.5:
            tqdm.write(
                f"warning: {profile.init} scored {stored:.2f}% on validation when it was made "
                f"and {record['val_top1']:.2f}% on this benchmark's: the splits may differ, so "
                "the checkpoint may have trained on validation images"
            )
    return record


def reuse_runs(results: dict, source: Path) -> None:
    """Copy into a new benchmark the runs, search candidates and compute ratios of another
    profile's file ``source`` that this profile would run the same way: every setting must
    match but ``search``; a method searched over other candidates (or borrowing such a
    method's choice) runs again, keeping only its finished candidates that are still offered.
    So a profile that only widens one method's search does not spend hours repeating runs."""
    stored = json.loads(source.read_text())
    mine, theirs = results["settings"], stored_settings(stored.get("settings", {}))
    free = ("search", "compute_pricing", "timing_process")
    diff = [k for k in mine if k not in free and theirs.get(k) != mine[k]]
    if diff:
        raise SystemExit(f"--reuse-from: {source} was made with other settings ({', '.join(diff)}"
                         "); only the search, the compute pricing and the timing process may "
                         "differ")  # fmt: skip

    def same(method: str) -> bool:
        chooser = mine["borrow"].get(method, method)
        return all(mine["search"].get(m) == theirs["search"].get(m) for m in {method, chooser})

    # a compute budget is sized by the ratio, timed with S2HPruner's chosen recipe, and by
    # the pricing of the baselines' steps (S2HPruner's own compute runs do not depend on it)
    timing_alike = theirs["timing_process"] == mine["timing_process"]
    timed_alike = same("s2h") and timing_alike
    priced_alike = theirs.get("compute_pricing") == mine["compute_pricing"] and timing_alike

    def kept(method: str, budget: str) -> bool:
        if budget not in COMPUTE:
            return True
        return timed_alike and (priced_alike or method not in BASELINES)

    results["runs"] = [r for r in stored.get("runs", []) if same(r["method"])
                       and kept(r["method"], r["budget"])]  # fmt: skip
    # a method searched over other candidates chooses again among them: no stored choice
    results["tuning"] = [{**t, "chosen": bool(t.get("chosen")) and same(t["method"])}
                         for t in stored.get("tuning", [])
                         if t["hyper"] in mine["search"].get(t["method"], [])  # fmt: skip
                         and kept(t["method"], t["budget"])]
    if timed_alike:
        results["compute_ratios"] = dict(stored.get("compute_ratios", {}))
    methods = sorted({r["method"] for r in results["runs"]})
    results["reused_from"] = {"file": str(source), "methods": methods}
    print(f"--reuse-from {source}: {len(results['runs'])} runs of {', '.join(methods)} copied")


def open_results(
    path: Path,
    profile: Profile,
    command: str,
    resume: bool,
    overwrite: bool,
    reuse: Path | None = None,
):
    """The stored benchmark when resuming (checked to have the same settings), else a new one
    (with ``reuse``, seeded by :func:`reuse_runs`)."""
    if reuse is not None and path.exists() and not overwrite:
        raise SystemExit(f"--reuse-from seeds a new benchmark, but {path} exists; drop "
                         "--reuse-from to resume it, or pass --overwrite")  # fmt: skip
    if path.exists() and not overwrite:
        if not resume:
            raise SystemExit(
                f"{path} already holds a benchmark; pass --resume to continue it or "
                "--overwrite to start again"
            )
        results = json.loads(path.read_text())
        stored, current = stored_settings(results.get("settings", {})), settings(profile)
        diff = [k for k in current if stored.get(k) != current[k]]
        if diff:
            details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {current[k]!r}" for k in diff)
            raise SystemExit(
                f"--resume: {path} was made with other settings ({details}); use the same "
                "flags, another --out, or --overwrite"
            )
        results.setdefault("tuning", [])
        if profile.init is not None and "checkpoint" not in results:
            results["checkpoint"] = checkpoint_record(profile)
            write_json(path, results)
        return results
    # a new benchmark: the run folders of one made before must not be resumed as its runs
    # (an S2HPruner run resumes any checkpoint in its folder); kept aside, not deleted
    runs = path.parent / "runs" / profile.name
    if runs.exists():  # a name of its own each time: an earlier set-aside folder stays too
        stamp, n = time.strftime("%Y%m%dT%H%M%S"), 0
        aside = runs.with_name(f"{profile.name}.replaced-{stamp}")
        while aside.exists():
            n += 1
            aside = runs.with_name(f"{profile.name}.replaced-{stamp}-{n}")
        runs.rename(aside)
        print(f"{runs} holds the runs of an earlier benchmark: moved to {aside}")
    results = {
        "profile": profile.name,
        "command": command,
        "resumed_by": [],
        "machine": machine_info(),
        "settings": settings(profile),
        "compute_ratios": {},
        "runs": [],
        "tuning": [],
    }
    if reuse is not None:
        reuse_runs(results, reuse)
    if profile.init is not None:
        results["checkpoint"] = checkpoint_record(profile)
    write_json(path, results)
    return results


# ----------------------------------------------------------------------------- runs


def compute_ratio(
    results: dict,
    target: float,
    seed: int,
    timer: Callable[[], dict] | None = None,
    side_by_side: Callable[[dict], dict] | None = None,
) -> dict | None:
    """S2HPruner seconds per epoch over plain seconds per epoch of the full model, from this
    benchmark's epochs-budget runs of the same target and seed (stored once, then reused).
    Without an l1/l1-ft run that trained the full model, ``timer`` times it (if given).
    ``side_by_side(s2h_record)``: both timed in turns in one process instead."""
    key = f"t{target:g}-s{seed}"
    if key in results["compute_ratios"]:
        return results["compute_ratios"][key]

    def find(method: str) -> dict | None:
        spec = RunSpec(method, target, seed, "epochs")
        return next((r for r in results["runs"] if run_key(r) == spec.key), None)

    s2h = find("s2h")
    if s2h is None:
        return None
    if side_by_side is not None:  # the run's recipe (its chosen candidate), timed again
        results["compute_ratios"][key] = side_by_side(s2h)
        return results["compute_ratios"][key]
    plain = next(
        (r for r in map(find, ("l1", "l1-ft")) if r and r.get("dense_seconds_per_epoch")), None
    )
    if plain is None and timer is not None:
        plain = {**timer(), "method": "full model timed"}
    if plain is None:
        return None
    ratio = {
        "ratio": s2h["train_seconds_per_epoch"] / plain["dense_seconds_per_epoch"],
        "s2h_seconds_per_epoch": s2h["train_seconds_per_epoch"],
        "plain_seconds_per_epoch": plain["dense_seconds_per_epoch"],
        "plain_method": plain["method"],
    }
    if "timed_steps" in plain:
        ratio["plain_timed_steps"] = plain["timed_steps"]
    results["compute_ratios"][key] = ratio
    return ratio


def prune_record(cfg: RunConfig, resume: bool) -> dict:
    """An S2HPruner-family run through ``s2hpruner.app.run.prune``, resuming its checkpoint."""
    cfg.resume = resume and (Path(cfg.out) / "checkpoints" / "last.pt").exists()
    cfg.overwrite = True
    report = prune(cfg)
    lines = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    keep = (
        "method",
        "model",
        "dataset",
        "init",
        "target_flops",
        "epochs",
        "top1_hard",
        "top1_soft",
        "gap",
        "flops_ratio",
        "params_ratio",
        "predicted_flops_ratio",
        "top1_start_val",
        "budget_projection_steps",
        "budget_met_step",
        "joint_phase_steps",
        "latency_speedup_b1",
        "latency_speedup_b64",
        "train_seconds",
        "train_seconds_per_epoch",
        "flops_full",
        "flops_pruned",
        "params_full",
        "params_pruned",
    )
    record = {k: report[k] for k in keep if k in report}
    record.update(
        seed=cfg.seed,
        val_top1=last.get("val_top1_hard"),
        val_top1_soft=last.get("val_top1_soft"),
        kept_widths=report.get("kept_widths"),
    )
    return record


def budget_epochs(
    spec: RunSpec, profile: Profile, results: dict, out: Path
) -> tuple[float, dict] | None:
    """(epochs, extra record fields) of a run's budget; None when a compute-matched run cannot
    be matched yet."""
    epochs = profile.epochs * (profile.long_factor if spec.budget in LONG else 1.0)
    if spec.budget not in COMPUTE:
        return epochs, {}

    def timed(fn: Callable[..., dict], *args, **kwargs) -> dict:
        """``fn``'s timing where the profile times: here, or in a fresh process."""
        if profile.timing_process == "fresh":
            return in_fresh_process(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def timer() -> dict:
        cfg = run_config(profile, RunSpec("l1-ft", spec.target, spec.seed, "epochs"),
                         profile.epochs, out / "runs" / profile.name / "timing")  # fmt: skip
        return timed(time_dense, cfg, profile.dense_timing_steps)

    def side_by_side(s2h: dict) -> dict:
        cfg = run_config(profile, RunSpec("s2h", spec.target, spec.seed, "epochs"),
                         profile.epochs, out / "runs" / profile.name / "timing",
                         s2h.get("hyper"))  # fmt: skip
        tqdm.write(f"timing {cfg.method} against a plain step, side by side "
                   f"({profile.compute_timing_turns} turns per phase)")  # fmt: skip
        return timed(time_side_by_side, cfg, turns=profile.compute_timing_turns)

    ratio = compute_ratio(
        results,
        spec.target,
        spec.seed,
        timer if profile.dense_timing_steps > 0 else None,
        side_by_side if profile.compute_timing_turns > 0 else None,
    )
    if ratio is None:
        tqdm.write(
            f"skip {spec.name}: the compute budget needs this target's and seed's s2h run "
            "and an l1 or l1-ft run (for plain seconds per epoch) on the epochs budget"
        )
        return None
    return round(epochs * ratio["ratio"], 2), {"compute_ratio": ratio["ratio"]}


def tuned(target: float, profile: Profile) -> bool:
    """Whether the search runs at ``target`` (every target when ``tune_targets`` is empty)."""
    return not profile.tune_targets or _at(target, profile.tune_targets)


def search_candidates(spec: RunSpec, profile: Profile) -> tuple[dict, ...]:
    """The candidates searched for this run (none: it uses a stored choice or the base)."""
    if spec.seed != profile.tune_seed or spec.budget not in profile.tune_budgets:
        return ()
    if not tuned(spec.target, profile):
        return ()
    return tuple(profile.search.get(spec.method, ()))


def choice_source(spec: RunSpec, profile: Profile) -> RunSpec | None:
    """The searched run whose choice this run reuses (None: the profile's base recipe): the
    same (or borrowed) method at the search seed and the nearest searched target, on the same
    budget or, for a long one, the budget it lengthens."""
    method = profile.borrow.get(spec.method, spec.method)
    if method not in profile.search or not profile.tune_budgets:
        return None
    budget = spec.budget if spec.budget in profile.tune_budgets else LONG.get(spec.budget)
    if budget not in profile.tune_budgets:
        budget = "epochs" if "epochs" in profile.tune_budgets else profile.tune_budgets[0]
    target = spec.target
    if not tuned(target, profile):
        target = min(profile.tune_targets, key=lambda t: abs(t - spec.target))
    return RunSpec(method, target, profile.tune_seed, budget)


def chosen(results: dict, source: RunSpec) -> dict | None:
    """The chosen candidate of a finished search, from the ``tuning`` list."""
    return next(
        (t for t in results.get("tuning", []) if t["chosen"] and run_key(t) == source.key), None
    )


def _budget_excess(entry: dict) -> float:
    ratio, target = entry.get("flops_ratio"), entry.get("target_flops")
    if ratio is None or target is None:
        return 0.0
    return max(0.0, ratio - target - BUDGET_SLACK)


def pick(entries: list[dict], order: list[str]) -> dict:
    """The candidate with the best validation top-1 among those that meet the FLOPs budget
    (``BUDGET_SLACK``; if none does, among those closest to it); ties go to the earlier
    candidate (the first is the base recipe). The test split plays no part."""
    ranked = sorted(entries, key=lambda e: order.index(e["candidate"]))
    least = min(_budget_excess(e) for e in ranked)
    eligible = [e for e in ranked if _budget_excess(e) <= least]
    return max(eligible, key=lambda e: -1.0 if e["val_top1"] is None else e["val_top1"])


def run_one(
    spec: RunSpec, profile: Profile, epochs: float, hyper: dict, run_dir: Path, resume: bool
) -> dict:
    """One training run of ``spec`` with ``hyper`` and its record (test and val top-1)."""
    cfg = run_config(profile, spec, epochs, run_dir, hyper)
    start = time.perf_counter()
    if spec.method in METHODS:
        record = prune_record(cfg, resume)
    else:
        options = run_options(profile, hyper)
        if spec.budget in COMPUTE and profile.compute_pricing == "own-steps":
            options = dataclasses.replace(
                options, own_step_pricing=True,
                price_in_fresh_process=profile.timing_process == "fresh")  # fmt: skip
        record = run_baseline(spec.method, cfg, options, run_dir)
    priced = "own_step_pricing" in record  # epochs: its own; the budget's, in full-model ones
    first = {
        "method": spec.method,
        "target_flops": spec.target,
        "seed": spec.seed,
        "epochs": round(record["epochs"], 4) if priced else epochs,
        "budget": spec.budget,
        "top1_hard": record.pop("top1_hard"),
        "top1_soft": record.pop("top1_soft", None),
        "gap": record.pop("gap", None),
        "flops_ratio": record.pop("flops_ratio"),
        "params_ratio": record.pop("params_ratio"),
        "wall_seconds": time.perf_counter() - start,
        "code": code_version(),
    }
    if cfg.init is not None:
        first["init_sha256"] = file_sha256(cfg.init)
    if hyper:
        first["hyper"] = dict(hyper)
    if "init" in record:  # as the profile names it (a run records it absolute)
        record["init"] = profile.init
    rest = {k: v for k, v in record.items() if k not in first}
    return {**first, **rest, "run_dir": str(run_dir)}


def execute(
    spec: RunSpec,
    profile: Profile,
    results: dict,
    out: Path,
    resume: bool,
    save: Callable[[], None] | None = None,
) -> dict | None:
    """Run one planned run and return its record (None when a compute run cannot be matched,
    or its choice of hyper-parameters is not made yet). A searched run runs every candidate
    not yet in ``results["tuning"]`` (``save`` stores each at once) and returns the chosen."""
    run_dir = out / "runs" / profile.name / spec.name
    candidates = search_candidates(spec, profile)
    hyper: dict = {}
    source = None if candidates else choice_source(spec, profile)
    if source is not None:  # before the budget: a compute budget may cost a timing
        choice = chosen(results, source)
        if choice is None:
            tqdm.write(
                f"skip {spec.name}: it reuses the choice of {source.name}, whose search has not "
                "run yet (run the whole plan, or that seed, target and budget first)"
            )
            return None
        hyper = choice["hyper"]
    found = budget_epochs(spec, profile, results, out)
    if found is None:
        return None
    epochs, extra = found
    if candidates:
        order = [candidate_name(c) for c in candidates]
        tuning = results.setdefault("tuning", [])
        for hyper, name in zip(candidates, order, strict=True):
            if any(run_key(t) == spec.key and t["candidate"] == name for t in tuning):
                continue
            record = {**run_one(spec, profile, epochs, hyper, run_dir / name, resume), **extra}
            tuning.append({
                "method": spec.method, "target_flops": spec.target, "seed": spec.seed,
                "budget": spec.budget, "candidate": name, "hyper": dict(hyper),
                "val_top1": record.get("val_top1"), "flops_ratio": record["flops_ratio"],
                "chosen": False, "record": record,
            })  # fmt: skip
            tqdm.write(f"  candidate {spec.name} {name}: val top-1 {record.get('val_top1')}")
            if save is not None:
                save()
        entries = [t for t in tuning if run_key(t) == spec.key and t["candidate"] in order]
        best = pick(entries, order)
        for entry in entries:
            entry["chosen"] = entry is best
        return {**best["record"], "candidate": best["candidate"], "selected_by": "val_top1",
                "candidates": order}  # fmt: skip
    record = run_one(spec, profile, epochs, hyper, run_dir, resume)
    if source is not None:
        record.update(candidate=candidate_name(hyper), hyper_from=source.name)
    return {**record, **extra}


def summary_line(record: dict) -> str:
    soft = ""
    if record["top1_soft"] is not None:
        soft = f" (soft {record['top1_soft']:.2f}%, gap {record['gap']:.2f})"
    chosen_text = f" [{record['candidate']}]" if record.get("candidate") else ""
    return (
        f"done {record['method']} [{record['budget']}] target {record['target_flops']:g} "
        f"seed {record['seed']} epochs {record['epochs']:g}{chosen_text}: top-1 "
        f"{record['top1_hard']:.2f}%{soft}, FLOPs {record['flops_ratio']:.3f}, params "
        f"{record['params_ratio']:.3f}, {record['wall_seconds'] / 60:.1f} min"
    )


def run_benchmark(
    profile: Profile,
    path: Path,
    command: str,
    resume: bool,
    overwrite: bool,
    max_runs: int | None = None,
    reuse: Path | None = None,
):
    """Every planned run not yet in ``path``, each stored as soon as it finishes; with
    ``max_runs``, at most that many of them (a slice: resume to continue)."""
    results = open_results(path, profile, command, resume, overwrite, reuse)
    had_runs = reuse is None and bool(results["runs"] or results.get("tuning"))
    plan = plan_runs(profile)
    done = {run_key(r) for r in results["runs"]}
    todo = [spec for spec in plan if spec.key not in done]
    print(f"{profile.name}: {len(plan)} runs planned, {len(plan) - len(todo)} already in {path}")
    if max_runs is not None:
        todo = todo[:max_runs]
        print(f"--max-runs {max_runs}: this call runs {len(todo)}")

    def save() -> None:
        if had_runs and command not in results["resumed_by"]:
            results["resumed_by"].append(command)
        write_json(path, results)

    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="runs", unit="run")
    for spec in todo:
        bar.set_postfix_str(spec.name)
        record = execute(spec, profile, results, path.parent, resume, save)
        bar.update(1)
        if record is None:
            continue
        results["runs"].append(record)
        save()
        tqdm.write(summary_line(record))
    bar.close()
    return results


# ----------------------------------------------------------------------------- command line


def _list(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(x) for x in text.split(",") if x.strip())

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="S2HPruner against DMP, ablations and torch-pruning baselines.",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--out", default="benchmarks/results", help="folder of <profile>.json/.png")
    p.add_argument("--markdown", help="RESULTS.md to write (default: <out>/../RESULTS.md)")
    p.add_argument("--resume", action="store_true", help="continue the stored benchmark")
    p.add_argument("--overwrite", action="store_true", help="start again, dropping stored runs")
    p.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md and plots")
    p.add_argument("--methods", type=_list(str), help=f"comma list of {', '.join(ALL_METHODS)}")
    p.add_argument(
        "--compute-methods", type=_list(str), help="single-network methods also run on compute"
    )
    p.add_argument("--targets", type=_list(float), help="comma list of FLOPs ratios")
    p.add_argument("--seeds", type=_list(int), help="comma list of seeds")
    p.add_argument("--budgets", type=_list(str), help=f"comma list of {', '.join(BUDGETS)}")
    p.add_argument("--search-methods", type=_list(str),
                   help="only these methods get the validation search (others: base recipe)")
    p.add_argument("--reuse-from", metavar="JSON",
                   help="start a new benchmark with the runs of another profile's file that "
                   "this profile runs the same way (same settings but the search)")
    p.add_argument("--max-runs", type=int,
                   help="run at most N of the planned runs not yet stored (a slice)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--val-size", type=float, help="held-out count (>= 1) or fraction")
    p.add_argument("--train-subset", type=int, help="train on the first N training images")
    p.add_argument("--freeze-epochs", type=float,
                   help="S2HPruner family: epochs with frozen widths at the end (absolute)")
    p.add_argument("--init", help="starting checkpoint of every method (from-trained)")
    p.add_argument("--data-root")
    p.add_argument("--latency-repeats", type=int)
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
    return p.parse_args(argv)


def resolve_profile(args: argparse.Namespace) -> Profile:
    """The named profile with the command-line overrides, checked before anything runs."""
    profile = PROFILES[args.profile]
    overrides = {
        k: getattr(args, k)
        for k in (
            "methods",
            "compute_methods",
            "targets",
            "seeds",
            "budgets",
            "epochs",
            "batch_size",
            "lr",
            "val_size",
            "train_subset",
            "freeze_epochs",
            "init",
            "data_root",
            "latency_repeats",
        )
        if getattr(args, k, None) is not None
    }
    if args.no_progress:
        overrides["progress"] = False
    if getattr(args, "search_methods", None) is not None:
        unknown = sorted(set(args.search_methods) - set(profile.search))
        if unknown:
            raise SystemExit(f"--search-methods: no search defined for {unknown}; the profile "
                             f"searches {', '.join(profile.search) or 'nothing'}")  # fmt: skip
        overrides["search"] = {m: c for m, c in profile.search.items() if m in args.search_methods}
    profile = dataclasses.replace(profile, **overrides)
    unknown = sorted(set(profile.methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    bad = sorted(set(profile.compute_methods) - set(BASELINES))
    if bad:
        raise SystemExit(f"--compute-methods takes single-network methods only, not {bad}")
    bad = sorted(set(profile.budgets) - set(BUDGETS))
    if bad:
        raise SystemExit(f"unknown budget(s) {bad}; choose from {', '.join(BUDGETS)}")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise SystemExit("--resume continues the stored benchmark and --overwrite starts it "
                         "again; pass one of them")  # fmt: skip
    if getattr(args, "max_runs", None) is not None and args.max_runs < 1:
        raise SystemExit("--max-runs must be >= 1")
    if profile.init is not None and not Path(profile.init).is_file():
        command = profile.pretrain_command or "python -m benchmarks.pretrain ... --out <file>"
        raise SystemExit(
            f"profile {profile.name!r} starts every method from the trained checkpoint "
            f"{profile.init}, which does not exist; make it once with:\n    {command}\n"
            "(or pass another checkpoint with --init)"
        )
    for method, candidates in profile.search.items():
        for hyper in candidates:
            unknown = sorted(set(hyper) - set(RUN_HYPER) - set(OPTION_HYPER))
            if unknown:
                raise SystemExit(f"search of {method}: unknown hyper-parameter(s) {unknown}")
    # a compute-matched run complements the same method's epochs-budget run
    profile = dataclasses.replace(
        profile, compute_methods=tuple(m for m in profile.compute_methods if m in profile.methods)
    )
    for spec in plan_runs(profile):
        if spec.method in METHODS:
            hypers = search_candidates(spec, profile) or ({},)
            try:
                for hyper in hypers:
                    run_config(profile, spec, profile.epochs, Path("unused"), hyper).validate()
            except ConfigError as exc:
                raise SystemExit(f"{spec.name}: {exc}") from None
        elif not 0.0 < spec.target <= 1.0:
            raise SystemExit(f"target {spec.target} must be in (0, 1]")
    return profile


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    markdown = Path(args.markdown) if args.markdown else out.parent / "RESULTS.md"
    if not args.report_only:
        profile = resolve_profile(args)
        command = shlex.join(["python", "-m", "benchmarks.compare", *argv])
        path = out / f"{file_stem(profile.name)}.json"
        reuse = Path(args.reuse_from) if args.reuse_from else None
        if reuse is not None and not reuse.is_file():
            raise SystemExit(f"--reuse-from: {reuse} is not a file")
        run_benchmark(profile, path, command, args.resume, args.overwrite, args.max_runs, reuse)
    try:
        written = write_reports(out, markdown)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
