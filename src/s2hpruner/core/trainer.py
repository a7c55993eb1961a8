"""S2HTrainer: one S2HPruner step in your own training loop (SPEC section 5).

Read :meth:`S2HTrainer.gradients` first: the two forwards, the four losses and where each
gradient goes are all on one screen. :class:`Method` says, per method and ablation, which loss
reaches the weights theta and which the width logits u; nothing else in the step branches on
the method's name.

    trainer = S2HTrainer(model, pruner, optimizer, total_steps=epochs * len(loader))
    for x, y in loader:
        losses = trainer.step(x, y)       # both forwards, the losses, both optimizer steps
        scheduler.step()                  # your schedule, your logging
    pruned = trainer.export()             # the physically pruned hard network

With ``prune_at_freeze=True`` the last phase trains that pruned network itself, at the
smaller network's cost.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .balance import GradientBalancer
from .errors import BudgetError, NonFiniteLossError
from .measure import MEMORY_FORMATS, memory_format_of
from .modes import evaluating, follow_modes
from .pruner import S2HPruner, project_to_budget
from .sliced import narrow_pointwise_in_nchw

PHASES = ("warmup", "joint", "freeze")
DEFAULT_FREEZE = 0.25  # share of the run with frozen widths, unless the warm-up needs it


def default_freeze(warmup: float) -> float:
    """The frozen-width share when none is given: :data:`DEFAULT_FREEZE`, or half of what the
    warm-up leaves if that is less, so that a long warm-up still leaves a search (as a share
    of the run: a run of a few steps may round it away)."""
    return min(DEFAULT_FREEZE, max(0.0, 1.0 - warmup) / 2)


@dataclass(frozen=True)
class Method:
    """Where each loss goes: the routing table of S2HPruner and its ablations (SPEC 5-6).

    ``hard`` runs the hard network; ``gap_hard_to_masks`` lets G_h reach u through m_hat;
    ``gap_soft`` computes G_s (to u through the soft mask); ``gap_soft_to_weights`` lets G_s
    reach theta too (the coupled ablation). Task loss L always reaches theta and u; the
    resource loss only u; G_h always theta (when the hard network runs)."""

    name: str
    hard: bool = True
    gap_hard_to_masks: bool = True
    gap_soft: bool = True
    gap_soft_to_weights: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("s2h"),
        Method("dmp", hard=False, gap_hard_to_masks=False, gap_soft=False),
        Method("s2h-no-gs", gap_soft=False),
        Method("s2h-coupled", gap_soft_to_weights=True),
        Method("s2h-no-gap-on-mask", gap_hard_to_masks=False, gap_soft=False),
    )
}


def kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), averaged over the batch."""
    return F.kl_div(
        F.log_softmax(logits, dim=-1),
        F.log_softmax(target_logits, dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def logits_of(output: object) -> torch.Tensor:
    """The class logits of a model's output: a tensor, the first of a tuple or list, a dict's
    ``"logits"`` entry, or an object's ``.logits`` (Hugging Face)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, tuple | list):
        return output[0]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "pass output=... to S2HTrainer")  # fmt: skip


@dataclass
class StepGradients:
    """Gradients of one step, kept apart by the loss they come from, so that where each loss
    reaches (weights, width logits, or both) is explicit and testable."""

    weights: dict[str, list] = field(default_factory=dict)
    masks: dict[str, list] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, loss: torch.Tensor, weights: list, masks: list,
            retain_graph: bool = False,
            scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:  # fmt: skip
        """Record ``loss`` and take its gradient with respect to ``weights`` and ``masks``
        (of ``scale(loss)`` when a grad scaler is in use)."""
        self.losses[name] = float(loss.detach())
        if not weights and not masks:
            return
        scaled = loss if scale is None else scale(loss)
        grads = torch.autograd.grad(
            scaled, weights + masks, retain_graph=retain_graph, allow_unused=True
        )
        if weights:
            self.weights[name] = list(grads[: len(weights)])
        if masks:
            self.masks[name] = list(grads[len(weights) :])


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


# the last phase's teacher by name (S2HTrainer.freeze_teacher); a module is the third kind
FREEZE_TEACHERS = ("soft", "none")


class S2HTrainer:
    """Runs S2HPruner's step (both forwards, the four losses and their routing, the
    norm-balanced width-logit update) in the caller's loop.

    Args:
        model: the network being pruned (``pruner.model`` itself, not a copy), on its device.
        pruner: its :class:`S2HPruner`.
        optimizer: the caller's optimizer of the model's weights (not the width logits); the
            trainer calls its ``step()`` and ``zero_grad()``. The LR schedule stays with the
            caller.
        total_steps: calls of :meth:`step` over the whole run (batches, not epochs); the
            phases are fractions of it.
        method: ``"s2h"`` or an ablation, see :data:`METHODS`.
        loss_fn: ``loss_fn(logits, target)``, default cross-entropy (label smoothing, mixup
            targets or a teacher's soft targets work as long as the function takes them).
        output: picks the logits from the model's output (default :func:`logits_of`).
        mask_optimizer: optimizer of the width logits (default Adam, ``mask_lr``, no decay).
        mask_lr: the default mask optimizer's learning rate.
        alpha: weight of G_h in the weights' loss.
        balancer: the norm balancing of u's gradients (``balance.py``).
        warmup: fraction of the steps with u frozen at its start (weights only).
        freeze: fraction of the steps at the end with u frozen and the hard network trained,
            distilled from the soft one (DMP trains its soft network). When the widths freeze,
            they are projected onto the budget if the search did not meet it. ``None``
            (default): :func:`default_freeze` of ``warmup`` (0.25 unless the warm-up is long).
        freeze_teacher: what the hard network is distilled from once the widths freeze:
            ``"soft"`` (SPEC: the soft network's logits, one extra forward per step),
            ``"none"`` (the task loss alone: the last phase then costs one pruned network's
            step, not that plus a full forward) or a module, e.g. a copy of the trained model
            you started from, made before the pruner (its logits, one no-grad forward per
            step; it is put in eval mode and never trained).
        resource_on: R on the ``"hard"`` ratio (straight-through) or the ``"soft"`` one.
        freeze_ranks_after_warmup: fix the importance order once the search starts.
        autocast: ``None``, ``"bf16"`` (CPU and CUDA) or ``"fp16"`` (CUDA, with a grad scaler).
        prune_at_freeze: once the widths freeze, train the physically pruned network
            (``pruner.export()``) instead of the masked hard network: the caller's optimizer
            is moved onto its weights (in place: your LR schedule keeps working), each
            per-weight state (momentum, Adam's moments) sliced the same way, and each step
            costs the pruned network's. The full model keeps the weights it had at the
            freeze, so the soft network (``pruner.mode("soft")``, and a ``"soft"`` teacher)
            no longer moves: with ``freeze_teacher`` ``"none"`` or a module the updates are
            the masked hard network's, with ``"soft"`` the teacher is the soft network as
            it was at the freeze (as are ``pruner.mode("hard")`` and ``pruner.export()``).
            :meth:`export` returns a copy of the trained network, :attr:`network` the
            network itself. Needs the model's parameters untied (no
            weight shared by two modules). Ignored by methods without a hard network (DMP).
        pruned_layout: memory format the pruned network trains in (with
            ``prune_at_freeze``): ``None`` for the hard pass's (``pruner.hard_layout``, or
            the model's own), a ``torch.memory_format``, or ``"auto"`` to time NCHW and
            channels_last on the first frozen batch and keep the faster (not bit for bit
            reproducible, like ``cudnn.benchmark``).
        descent: fraction of the joint search over which the budgets the search aims at
            (the resource loss and the balancer's error) fall linearly from the full model's
            (1.0) to the targets, as torch-pruning's linear iterative schedule does: the hard
            network narrows gradually while it trains. 0 (default) aims at the targets from
            the first search step, as the SPEC does; the search may still take a few dozen
            steps to reach them.
        latency_feedback: with a latency budget, how many times during the search the hard
            network is exported, timed and the latency model refitted through it (evenly
            spaced); when the widths freeze this is repeated, with a projection, until the
            prediction agrees with the measurement. 0 turns the mid-search checks off.
    """

    def __init__(
        self,
        model: nn.Module,
        pruner: S2HPruner,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        method: str | Method = "s2h",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        output: Callable[[object], torch.Tensor] = logits_of,
        mask_optimizer: torch.optim.Optimizer | None = None,
        mask_lr: float = 0.05,
        alpha: float = 1.0,
        balancer: GradientBalancer | None = None,
        warmup: float = 0.0,
        freeze: float | None = None,
        freeze_teacher: str | nn.Module = "soft",
        resource_on: str = "hard",
        freeze_ranks_after_warmup: bool = False,
        autocast: str | None = None,
        prune_at_freeze: bool = False,
        pruned_layout: str | torch.memory_format | None = None,
        latency_feedback: int = 3,
        descent: float = 0.0,
    ):
        if isinstance(method, str):
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
            method = METHODS[method]
        if not (math.isfinite(total_steps) and total_steps >= 1
                and int(total_steps) == total_steps):  # fmt: skip
            raise ValueError(f"total_steps must be a whole number >= 1, got {total_steps}")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha (the weight of G_h) must be a number >= 0, got {alpha}")
        if freeze is None:
            freeze = default_freeze(warmup)
        if not (warmup >= 0.0 and freeze >= 0.0 and warmup + freeze < 1.0):
            raise ValueError(
                f"warmup ({warmup}) and freeze ({freeze}) are fractions of the run that must "
                "leave a joint search phase: each >= 0 and warmup + freeze < 1"
            )
        if not 0.0 <= descent <= 1.0:
            raise ValueError(f"descent is a fraction of the joint search in [0, 1], got {descent}")
        if resource_on not in ("hard", "soft"):
            raise ValueError(f"resource_on must be 'hard' or 'soft', got {resource_on!r}")
        if model is not pruner.model:  # the masks act on pruner.model's layers only
            raise ValueError(
                "model is not the module the pruner wraps: pass pruner.model (a copy, a "
                "rebuilt model or a wrapper such as DDP's .module would train without the masks)"
            )
        device, index_device = next(model.parameters()).device, pruner.index.group_of.device
        if device != index_device:  # else a mixed-device error deep inside the first step
            raise ValueError(
                f"the model is on {device} and the pruner on {index_device}: move the pruner "
                "with it (pruner.to(device) after model.to(device))"
            )
        layers = dict(model.named_modules())
        replaced = [n for n, m in pruner.layers.items() if layers.get(n) is not m]
        if replaced:  # the masks would act on the old modules: soft = hard = full network
            raise ValueError(
                f"the model's layers {replaced[:3]} are not the ones the pruner was built on "
                "(replaced after building it, e.g. by nn.SyncBatchNorm."
                "convert_sync_batchnorm); build the pruner after changing the model"
            )
        logits = {id(u) for u in pruner.mask_parameters()}
        if any(id(p) in logits for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                "the optimizer holds the pruner's width logits, which the trainer steps with "
                "its own mask_optimizer; build it on model.parameters() only (in a "
                "LightningModule that holds the pruner, leave out pruner.parameters())"
            )
        checkpointed = [n for n, m in model.named_modules() if getattr(m, "grad_checkpointing",
                        False) or getattr(m, "gradient_checkpointing", False) is True]  # fmt: skip
        if checkpointed:
            raise ValueError(
                f"gradient checkpointing is on in {checkpointed[0] or 'the model'}: it runs "
                "blocks again in the backward pass, after the soft or hard network's masks are "
                "gone, so the gradients would be the unmasked network's; turn it off "
                "(timm: model.set_grad_checkpointing(False))"
            )
        shared = [n for n, m in model.named_modules() if isinstance(
            m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]  # fmt: skip
        if method.hard and pruner.hard_stats is None and shared:
            raise ValueError(
                f"method {method.name!r} trains the hard network, but the pruner was built with "
                "separate_hard_bn_stats=False: the hard network's BatchNorm forward would "
                f"overwrite the running statistics of {shared[0] or 'the model'} that the soft "
                "network's backward still needs (and the two see different activations); build "
                "it with separate_hard_bn_stats=True, the default (False suits method 'dmp')"
            )
        # DMP never runs the hard network, so statistics of its own would stay as they were at
        # the pruner's build and be exported: it takes the soft network's instead
        pruner.hard_stats_unused = not method.hard
        if getattr(pruner.latency, "measured", True) is False:
            raise ValueError(
                "the pruner's latency model holds no timings yet (built with measure=False): "
                "load the run's pruner state (pruner.load_state_dict) before training"
            )
        if isinstance(freeze_teacher, nn.Module):
            shared = {id(p) for p in model.parameters()} & {
                id(p) for p in freeze_teacher.parameters()}  # fmt: skip
            if freeze_teacher is model or shared:
                raise ValueError(
                    "freeze_teacher shares weights with the model being pruned; pass a copy "
                    "made before the pruner was built (copy.deepcopy(model) or the model "
                    "rebuilt from your checkpoint)"
                )
            _set_training(freeze_teacher, False)  # a fixed teacher: its BN running stats
            freeze_teacher.requires_grad_(False)
            freeze_teacher.to(next(model.parameters()).device)  # it sees the model's batches
        elif freeze_teacher not in FREEZE_TEACHERS:
            raise ValueError(
                f"freeze_teacher must be one of {', '.join(FREEZE_TEACHERS)} or a module, "
                f"got {freeze_teacher!r}"
            )
        if pruned_layout is not None and pruned_layout != "auto" and not isinstance(
                pruned_layout, torch.memory_format):  # fmt: skip
            raise ValueError(f"pruned_layout must be None, 'auto' or a torch.memory_format, "
                             f"got {pruned_layout!r}")  # fmt: skip
        if autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
        self.model, self.pruner, self.optimizer = model, pruner, optimizer
        self.total_steps = int(total_steps)
        self.method = method
        self.loss_fn = loss_fn or F.cross_entropy
        self.output = output
        self.mask_optimizer = mask_optimizer or torch.optim.Adam(
            pruner.mask_parameters(), lr=mask_lr, betas=(0.9, 0.999)
        )
        self.alpha = alpha
        self.balancer = balancer or GradientBalancer()
        self.warmup, self.freeze = float(warmup), float(freeze)
        self.freeze_teacher = freeze_teacher
        self.resource_on = resource_on
        self.freeze_ranks_after_warmup = freeze_ranks_after_warmup
        self.autocast = autocast
        self.prune_at_freeze = bool(prune_at_freeze) and method.hard
        if self.prune_at_freeze:
            names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
            if len(names) != len(dict(model.named_parameters())):
                raise ValueError("prune_at_freeze needs a model without tied weights (one "
                                 "parameter shared by two modules); train without it")  # fmt: skip
        self.pruned_layout = pruned_layout
        # the physically pruned network trained after the freeze (prune_at_freeze), else None
        self.pruned: nn.Module | None = None
        self.scaler = torch.amp.GradScaler("cuda") if autocast == "fp16" else None
        # phase boundaries in whole steps, fixed once (no float comparisons at the edges)
        self.warmup_end = round(self.warmup * self.total_steps)
        frozen = round(self.freeze * self.total_steps)
        if self.freeze > 0 and frozen == 0 and self.total_steps - self.warmup_end > 1:
            frozen = 1  # a short run still ends with its widths frozen, as asked
        self.freeze_start = self.total_steps - frozen
        self.descent = float(descent)
        self.descent_end = self.warmup_end + round(
            self.descent * (self.freeze_start - self.warmup_end))
        if autocast == "fp16" and next(model.parameters()).device.type != "cuda":
            raise ValueError("autocast='fp16' needs CUDA (and its grad scaler); use 'bf16' on CPU")
        self.step_count = 0
        self._warned: set[str] = set()  # misuse warned about once (eval mode, extra steps)
        self.widths_frozen = False
        self.projection_steps: int | None = None  # steps project_to_budget took, once frozen
        # first search step after which the hard ratios were within tolerance of the budget:
        # how much of the joint phase the search needed to reach it by itself (None: never)
        self.budget_met_step: int | None = None
        # a latency budget with a measurable latency model gets measured feedback
        self.latency_feedback = hasattr(pruner.latency, "calibrate") and "latency" in pruner.budgets
        search = self.freeze_start - self.warmup_end
        self.feedback_steps = {
            self.warmup_end + round(k * search / (latency_feedback + 1))
            for k in range(1, latency_feedback + 1)
        } if self.latency_feedback else set()  # fmt: skip

    # ----------------------------------------------------------------- phases
    def phase(self, step: int | None = None) -> str:
        """"warmup" (u frozen at init), "joint" (u searched) or "freeze" (u fixed)."""
        step = self.step_count if step is None else step
        if step < self.warmup_end:
            return "warmup"
        if step >= self.freeze_start:
            return "freeze"
        return "joint"

    def aim(self, step: int | None = None) -> dict[str, float]:
        """The budgets the search aims at ``step``: the targets, or during the ``descent`` a
        point on the straight line from the full model (1.0) down to them."""
        step = self.step_count if step is None else step
        targets = self.pruner.budgets
        if step >= self.descent_end or self.descent_end == self.warmup_end:  # no descent
            return dict(targets)
        left = min(1.0, (self.descent_end - step) / (self.descent_end - self.warmup_end))
        return {name: target + (1.0 - target) * left for name, target in targets.items()}

    def freeze_widths(self, inputs: torch.Tensor | None = None) -> int:
        """Fix the architecture: freeze the importance order and project the widths onto the
        budget (warning when the search had not met it); with ``prune_at_freeze``, switch to
        training the pruned network (``inputs``: a batch to time its layout on, for
        ``pruned_layout="auto"``). Returns the projection's steps."""
        if not self.widths_frozen:
            self._freeze_search()
        if self.prune_at_freeze and self.pruned is None:  # (again, if it failed before)
            self._train_pruned_network(inputs)
        return self.projection_steps or 0

    def _freeze_search(self) -> None:
        self.widths_frozen = True
        self.pruner.freeze_ranks = True
        before = self.pruner.ratios("hard")
        self.projection_steps = project_to_budget(self.pruner, self.balancer.tolerance)
        searched = self.projection_steps
        if self.latency_feedback:
            self.projection_steps += self._meet_measured_latency()
        if searched:
            warnings.warn(
                f"the search ended off its budget (hard ratios {_fmt(before)}, targets "
                f"{_fmt(self.pruner.budgets)}); projected the widths onto it in "
                f"{searched} steps (now {_fmt(self.pruner.ratios('hard'))}). "
                "A longer joint phase or a larger gamma_growth lets the search meet it itself.",
                stacklevel=3,
            )

    def _train_pruned_network(self, inputs: torch.Tensor | None = None) -> None:
        """From now on train the physically pruned copy of the (frozen) hard network: the
        caller's optimizer moves onto its weights with every per-weight state sliced as the
        weights are (``S2HPruner.prune_like_weights``); scalar states (Adam's step) and the
        param groups (so the caller's LR schedule) are kept. Everything is prepared before
        anything is changed, so a failure leaves the trainer as it was."""
        pruned = self.pruner.export()
        old, new = dict(self.model.named_parameters()), dict(pruned.named_parameters())
        if set(old) != set(new):
            raise RuntimeError(
                "prune_at_freeze: the pruned network's parameters are not the model's "
                f"(only in the model: {sorted(set(old) - set(new))[:5]}, only in the pruned "
                f"network: {sorted(set(new) - set(old))[:5]}); train without prune_at_freeze"
            )
        name_of = {id(p): name for name, p in old.items()}
        moved_state = self._pruned_optimizer_state(name_of, old, new)
        layout = self.pruned_layout
        if layout == "auto":  # timed on the first frozen batch; nothing to time on: as it is
            layout = None
            if torch.is_tensor(inputs) and inputs.dim() == 4:
                from .layout import tune_module_layout

                layout = tune_module_layout(pruned, inputs, lambda x: self._pruned_logits(
                    pruned, x))  # fmt: skip
        # else the hard pass's, else the model's (the export's own can differ: torch-pruning
        # slices channels_last weights into NCHW ones)
        layout = layout or self.pruner.hard_layout or memory_format_of(self.model)
        # the switch itself
        for name, p in new.items():
            p.requires_grad_(old[name].requires_grad)
        pruned.to(memory_format=layout)
        follow_modes(pruned, self.model)
        for group in self.optimizer.param_groups:
            group["params"] = [new[name_of[id(p)]] if id(p) in name_of else p
                               for p in group["params"]]  # fmt: skip
        self.optimizer.state = moved_state
        self.pruned_layout, self.pruned = layout, pruned

    def _pruned_optimizer_state(self, name_of: dict, old: dict, new: dict) -> defaultdict:
        """The optimizer's state keyed by the pruned network's parameters: each state tensor
        of a weight's shape sliced like the weight, scalars and unpruned weights' states as
        they are; a state of another shape on a pruned weight cannot be moved (an error)."""
        per_key: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # key -> name -> state
        for p, state in self.optimizer.state.items():
            name = name_of.get(id(p))
            if name is None or new[name].shape == p.shape:
                continue
            for key, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    if v.shape != p.shape:
                        raise RuntimeError(
                            f"prune_at_freeze cannot move the optimizer's {key!r} of {name} "
                            f"(shape {tuple(v.shape)}, the weight's {tuple(p.shape)}); use an "
                            "optimizer whose states have their weight's shape (SGD, Adam, "
                            "AdamW), or train without prune_at_freeze"
                        )
                    per_key[key][name] = v
        sliced = {key: self.pruner.prune_like_weights(v) for key, v in per_key.items()}
        moved = defaultdict(dict)
        for p, state in self.optimizer.state.items():
            name = name_of.get(id(p))
            if name is None:  # not a weight of the model: untouched
                moved[p] = state
                continue
            moved[new[name]] = {key: sliced[key][name] if name in sliced.get(key, {}) else v
                                for key, v in state.items()}  # fmt: skip
        return moved

    @property
    def network(self) -> nn.Module:
        """The module whose weights the optimizer trains: the model, or after a freeze with
        ``prune_at_freeze`` the pruned network."""
        return self.model if self.pruned is None else self.pruned

    def _meet_measured_latency(self, tolerance: float = 0.02, checks: int = 4) -> int:
        """Time the frozen network (refitting the latency model) and, while its measured
        ratio misses the latency target by more than ``tolerance``, project again onto a
        target moved by the miss: feedback on the measurement itself, so the exported
        network meets the budget on the device even where the model is off. The aim moves
        at most a fifth of the target away from it (``next_latency_aim``), and the widths
        kept are those of the check that measured closest to the target (a noisy timing
        cannot make things worse). Returns the projection steps taken."""
        budgets, target = self.pruner.budgets, self.pruner.budgets["latency"]
        masks = self.pruner.mask_parameters()
        aim, steps, best = target, 0, (float("inf"), None, target)
        checked: list[tuple[float, float]] = []  # (aim, measured ratio) of each check
        for check in range(checks):
            measured = self.pruner.calibrate_latency("freeze")["measured_ratio"]
            miss = measured - target
            checked.append((aim, measured))
            ratios = self.pruner.ratios("hard")
            binding = max(budgets, key=lambda name: ratios[name] - budgets[name])
            if binding != "latency" and miss <= tolerance:
                return steps  # under budget because another one binds: met
            if abs(miss) < best[0]:
                best = (abs(miss), [u.detach().clone() for u in masks], measured)
            if abs(miss) <= tolerance or check == checks - 1:
                break
            aim = next_latency_aim(checked, target)
            with self.pruner.aiming_at({"latency": aim}):
                steps += project_to_budget(self.pruner, self.balancer.tolerance)
        with torch.no_grad():
            for u, kept in zip(masks, best[1], strict=True):
                u.copy_(kept)
        if best[2] - target > tolerance:
            warnings.warn(
                f"the latency budget is missed: the closest of {len(checked)} timings of the "
                f"frozen network measured {best[2]:.3f} of the full model's latency against "
                f"target_latency={target:g}. Timings this noisy or a latency model this far off "
                "need a larger latency batch (LatencyModel's batch_size, --latency-batch in "
                "the CLI) or a lower target",
                stacklevel=2,
            )
        return steps

    # ------------------------------------------------------------------- step
    def _forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "hard" and self.pruned is not None:  # the pruned network itself
            if self.pruned_layout is not None and x.dim() == 4:
                x = x.contiguous(memory_format=self.pruned_layout)
            return self._pruned_logits(self.pruned, x)
        with self.pruner.mode(mode), self._autocast(x):
            return self.output(self.model(x)).float()

    def _pruned_logits(self, pruned: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with self._autocast(x), narrow_pointwise_in_nchw(pruned):  # as the sliced pass
            return self.output(pruned(x)).float()

    def _autocast(self, x: torch.Tensor):
        if self.autocast is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast(x.device.type, dtype=dtype)

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last phase's teacher: the soft network, or the fixed module given."""
        if isinstance(self.freeze_teacher, nn.Module):
            with self._autocast(x):
                return self.output(self.freeze_teacher(x)).float()
        return self._forward(x, "soft")

    def gradients(self, x: torch.Tensor, y: torch.Tensor, phase: str) -> StepGradients:
        """The forwards and losses of one step of ``self.method``, and where each loss's
        gradient goes (not yet applied)."""
        m, alpha, loss_fn = self.method, self.alpha, self.loss_fn
        scale = None if self.scaler is None else self.scaler.scale  # fp16: scaled backward
        weights = [p for p in self.network.parameters() if p.requires_grad]
        masks = self.pruner.mask_parameters() if phase == "joint" else []
        grads = StepGradients()

        if not m.hard:  # DMP: the soft network only; it is discretised at the end
            soft = self._forward(x, "soft")
            grads.add("task", loss_fn(soft, y), weights, masks, scale=scale)

        elif phase == "freeze" and self.freeze_teacher == "none":  # the hard network alone
            grads.add("task", loss_fn(self._forward(x, "hard"), y), weights, [], scale=scale)

        elif phase == "freeze":  # widths fixed: the hard network, distilled from the teacher
            with torch.no_grad():
                teacher = self._teacher_logits(x)
            hard = self._forward(x, "hard")
            grads.add("task", loss_fn(hard, y) + alpha * kl(teacher, hard), weights, [],
                      scale=scale)  # fmt: skip

        else:
            soft = self._forward(x, "soft")  # 1. soft forward and task loss L
            task = loss_fn(soft, y)
            hard = self._forward(x, "hard")  # 2. hard forward
            gap_hard = kl(soft.detach(), hard)  # 3. G_h: theta via the hard net, u via m_hat
            gap_soft = kl(soft, hard.detach())  #    G_s: u only, via the soft mask (decoupled)
            # G_h's backward first: it frees the hard graph before the two soft backwards
            to_masks = masks if m.gap_hard_to_masks else []
            grads.add("gap_hard", alpha * gap_hard, weights, to_masks, scale=scale)
            grads.add("task", task, weights, masks, retain_graph=m.gap_soft, scale=scale)
            if m.gap_soft:
                to_weights = weights if m.gap_soft_to_weights else []
                grads.add("gap_soft", gap_soft, to_weights, masks, scale=scale)
            else:
                grads.losses["gap_soft"] = float(gap_soft.detach())

        if masks:  # 4. resource loss R, on the width logits only
            with self.pruner.aiming_at(self.aim()):
                resource = self.pruner.resource_loss(self.resource_on)
            grads.add("resource", resource, [], masks, scale=scale)
        return grads

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimisation step: the weights get the sum of their gradients, the width
        logits the norm-balanced combination of task, gap and resource gradients. Returns
        the losses by name and the balancer's ``gamma``: during the search ``task``,
        ``gap_hard``, ``gap_soft`` and ``resource``; once the widths freeze ``task`` alone
        (the hard network's, with the teacher's KL added unless ``freeze_teacher="none"``)."""
        self._warn_misuse()
        phase = self.phase()
        if phase == "freeze" and (not self.widths_frozen
                                  or self.prune_at_freeze and self.pruned is None):
            self.freeze_widths(x)
        if self.pruned is not None:  # model.train() / model.eval() of the caller hold for it
            follow_modes(self.pruned, self.model)
        if phase == "joint" and self.step_count in self.feedback_steps:
            self.pruner.calibrate_latency("search")  # refit the latency model where u is
        if phase != "warmup" and self.freeze_ranks_after_warmup and not self.pruner.freeze_ranks:
            self.pruner.update_ranks(force=True)  # the order of the warmed-up weights, kept
            self.pruner.freeze_ranks = True
        weights = [p for p in self.network.parameters() if p.requires_grad]
        masks = self.pruner.mask_parameters()
        self.pruner.update_ranks()
        grads = self.gradients(x, y, phase)
        loss = sum(v for k, v in grads.losses.items() if k != "resource")
        finite = math.isfinite(loss)
        if not D.all_true(finite):  # every rank raises, none waits in the gradients' reduce
            raise NonFiniteLossError(f"non-finite loss {loss} ({grads.losses})" if not finite
                                     else "non-finite loss on another process")  # fmt: skip

        _set_grads(weights, _sum(*grads.weights.values()))
        D.average_gradients(weights)
        search = "resource" in grads.masks
        if search:  # balance the rank-averaged sources: N processes = one with N times the batch
            task = D.average_gradient_list(grads.masks["task"], masks)
            gap = _sum(grads.masks.get("gap_hard"), grads.masks.get("gap_soft"))
            gap = None if gap is None else D.average_gradient_list(gap, masks)
            excess = float(self.pruner.budget_excess("hard").detach())
            if self.step_count < self.descent_end:  # the balancer follows the descent's aim
                with self.pruner.aiming_at(self.aim()):
                    self.balancer.update(float(self.pruner.budget_excess("hard").detach()))
            else:
                self.balancer.update(excess)
            if self.budget_met_step is None and abs(excess) <= self.balancer.tolerance:
                self.budget_met_step = self.step_count
            _set_grads(masks, self.balancer.combine(masks, task, gap, grads.masks["resource"]))
        self._optimizer_step(self.optimizer)
        if search:
            self._optimizer_step(self.mask_optimizer)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.mask_optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return {**grads.losses, "gamma": self.balancer.gamma}

    def _warn_misuse(self) -> None:
        """Warn once about two silent mistakes: training in eval mode (BatchNorm then
        neither uses the batch's statistics nor updates its running ones) and stepping past
        ``total_steps`` (often an epoch count: the run then sits in the last phase)."""
        if not self.model.training and "eval" not in self._warned:
            self._warned.add("eval")
            warnings.warn("S2HTrainer.step() with the model in eval mode: call model.train() "
                          "after evaluating", stacklevel=3)  # fmt: skip
        if self.step_count >= self.total_steps and "steps" not in self._warned:
            self._warned.add("steps")
            warnings.warn(
                f"step {self.step_count + 1} is past total_steps ({self.total_steps}), which "
                "counts calls of step() over the whole run (batches, not epochs); the extra "
                "steps train with the widths frozen", stacklevel=3)  # fmt: skip

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # unscales, and skips the step on inf/NaN gradients
            self.scaler.step(optimizer)

    def average_statistics(self) -> None:
        """Average the BatchNorm running statistics over the ``torchrun`` processes: the
        model's (the soft network's), the hard network's and the pruned network's. Each
        process updates them on its own batches, so call this on every process before
        evaluating or exporting (a no-op in a single process). Their momentum update is
        affine, so averaging at any point gives the statistics of averaging at the end."""
        D.average_buffers(self.model)
        if self.pruner.hard_stats is not None:
            D.average_tensors(list(self.pruner.hard_stats.buffers()))
        if self.pruned is not None:
            D.average_buffers(self.pruned)

    # ------------------------------------------------------------- the end
    def export(self) -> nn.Module:
        """The physically pruned hard network, a copy the caller may change. At the end of
        the search (from the first step of the last phase on) the widths are frozen, projected
        onto the budget if the search had not met it; with ``prune_at_freeze`` this is the
        network trained since the freeze (:attr:`network` is that network itself). Before
        that, a snapshot: the current hard network projected onto the budget, while the
        search itself goes on untouched (export to evaluate mid-run)."""
        if not self.widths_frozen and self.step_count < self.freeze_start:
            return self._snapshot()
        if not self.widths_frozen:
            self.freeze_widths()
        return self.pruner.export() if self.pruned is None else copy.deepcopy(self.pruned)

    def _snapshot(self) -> nn.Module:
        masks = self.pruner.mask_parameters()
        saved = [(u.detach().clone(), u.grad) for u in masks]
        try:
            project_to_budget(self.pruner, self.balancer.tolerance)
            return self.pruner.export()
        finally:
            with torch.no_grad():
                for u, (value, grad) in zip(masks, saved, strict=True):
                    u.copy_(value)
                    u.grad = grad

    def state_dict(self) -> dict:
        """Everything of the trainer a resumed run needs (save the model, the pruner and your
        optimizer beside it). Load the trainer's after the model's and the pruner's and
        before the optimizer's: after a freeze with ``prune_at_freeze`` it rebuilds the pruned
        network and moves the optimizer onto it, where the optimizer's saved state fits."""
        return {
            "step_count": self.step_count,
            "widths_frozen": self.widths_frozen,
            "projection_steps": self.projection_steps,
            "budget_met_step": self.budget_met_step,
            "mask_optimizer": self.mask_optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "pruned": None if self.pruned is None else self.pruned.state_dict(),
            "pruned_layout": None if self.pruned is None else str(self.pruned_layout),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("pruned") is None and self.pruned is not None:
            raise ValueError("this trainer already trains its pruned network; a state saved "
                             "before the switch needs a new trainer")  # fmt: skip
        self.step_count = int(state["step_count"])
        self.widths_frozen = bool(state["widths_frozen"])
        self.projection_steps = state["projection_steps"]
        self.budget_met_step = state.get("budget_met_step")  # absent in older checkpoints
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.balancer.load_state_dict(state["balancer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if state.get("pruned") is not None:  # trained the pruned network: rebuild it
            if self.pruned is None:
                layout = state.get("pruned_layout")
                self.pruned_layout = MEMORY_FORMATS.get(layout, self.pruned_layout)
                if self.pruned_layout == "auto":  # the saved run's choice is not known
                    self.pruned_layout = None
                self._train_pruned_network()
            self.pruned.load_state_dict(state["pruned"])


def next_latency_aim(checked: Sequence[tuple[float, float]], target: float) -> float:
    """The latency target to project the frozen widths onto next, from the (aim, measured
    ratio) of each check so far: the last aim moved by its miss, scaled down once two checks
    exist where the measured ratio moved faster than the aim between them (secant), and kept
    within a fifth of the target. Why: near the budget the measured ratio can move much
    faster than the aim (MobileNetV3 under the FLOPs feature: 5 times), and a step of one
    miss then overshot further at every check (0.54, 0.33, 0.70, 0.25 for a 0.5 target).
    Never scaled up: two close checks' timing noise can fake a flat slope (digits: a step
    4 times the miss went from 0.68 to 0.89)."""
    aim, measured = checked[-1]
    step = target - measured
    if len(checked) >= 2:
        aim_before, measured_before = checked[-2]
        if (aim - aim_before) * (measured - measured_before) > 0:  # a usable slope
            step *= min((aim - aim_before) / (measured - measured_before), 1.0)
    return min(max(aim + step, 0.8 * target), min(1.2 * target, 1.0))




def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None] | None):
    if grads is None:
        grads = [None] * len(params)
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.detach()


def _fmt(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in ratios.items())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    pruner: S2HPruner | None = None,
    mode: str = "full",
    progress: bool = False,
    desc: str = "eval",
    output: Callable[[object], torch.Tensor] = logits_of,
) -> float:
    """Top-1 accuracy (percent) of ``model`` (in ``mode`` of ``pruner`` if given), summed
    over ranks when distributed."""
    from tqdm.auto import tqdm

    correct = torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    with evaluating(model):
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            mode_ctx = contextlib.nullcontext() if pruner is None else pruner.mode(mode)
            with mode_ctx:
                logits = output(model(x))
            correct += (logits.argmax(-1) == y).sum()
            total += y.numel()
    correct, total = D.all_reduce_sum(correct), D.all_reduce_sum(total)
    return float(100.0 * correct / total.clamp_min(1))


def _set_training(model: nn.Module, training: bool) -> None:
    """``model.train(training)``; a loaded torch.export program has no modes (always eval)."""
    with contextlib.suppress(NotImplementedError):
        model.train(training)


__all__ = [
    "METHODS",
    "PHASES",
    "BudgetError",
    "Method",
    "S2HTrainer",
    "StepGradients",
    "evaluate",
    "kl",
    "logits_of",
    "project_to_budget",
]
