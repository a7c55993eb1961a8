"""S2HPruner: the width search over a wrapped model, its three forward modes, and export.

The pruner owns the width logits u (one per channel group). Inside ``pruner.mode("soft")`` the
model's forward multiplies each group's channels by the relaxed mask w(u); inside
``pruner.mode("hard")`` by the hard mask m_hat(u); ``"full"`` (and outside any mode) runs the
model untouched. The masks are attached as forward hooks only while the context is open (on a
BatchNorm they are folded into its affine parameters), so the wrapped model stays a plain
``nn.Module`` and ``export()`` can copy it.

The pruner is itself an ``nn.Module`` holding only its own state (width logits, the channel
index, the resource tables, the hard network's BatchNorm statistics): ``pruner.to(device)``
and ``pruner.state_dict()`` cover all of it. The wrapped model is not a submodule.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch_pruning as tp
from torch import nn

from . import distributed as D
from . import masks as M
from .attention import producer_weight
from .errors import BudgetError, UnsupportedModelError
from .index import ChannelIndex
from .resources import ResourceModel
from .search import WidthSearch, check_temperature
from .sliced import (
    SlicedHardForward,
    attach_mask,
    export_failures,
    failing_groups,
    narrow_pointwise,
    narrow_pointwise_hooks,
    prune_copy,
    unsliceable_modules,
)
from .structure import ChannelGroup, find_groups, index_mapping_once, inputs_on_device_of

# what ranks a group's channels (S2HPruner's ``importance``)
IMPORTANCES = ("producers", "group")
# torch-pruning's group L1 importance, without its normaliser (ranks within a group only)
_GROUP_L1 = tp.importance.MagnitudeImportance(p=1, normalizer=None)

MODES = ("full", "soft", "hard")
RESOURCES = ("flops", "params", "latency")
_LABEL = {"flops": "FLOPs", "params": "parameter", "latency": "latency"}
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class HardNormStats(nn.Module):
    """The hard network's own BatchNorm running statistics (the soft and hard networks see
    different activations); swapped into the model while the hard network runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.layers: dict[str, str] = {}  # model layer name -> buffer prefix here
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                prefix = f"bn{len(self.layers)}"
                self.layers[name] = prefix
                for buffer in _BN_BUFFERS:
                    self.register_buffer(f"{prefix}_{buffer}", getattr(module, buffer).clone())

    def swap(self, modules: dict[str, nn.Module]) -> None:
        """Exchange the model's statistics with these (a second call swaps them back)."""
        mine = self._buffers
        for name, prefix in self.layers.items():
            theirs = modules[name]._buffers  # setattr's checks cost ~20 us a buffer
            for buffer in _BN_BUFFERS:
                key = f"{prefix}_{buffer}"
                mine[key], theirs[buffer] = theirs[buffer], mine[key]

    def items(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(layer name, {buffer: tensor}) of every BatchNorm."""
        for name, prefix in self.layers.items():
            yield name, {b: self._buffers[f"{prefix}_{b}"] for b in _BN_BUFFERS}


class S2HPruner(nn.Module):
    """Differentiable width search with soft and hard masks over a model's channel groups.

    Args:
        model: the network to prune; it is not modified (masks act through temporary hooks).
        example_inputs: a batch (or tuple of inputs) used to trace the model and count FLOPs;
            it follows the model to its device (an export after ``model.cuda()`` traces there).
        target_flops: budget as a fraction of the full model's FLOPs in (0, 1].
        target_params: budget as a fraction of the full model's parameters.
        target_latency: budget as a fraction of the full model's latency, measured by
            ``latency_model``: a :class:`~s2hpruner.core.resources.latency.LatencyModel`, or
            a function ``(model, example_inputs, groups) -> LatencyModel`` called once the
            groups are known. Every budget given is met; with none, ``target_flops=0.35``.
        width_step: channel step d of every group (default: the smallest divisor of its
            width that gives at most ``max_candidates`` widths).
        round_to: make every kept (hard) width a multiple of this, or the group's full width
            (e.g. 8 or 16 for fast kernels); the search itself keeps the step ``width_step``.
        ignored_layers: modules (or their names) whose output channels are never pruned; the
            classifier is always ignored.
        temperature: tau of p = softmax(u / tau); constant, never annealed.
        max_candidates: most candidate widths per group (bounds the default ``width_step``).
        separate_hard_bn_stats: keep the hard network's BatchNorm running statistics apart
            from the soft network's (the two see different activations); the exported model
            gets the hard ones. Use it whenever the hard network is trained (S2HPruner); DMP
            never runs it in training.
        sliced_hard: run the hard network on the kept channels only (sliced.py), when every
            layer of the groups allows it; else the masked forward is used.
        skip_slow_widths: with a latency model, never keep a width that its tables say is
            slower than a wider one (alignment effects: 9 channels can cost more than 16);
            the skipped widths are in ``slow_widths``.
        prune_embedding: also search a transformer's embedding width (the residual stream
            through its LayerNorms, attention projections and MLPs; kinds/norms.py). Off by
            default: the heads and MLP widths are what transformers are usually pruned by.
        importance: what ranks a group's channels (the hard network keeps the first H):
            ``"producers"`` (SPEC: the L1 norm of each channel's weights, averaged over the
            group's producing layers) or ``"group"`` (torch-pruning's group L1 importance,
            ``MagnitudeImportance(p=1)``: averaged over every layer of the group, so also the
            input weights of the layers that consume the channel and the norms' scales; the
            ranking of torch-pruning's L1 pruner). Head groups and grouped-conv units keep
            the producers' rule.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target_flops: float | None = None,
        width_step: int | None = None,
        round_to: int | None = None,
        ignored_layers: Iterable[nn.Module | str] = (),
        temperature: float = 1.0,
        max_candidates: int = 32,
        separate_hard_bn_stats: bool = True,
        sliced_hard: bool = True,
        target_params: float | None = None,
        target_latency: float | None = None,
        latency_model: nn.Module | Callable[..., nn.Module] | None = None,
        skip_slow_widths: bool = True,
        prune_embedding: bool = False,
        importance: str = "producers",
    ):
        super().__init__()
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got "
                             f"{importance!r}")  # fmt: skip
        if target_flops is None and target_params is None and target_latency is None:
            target_flops = 0.35
        self.budgets = {
            name: _fraction(name, value)
            for name, value in (
                ("flops", target_flops),
                ("params", target_params),
                ("latency", target_latency),
            )
            if value is not None
        }
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be >= 1 (or None), got {round_to}")
        check_temperature(temperature)  # before tracing the model
        if width_step is not None and width_step < 1:
            raise ValueError(f"width_step must be >= 1 (or None: each group's own), got "
                             f"{width_step}")  # fmt: skip
        if max_candidates < 2:
            raise ValueError(f"max_candidates must be >= 2 (a search needs two widths), got "
                             f"{max_candidates}")  # fmt: skip
        object.__setattr__(self, "model", model)  # wrapped, not a submodule
        example_inputs = inputs_on_device_of(model, example_inputs)
        self.example_inputs = example_inputs
        groups, graph = find_groups(model, example_inputs, width_step, ignored_layers,
                                    max_candidates, embedding=prune_embedding)  # fmt: skip
        groups = [g for g in groups if len(g.candidates) > 1]
        self.groups: list[ChannelGroup] = _working_groups(model, example_inputs, groups,
                                                          "params" in self.budgets)  # fmt: skip
        if not self.groups:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no prunable channel group (every conv/linear is "
                "ignored, fixed, or has a single candidate width); nothing to search"
            )
        self.round_to = round_to
        self.importance_rule = importance
        self.layers = dict(model.named_modules())
        self.index = ChannelIndex(self.groups, self.layers)
        # importance "group": torch-pruning's dependency group of each channel group, by index
        self.dependency_groups = {} if importance == "producers" else _dependency_groups(
            graph, self.groups, self.layers)  # fmt: skip
        self.search = WidthSearch(self.groups, self.index, temperature, round_to)
        self.resources = ResourceModel(model, example_inputs, self.groups)
        if "latency" in self.budgets and latency_model is None:
            raise BudgetError(
                "target_latency needs a latency_model; fix: latency_model=lambda model, x, "
                "groups: LatencyModel(model, x, groups, batch_size=64) (LatencyModel from "
                "s2hpruner.core.resources.latency; the pruner calls it with its groups)"
            )
        if latency_model is not None and not isinstance(latency_model, nn.Module):
            latency_model = latency_model(model, example_inputs, self.groups)
        self.latency = latency_model
        if hasattr(self.latency, "price_steps"):  # a step's price, not a stair's edge
            self.latency.price_steps(self.search.hard_steps)
        if hasattr(self.latency, "add_proxy"):  # measured networks may favour FLOPs (latency.py)
            self.latency.add_proxy("flops", self._flops_ratio_of)
            choice = getattr(self.latency, "predictor_choice", "auto")
            if choice not in ("auto", *self.latency.predictors()):
                raise ValueError(f"latency predictor {choice!r} is not offered; choose auto or "
                                 f"one of {', '.join(self.latency.predictors())}")  # fmt: skip
        self.freeze_ranks = False
        self._active_mode: str | None = None  # the mode() being run (they do not nest)
        self.hard_stats = HardNormStats(model) if separate_hard_bn_stats else None
        # True: the hard network runs and exports with the model's (soft network's) statistics
        # even so; set by a trainer whose method never runs the hard network (DMP), the
        # buffers stay in the state dict so that states load either way
        self.hard_stats_unused = False
        self._narrow_pointwise = narrow_pointwise(self.layers)  # see sliced.py
        self.unsliceable = unsliceable_modules(self.groups, self.layers)
        self._sliced = (
            None if self.unsliceable else SlicedHardForward(self.groups, self.layers, self.index)
        )
        self.sliced_hard = sliced_hard and self._sliced is not None
        self.hard_layout: torch.memory_format | None = None  # None: the model's own
        self.hard_nchw_norms = True  # narrow channels_last BatchNorms train in NCHW (sliced.py)
        self.to(next(model.parameters()).device)
        self.update_ranks(force=True)
        self.slow_widths: dict[str, list[int]] = {}
        self.latency_calibration: list[dict[str, float]] = []  # every measured refit
        self.latency_floor: float | None = None  # measured ratio of the smallest network
        # a latency model built with measure=False holds no timings yet: what they decide
        # (calibration, floor, skipped widths) comes with load_state_dict, as the run decided it
        timed = self.latency is not None and getattr(self.latency, "measured", True)
        if timed:
            if hasattr(self.latency, "calibrate"):
                self._calibrate_latency()
            if skip_slow_widths:
                self.slow_widths = self._skip_slow_widths()
        for name, target in self.budgets.items():
            if name == "latency" and not timed:
                continue
            minimum = self.min_ratio(name)
            if target < minimum:
                raise BudgetError(
                    f"target_{name}={target:g} is below the smallest {_LABEL[name]} ratio this "
                    f"model can reach with its candidate widths ({minimum:.4f}); choose a target "
                    f">= {minimum:.4f} or a smaller width_step (or round_to)"
                )

    @property
    def _separate_hard_stats(self) -> bool:
        return self.hard_stats is not None and not self.hard_stats_unused

    @property
    def target_flops(self) -> float | None:
        return self.budgets.get("flops")

    # ----------------------------------------------------------------- state
    def mask_parameters(self) -> list[nn.Parameter]:
        """The width logits u, one ``nn.Parameter`` per group (give them their own optimizer)."""
        return list(self.search.logits)

    def get_extra_state(self) -> dict:
        return {
            "freeze_ranks": self.freeze_ranks,
            "groups": [(g.name, g.channels, list(g.candidates)) for g in self.groups],
            "round_to": self.round_to,
            "temperature": self.search.temperature,
            "importance": self.importance_rule,
            "latency_floor": self.latency_floor,
            "latency_calibration": self.latency_calibration,
            "slow_widths": self.slow_widths,
        }

    def set_extra_state(self, state: dict) -> None:
        mine = [(g.name, g.channels, list(g.candidates)) for g in self.groups]
        if [(n, c, list(k)) for n, c, k in state["groups"]] != mine:
            raise ValueError("pruner state belongs to a model with other channel groups")
        if state.get("round_to") != self.round_to:
            raise ValueError(
                f"pruner state was saved with round_to={state.get('round_to')}, this pruner has "
                f"round_to={self.round_to}"
            )
        # the same logits are other widths at another temperature, and another importance
        # ranks the channels otherwise (states saved before these were stored: not checked)
        for name, mine in (("temperature", self.search.temperature),
                           ("importance", self.importance_rule)):  # fmt: skip
            if name in state and state[name] != mine:
                raise ValueError(f"pruner state was saved with {name}={state[name]!r}, this "
                                 f"pruner has {name}={mine!r}; build it with the saved one")
        self.freeze_ranks = bool(state["freeze_ranks"])
        self.latency_floor = state.get("latency_floor")
        self.latency_calibration = list(state.get("latency_calibration", []))
        if "slow_widths" in state:  # the widths the run's own timings skipped, not new ones'
            self.slow_widths = {name: list(w) for name, w in state["slow_widths"].items()}
            self.search.restrict_hard_widths([
                [w for w in widths if w not in self.slow_widths.get(g.name, ())]
                for g, widths in zip(self.groups, self.search.all_hard_widths, strict=True)
            ])  # fmt: skip

    # ------------------------------------------------------------ importance
    @torch.no_grad()
    def update_ranks(self, force: bool = False) -> None:
        """Rank each group's channels by :meth:`importance` (rank 0 first).

        Called once per training step; a no-op when ``freeze_ranks`` is set (unless forced).
        """
        if self.freeze_ranks and not force:
            return
        ranks = M.grouped_ranks(self.importance(), self.index.group_of, self.index.group_offsets)
        self.search.ranks.copy_(ranks)

    def importance(self) -> torch.Tensor:
        """Per flat group channel: mean over the group's producers of its L1 weight norm
        (``importance="producers"``), or torch-pruning's group L1 importance (``"group"``)."""
        norms: dict[str, torch.Tensor] = {}
        sources = []
        for name, map_id in self.index.importance_sources:
            if name not in norms:
                weight = producer_weight(self.layers[name]).detach().flatten(1)
                norms[name] = torch.linalg.vector_norm(weight, ord=1, dim=1)
            sources.append(norms[name][self.index.map(map_id)])
        source = torch.cat(sources)
        total = torch.zeros_like(self.index.producer_count, dtype=source.dtype)
        total = total.index_add_(0, self.index.importance_dest, source) / self.index.producer_count
        for i, group in self.dependency_groups.items():  # importance "group"
            start = self.index.offsets[i]
            total[start : start + self.groups[i].channels] = _GROUP_L1(group).to(total)
        return total

    # ----------------------------------------------------------------- masks
    def relaxed_masks(self) -> list[torch.Tensor]:
        """w per group, indexed by channel (not rank)."""
        return list(self.search.flat_masks("soft").split(self.search.sizes))

    def hard_masks(self) -> list[torch.Tensor]:
        """m_hat per group, indexed by channel: value 0/1, gradient only through kept channels."""
        return list(self.search.flat_masks("hard").split(self.search.sizes))

    def flat_masks(self, mode: str) -> torch.Tensor:
        """All groups' masks for ``mode`` ("soft" or "hard") in one vector, plus a trailing 1
        that layers' channels outside any group point to."""
        masks = self.search.flat_masks(mode)
        return torch.cat([masks, torch.ones(1, device=masks.device, dtype=masks.dtype)])

    @contextlib.contextmanager
    def mode(self, mode: str, sliced: bool | None = None) -> Iterator[None]:
        """Forward the wrapped model inside this context to get the ``mode`` network.

        In "hard" mode, ``sliced`` (default: ``self.sliced_hard``) computes only the kept
        channels; ``sliced=False`` is the masked reference path. Both give the same network.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        if self._active_mode is not None:  # the masks would stack, the statistics swap twice
            raise RuntimeError(f"pruner.mode({mode!r}) inside pruner.mode("
                               f"{self._active_mode!r}); leave one before entering another")
        if mode == "full":
            self._active_mode = mode
            try:
                yield
            finally:
                self._active_mode = None
            return
        flat = self.flat_masks(mode)
        sliced = self.sliced_hard if sliced is None else sliced
        if sliced and self._sliced is None:
            raise UnsupportedModelError(
                f"no sliced hard forward for this model (layers {self.unsliceable}); "
                "use the masked one"
            )
        swap = mode == "hard" and self._separate_hard_stats
        if swap:
            self.hard_stats.swap(self.layers)
        self._active_mode = mode
        try:
            if mode == "hard" and sliced:
                keep = flat.detach() > 0.5
                with self._sliced.apply(keep, flat, self.hard_layout, self.hard_nchw_norms):
                    yield
            else:
                handles = narrow_pointwise_hooks(self._narrow_pointwise)
                for name in self.index.site:
                    site, dim = self.index.site_map(name)
                    handles += attach_mask(self.layers[name], flat[site], dim)
                try:
                    yield
                finally:
                    for h in handles:
                        h.remove()
        finally:
            self._active_mode = None
            if swap:
                self.hard_stats.swap(self.layers)

    # ------------------------------------------------------------- resources
    def widths(self, mode: str) -> torch.Tensor:
        """Group widths of ``mode``: expected E ("soft"), hard H ("hard") or all channels."""
        if mode == "soft":
            return self.search.expected_widths()
        if mode == "hard":
            return self.search.hard_widths()
        if mode == "full":
            return self.resources.channels.float()
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")

    def _cost(self, resource: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
        """(cost of widths, cost of the full model) of a resource."""
        if resource == "flops":
            return self.resources.flops, self.resources.full_flops
        if resource == "params":
            return self.resources.params, self.resources.full_params
        if resource == "latency" and self.latency is not None:
            return self.latency.cost, self.latency.full
        raise ValueError(f"unknown or unavailable resource {resource!r}; use one of {RESOURCES}")

    def resource_ratio(self, resource: str, mode: str = "hard") -> torch.Tensor:
        """Cost of the ``mode`` network over the full one (soft: differentiable in u; hard:
        straight-through to the expected widths)."""
        cost, full = self._cost(resource)
        return cost(self.widths(mode)) / full

    def _flops_ratio_of(self, widths: torch.Tensor) -> torch.Tensor:
        return self.resources.flops(widths) / self.resources.full_flops

    def flops(self, mode: str = "hard") -> torch.Tensor:
        """FLOPs of the ``mode`` network on the example inputs (soft: differentiable in u)."""
        return self.resources.flops(self.widths(mode))

    def flops_ratio(self, mode: str = "hard") -> torch.Tensor:
        return self.resource_ratio("flops", mode)

    @torch.no_grad()
    def ratio(self, mode: str = "hard", resource: str = "flops") -> float:
        """A resource ratio of ``mode`` as a plain number (for logs and checks)."""
        return float(self.resource_ratio(resource, mode))

    @torch.no_grad()
    def ratios(self, mode: str = "hard") -> dict[str, float]:
        """Every budgeted resource's ratio, by name."""
        return {name: self.ratio(mode, name) for name in self.budgets}

    def budget_excess(self, mode: str = "hard") -> torch.Tensor:
        """max over budgets of (ratio - target): 0 when the binding budget is met exactly,
        positive when one is exceeded. With one budget, just rho - rho*."""
        return torch.stack(
            [self.resource_ratio(name, mode) - target for name, target in self.budgets.items()]
        ).max()

    def resource_loss(self, mode: str = "hard") -> torch.Tensor:
        """R = (max_b (rho_b - rho_b*))^2: the SPEC's (rho - rho*)^2 for one budget; with
        several, the binding one is driven to its target and the others stay below theirs."""
        return self.budget_excess(mode) ** 2

    def params(self, mode: str = "hard") -> torch.Tensor:
        return self.resources.params(self.widths(mode))

    def calibrate_latency(self, when: str = "", rounds: int = 5) -> dict[str, float]:
        """Export the current hard network, measure its latency against the full model and
        refit the latency model through it (``LatencyModel.fit``). Feedback, not a guess:
        the trainer calls it during the search and when the widths freeze, so the predicted
        latency is right where the search ends. Appends to ``latency_calibration``."""
        widths = self.search.hard_widths().detach()
        result = self.latency.calibrate(self.model, self.export().eval(), widths, rounds)
        self.latency_calibration.append({"when": when, **result})
        return result

    def start_at(self, widths: dict[str, int]) -> None:
        """Start the search from ``widths`` (group name -> one of its ``candidate_widths``;
        groups not named keep their start): the hard network keeps them, and the soft
        network's mass sits around them (finite logits, so the search moves on from there).
        Call it before the trainer is built. E.g. :func:`uniform_widths`, to search from
        the allocation of uniform pruning instead of from the full network."""
        self._check_widths(widths)
        search = self.search
        allowed = self.candidate_widths()

        def target(i: int, width: int) -> float | None:
            """The expected width to aim at: H rounds E to the nearest allowed width
            (round_to), so the width itself (the full width, which E reaches only with
            infinite logits: a quarter of the way down to the next allowed width); or up to
            the next candidate (SPEC), so the middle of the interval that rounds up to it
            (None: below the smallest)."""
            candidates = search.candidates[i][search.real_candidate[i]].tolist()
            below = max((c for c in candidates if c < width), default=None)
            if bool(search.nearest[i]):
                lower = [w for w in allowed[self.groups[i].name] if w < width]
                if width < max(candidates) or not lower:
                    return float(width)
                return 0.25 * lower[-1] + 0.75 * width
            return None if below is None else 0.5 * (below + width)

        index = {g.name: i for i, g in enumerate(self.groups)}
        targets = {name: target(index[name], w) for name, w in widths.items()}
        stuck = [n for n, t in targets.items() if t is None]
        if stuck:  # E, an average of the candidates, only gets there with infinite logits
            raise ValueError("the search cannot start at " + ", ".join(
                f"{n} = {widths[n]} (its smallest width)" for n in stuck) +
                "; start those groups one width wider")  # fmt: skip

        def fill(i: int, logits: torch.Tensor) -> None:
            name = self.groups[i].name
            if name in targets:
                candidates = search.candidates[i][search.real_candidate[i]].tolist()
                logits.copy_(search.temperature * M.peaked_logits(candidates, targets[name]))

        saved = self._with_logits(fill)
        kept = self.kept_widths()
        moved = {n: (w, kept[n]) for n, w in widths.items() if kept[n] != w}
        if moved:  # (never, for widths candidate_widths offers)
            self._restore_logits(saved)
            raise RuntimeError(f"the hard network keeps {({n: k for n, (_, k) in moved.items()})}"
                               f", not {({n: w for n, (w, _) in moved.items()})}")  # fmt: skip

    def _check_widths(self, widths: dict[str, int]) -> None:
        """Refuse a group name the pruner has not, or a width its group cannot keep."""
        choices = self.candidate_widths()
        unknown = sorted(set(widths) - set(choices))
        if unknown:
            raise ValueError(f"no channel group named {', '.join(map(repr, unknown))}; the "
                             f"groups are {', '.join(choices)}")  # fmt: skip
        for name, width in widths.items():
            if width not in choices[name]:
                raise ValueError(f"group {name!r} cannot keep {width} channels; its widths "
                                 f"are {choices[name]}")  # fmt: skip

    def _with_logits(self, fill: Callable[[int, torch.Tensor], None]) -> list[torch.Tensor]:
        """Set every group's width logits with ``fill(i, u)``; returns the saved values."""
        saved = [u.detach().clone() for u in self.mask_parameters()]
        with torch.no_grad():
            for i, u in enumerate(self.mask_parameters()):
                fill(i, u)
        return saved

    def _restore_logits(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for u, value in zip(self.mask_parameters(), saved, strict=True):
                u.copy_(value)

    def _calibrate_latency(self, tolerance: float = 0.02, iterations: int = 3) -> None:
        """Before the search: measure the smallest network (``latency_floor``, the lowest
        latency ratio reachable, whatever the tables say), then refit the latency model at
        the widths the budgets project to, until its prediction there is within
        ``tolerance`` of the measurement."""

        def smallest(i: int, u: torch.Tensor) -> None:
            u.fill_(-30.0)
            u[0] = 30.0

        saved = self._with_logits(smallest)
        try:
            with torch.no_grad():
                self.latency_floor = self.latency.measure_ratio(self.model, self.export().eval())
            target = self.budgets.get("latency")
            if target is not None and target < self.latency_floor:
                raise BudgetError(
                    f"target_latency={target:g} is below the latency ratio of this model's "
                    f"smallest network, measured at {self.latency_floor:.3f} on "
                    f"{self.latency.device} at batch {self.latency.batch_size}: narrow layers "
                    "stop getting faster here. Choose target_latency >= "
                    f"{self.latency_floor:.2f}, a larger latency batch, or a budget in FLOPs"
                )
            if target is None:
                return
            self._restore_logits(saved)
            for _ in range(iterations):
                project_to_budget(self, tolerance=0.005)
                check = self.calibrate_latency("build")
                miss = abs(check["predicted_ratio_before"] - check["measured_ratio"])
                if D.broadcast_floats([float(miss <= tolerance)])[0]:  # rank 0 decides
                    break
        finally:
            self._restore_logits(saved)

    @torch.no_grad()
    def _skip_slow_widths(self) -> dict[str, list[int]]:
        """Drop, per group, the hard widths the latency tables price above some wider width
        (the other groups at full width): keeping more channels for less time is free. The
        tables judge this whatever feature steers the search (a FLOPs-shaped cost is
        monotone and would never skip); a latency model without tables uses its cost."""
        price = getattr(self.latency, "table_cost", self.latency.cost)
        full = self.resources.channels.to(torch.float64)
        allowed, skipped = [], {}
        for i, g in enumerate(self.groups):
            widths = sorted({int(w) for w in self.search.hard_candidates[i].tolist()})
            costs = []
            for width in widths:
                probe = full.clone()
                probe[i] = width
                costs.append(float(price(probe)))
            keep = [w for k, w in enumerate(widths) if all(costs[k] < c for c in costs[k + 1 :])]
            allowed.append(keep)
            if len(keep) < len(widths):
                skipped[g.name] = sorted(set(widths) - set(keep))
        self.search.restrict_hard_widths(allowed)
        return skipped

    def min_ratio(self, resource: str = "flops") -> float:
        """A resource's ratio with every group at its smallest hard width (the smallest
        candidate, rounded to ``round_to``)."""
        smallest = self.search.hard_widths_of(self.search.candidates[:, 0])
        cost, full = self._cost(resource)
        if resource == "latency" and self.latency_floor is not None:
            return self.latency_floor  # measured beats predicted
        return float(cost(smallest) / full)

    def min_flops_ratio(self) -> float:
        return self.min_ratio("flops")

    def kept_widths(self) -> dict[str, int]:
        """Hard width of every group, by group name."""
        widths = self.search.hard_widths().detach().round().long().tolist()
        return {g.name: w for g, w in zip(self.groups, widths, strict=True)}

    def candidate_widths(self) -> dict[str, list[int]]:
        """Every width the hard network can keep, per group name (ascending): the search's
        candidates, or with ``round_to`` every multiple of it from the smallest candidate's
        up (and the full width), less the widths skipped as slow."""
        search = self.search
        lowest = search.hard_widths_of(search.candidates[:, 0]).round().long().tolist()
        return {g.name: sorted({w for w in search.hard_candidates[i].round().long().tolist()
                                if w >= lowest[i]})
                for i, g in enumerate(self.groups)}  # fmt: skip

    @contextlib.contextmanager
    def aiming_at(self, budgets: dict[str, float]) -> Iterator[None]:
        """Within the block the resource terms (``resource_loss``, ``budget_excess``,
        :func:`project_to_budget`) aim at ``budgets`` (name -> ratio; those not named keep
        their targets) instead of the targets: a search's descent, or the latency check's
        corrected aim. The targets are restored afterwards."""
        targets = self.budgets
        self.budgets = {**targets, **budgets}
        try:
            yield
        finally:
            self.budgets = targets

    @contextlib.contextmanager
    def at_widths(self, widths: dict[str, int]) -> Iterator[None]:
        """Within the block, the hard network keeps ``widths`` (group name -> one of its
        ``candidate_widths``; groups not named keep their own): export, time or evaluate a
        chosen architecture, e.g. a finished run's ``kept_widths``. The width logits are
        restored afterwards."""
        self._check_widths(widths)
        search = self.search

        def fill(i: int, logits: torch.Tensor) -> None:
            """Logits whose expected width lands on the width: one candidate, or (a width
            round_to allows between two candidates) a mix of the two around it."""
            width = widths.get(self.groups[i].name)
            if width is None:
                return
            candidates = search.candidates[i][search.real_candidate[i]].tolist()
            logits.fill_(float("-inf"))
            if width in candidates:
                logits[candidates.index(width)] = 0.0
                return
            above = next(k for k, c in enumerate(candidates) if c > width)
            low, high = candidates[above - 1], candidates[above]
            share = (width - 0.01 - low) / (high - low)  # just below: rounds to the width
            logits[above - 1] = search.temperature * math.log(1.0 - share)
            logits[above] = search.temperature * math.log(share)

        saved = self._with_logits(fill)
        try:
            kept = self.kept_widths()
            moved = {n: kept[n] for n, w in widths.items() if kept[n] != w}
            if moved:  # (never, for widths candidate_widths offers)
                raise RuntimeError(f"the hard network keeps {moved}, not "
                                   f"{({n: widths[n] for n in moved})}")  # fmt: skip
            yield
        finally:
            self._restore_logits(saved)

    def kept_channels(self) -> dict[str, list[int]]:
        """Channel indices each group keeps in the hard network (its H most important)."""
        kept = {}
        for i, (g, width) in enumerate(zip(self.groups, self.kept_widths().values(), strict=True)):
            ranks = self.search.group_ranks(i)
            kept[g.name] = sorted(torch.nonzero(ranks < width).flatten().tolist())
        return kept

    # ----------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """A new, physically pruned copy of the model: exactly the current hard network."""
        model = copy.deepcopy(self.model)
        if self._separate_hard_stats:  # the copy gets the hard network's statistics
            modules = dict(model.named_modules())
            for name, stats in self.hard_stats.items():
                for buffer, tensor in stats.items():
                    setattr(modules[name], buffer, tensor.clone())
        return prune_copy(model, self.example_inputs, self.groups,
                          list(self.kept_channels().values()), copy_model=False)  # fmt: skip

    @torch.no_grad()
    def prune_like_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-weight tensors of the model (by parameter name, each of its parameter's shape,
        e.g. an optimizer's momentum) sliced exactly as :meth:`export` slices the weights:
        they ride through an export as the weights of a copy, so the same pruning functions
        keep the same channels."""
        carrier = copy.deepcopy(self.model)
        params = dict(carrier.named_parameters())
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
        pruned = prune_copy(carrier, self.example_inputs, self.groups,
                            list(self.kept_channels().values()), copy_model=False)  # fmt: skip
        kept = dict(pruned.named_parameters())
        return {name: kept[name].detach().clone() for name in tensors}


def _dependency_groups(graph, groups: list[ChannelGroup], layers: dict[str, nn.Module]) -> dict:
    """torch-pruning's dependency group of every channel group whose channels are its root
    layer's output channels (not heads, not grouped-conv units), by the group's index."""
    found = {}
    with index_mapping_once():
        for i, g in enumerate(groups):
            if g.kind == "channels" and not g.root_units:
                root = layers[g.root_module]
                handler = graph.get_pruner_of_module(root).prune_out_channels
                found[i] = graph.get_pruning_group(root, handler, list(range(g.channels)))
    return found


def startable_widths(pruner: S2HPruner) -> dict[str, list[int]]:
    """Per group, the widths :meth:`S2HPruner.start_at` can set: every candidate width, but
    a group whose hard width rounds up (SPEC) not its smallest, which E (an average of the
    candidates) reaches only with infinite logits."""
    return {name: ws[1:] if not bool(nearest) and len(ws) > 1 else ws
            for (name, ws), nearest in zip(pruner.candidate_widths().items(),
                                           pruner.search.nearest, strict=True)}  # fmt: skip


def uniform_widths(pruner: S2HPruner) -> dict[str, int]:
    """The widths that keep about the same share of every group, the largest share whose
    hard network meets every budget: the allocation of uniform pruning (torch-pruning's
    uniform ``pruning_ratio``), a search's start from a trained model. A group whose hard
    width rounds up (SPEC) keeps at least its second-smallest width: E, an average of the
    candidates, never reaches the smallest with finite logits (:meth:`S2HPruner.start_at`)."""
    choices = startable_widths(pruner)
    channels = {g.name: g.channels for g in pruner.groups}

    def at(share: float) -> dict[str, int]:
        return {name: next((w for w in ws if w >= share * channels[name] - 1e-6), ws[-1])
                for name, ws in choices.items()}  # fmt: skip

    def excess(share: float) -> float:
        with pruner.at_widths(at(share)):
            return float(pruner.budget_excess("hard").detach())

    if excess(0.0) > 0:
        raise BudgetError("no uniform share of the groups meets the budget: every group at "
                          "the smallest width it can start at is still over it; set a larger "
                          "target or start the search from the full network")  # fmt: skip
    lo, hi = 0.0, 1.0  # excess(lo) <= 0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if excess(mid) <= 0:
            lo = mid
        else:
            hi = mid
    return at(lo)


def project_to_budget(
    pruner: S2HPruner, tolerance: float, lr: float = 0.02, max_steps: int = 5000,
    patience: int = 1000,
) -> int:
    """Move the width logits, on the resource loss alone, until every budget's hard ratio is
    met (the binding one within ``tolerance`` of its target). Used once when the widths
    freeze, so that the exported model always meets the budget; during a healthy search it
    does nothing. Where these steps stall (after ``patience`` steps without getting closer),
    the closest widths seen are walked on one width at a time (:func:`_walk_widths_to_budget`).
    Returns the steps and moves taken (0: untouched). Works under ``torch.no_grad()`` too
    (an export to evaluate)."""
    with torch.enable_grad():
        return _project_to_budget(pruner, tolerance, lr, max_steps, patience)


def _project_to_budget(pruner: S2HPruner, tolerance: float, lr: float, max_steps: int,
                       patience: int) -> int:  # fmt: skip
    masks = pruner.mask_parameters()
    optimizer = torch.optim.Adam(masks, lr=lr)
    best = (float("inf"), [u.detach().clone() for u in masks], 0)
    for step in range(max_steps):
        excess = pruner.budget_excess("hard")  # straight-through gradient to E
        error = abs(float(excess.detach()))
        if error < best[0]:
            best = (error, [u.detach().clone() for u in masks], step)
        if error <= tolerance:
            return step
        if step - best[2] > patience:
            break
        optimizer.zero_grad()
        (excess**2).backward(inputs=masks)
        optimizer.step()
    with torch.no_grad():
        for u, kept in zip(masks, best[1], strict=True):
            u.copy_(kept)
    return step + 1 + _walk_widths_to_budget(pruner, tolerance)


def _walk_widths_to_budget(pruner: S2HPruner, tolerance: float, max_moves: int = 1000) -> int:
    """Where steps on the logits stall off the budget (coarse widths: with ``round_to`` one
    step of a residual group moves the FLOPs by several percent), walk on the kept widths
    themselves: each move takes one group one width narrower or wider, the move that brings
    the binding budget closest to its target, until within ``tolerance`` or no move gets
    closer. Returns the moves made."""
    start = pruner.kept_widths()
    movable = startable_widths(pruner)  # a group at a width it cannot be set to may stay there

    def error(moved: dict[str, int]) -> float:  # (only moved groups: any kept width stays)
        with pruner.at_widths(moved):
            return abs(float(pruner.budget_excess("hard").detach()))

    moved: dict[str, int] = {}
    best, moves = error(moved), 0
    while best > tolerance and moves < max_moves:
        options = []
        for name, ws in movable.items():
            width = moved.get(name, start[name])
            narrower, wider = [w for w in ws if w < width], [w for w in ws if w > width]
            for w in narrower[-1:] + wider[:1]:
                options.append((error({**moved, name: w}), name, w))
        if not options or min(options)[0] >= best:
            break
        best, name, w = min(options)
        moved[name] = w
        moves += 1
    moved = {n: w for n, w in moved.items() if w != start[n]}
    if moved:
        saved = [u.detach().clone() for u in pruner.mask_parameters()]
        try:
            pruner.start_at(moved)
        except (ValueError, RuntimeError) as failure:  # the widths as the steps left them
            pruner._restore_logits(saved)
            warnings.warn(f"could not set the widths closer to the budget ({failure})",
                          stacklevel=2)  # fmt: skip
            return 0
    return moves


def _working_groups(model: nn.Module, example_inputs, groups: list[ChannelGroup],
                    params_budget: bool = False):  # fmt: skip
    """The groups whose channels can really be removed: one that breaks the narrowed
    forward (a channel count fixed in the model's code), whose exported model is not the
    hard network, or whose FLOPs (parameters, for a parameter budget) the resource model does
    not predict, is left out with a warning naming the layer that failed (issue 16: fail at
    build time, not in the hard pass or export, and never miss the budget silently)."""
    modules = dict(model.named_modules())
    outside = [g for g in groups if _producer_out_of_range(g, modules)]
    for g in outside:
        piece = _producer_out_of_range(g, modules)
        rows = producer_weight(modules[piece]).shape[0]
        _left_out(g, f"its channel map points past the {rows} output channels of {piece!r} "
                     "(a mapping torch-pruning got wrong)")  # fmt: skip
    groups = [g for g in groups if not any(g is o for o in outside)]
    bad = failing_groups(model, example_inputs, groups, modules)
    for i, error in bad.items():
        _left_out(groups[i], f"the network with its channels removed fails at {error}")
    first = next(iter(bad.items()), None)
    first = None if first is None else (groups[first[0]].name, f"fails at {first[1]}")
    groups = [g for i, g in enumerate(groups) if i not in bad]
    resources = ResourceModel(model, example_inputs, groups) if groups else None
    bad = export_failures(model, example_inputs, groups, resources=resources,
                          count_params=params_budget)  # fmt: skip
    for i, error in bad.items():
        _left_out(groups[i], f"the model exported with its channels removed gives {error}")
    if bad and first is None:
        i, error = next(iter(bad.items()))
        first = (groups[i].name, f"exports to {error}")
    kept = [g for i, g in enumerate(groups) if i not in bad]
    if not kept and first is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no channel group that can be pruned exactly: "
            "narrowed, every one breaks the model's own code, changes its output or costs "
            f"FLOPs s2hpruner cannot model (e.g. group {first[0]!r} {first[1]}): replace the "
            "layer named there with a standard one (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, "
            "nn.MultiheadAttention) or prune another model"
        )
    return kept


def _left_out(group: ChannelGroup, reason: str) -> None:
    """Warn that ``group`` is left out of the search (its channels kept), and why."""
    warnings.warn(
        f"group {group.name!r} is left out of the search: {reason}; its channels are kept "
        f"(list {group.root_module!r} in ignored_layers to silence this)",
        stacklevel=4,
    )


def _producer_out_of_range(group: ChannelGroup, modules: dict[str, nn.Module]) -> str | None:
    """The first producer whose mapped channel indices exceed its weight's rows, if any."""
    for piece in group.producers:
        rows = producer_weight(modules[piece.module_name]).shape[0]
        if piece.module_idxs and max(piece.module_idxs) >= rows:
            return piece.module_name
    return None


def _fraction(name: str, value: float) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise BudgetError(
            f"target_{name} must be a fraction of the full model's {name} in (0, 1], got {value}"
        )
    return float(value)
