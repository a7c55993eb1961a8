"""S2HPruner: the width search over a wrapped model, its three forward modes, and export.

The pruner owns the width logits u (one per channel group). Inside ``pruner.mode("soft")`` the
model's forward multiplies each group's channels by the relaxed mask w(u); inside
``pruner.mode("hard")`` by the hard mask m_hat(u); ``"full"`` (and outside any mode) runs the
model untouched. The masks are attached as forward hooks only while the context is open (on a
BatchNorm they are folded into its affine parameters), so the wrapped model stays a plain
``nn.Module`` and ``export()`` can copy it.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import masks as M
from .errors import BudgetError, UnsupportedModelError
from .groups import ChannelGroup, build_graph, find_groups, module_channel_dim
from .resources import ResourceModel
from .sliced import SlicedHardForward, attach_mask, unsliceable_modules
from .transformers import prune_heads

MODES = ("full", "soft", "hard")


class WidthSearch(nn.Module):
    """The learnable width logits of every group, and the constant tables the masks need.

    Groups differ in channels and candidates, so the tables are padded to the largest group
    (padded candidates repeat the group's largest one and get probability 0): the widths and
    masks of all groups then take a handful of batched ops per step instead of a loop.
    Channels of all groups are also numbered in one flat index (group by group).

    ``round_to`` m makes every hard width of a channel group a multiple of m (or the group's
    full width): H is the such width nearest to E (rounding up, as the SPEC's H does for the
    fine candidates, would make the hard network up to m - 1 channels a group wider than the
    soft one). The search keeps its fine candidates; only the kept widths snap to what vector
    units and tensor cores run at full speed (as torch-pruning's ``round_to``). Head groups
    keep theirs.
    """

    def __init__(
        self, groups: list[ChannelGroup], temperature: float = 1.0, round_to: int | None = None
    ):
        super().__init__()
        self.temperature = temperature
        self.logits = nn.ParameterList(
            [nn.Parameter(M.initial_logits(g.candidates, g.step)) for g in groups]
        )
        n_cand = max(len(g.candidates) for g in groups)
        n_chan = max(g.channels for g in groups)
        candidates = torch.stack(
            [torch.tensor(g.candidates + g.candidates[-1:] * (n_cand - len(g.candidates)),
                          dtype=torch.float32) for g in groups]
        )  # fmt: skip
        hard = [_hard_widths(g, round_to) for g in groups]
        n_hard = max(len(h) for h in hard)
        hard_candidates = torch.stack(
            [torch.tensor(h + h[-1:] * (n_hard - len(h)), dtype=torch.float32) for h in hard]
        )
        real = torch.stack([torch.arange(n_cand) < len(g.candidates) for g in groups])
        first = M.first_keeping(candidates, n_chan)  # padding candidates have p = 0
        channels = torch.tensor([g.channels for g in groups])
        group_of = torch.repeat_interleave(torch.arange(len(groups)), channels)
        offsets = torch.cumsum(channels, 0) - channels
        self.register_buffer("candidates", candidates)  # (G, K)
        # (G, K'): the widths H may take, and whether H rounds to the nearest of them (round_to)
        # or up (SPEC); derived from round_to, so not in the state dict
        self.register_buffer("hard_candidates", hard_candidates, persistent=False)
        nearest = [round_to is not None and g.kind != "heads" for g in groups]
        self.register_buffer("nearest", torch.tensor(nearest), persistent=False)
        self.any_nearest = any(nearest)  # a Python bool: no device sync on the hot path
        self.register_buffer("real_candidate", real)  # (G, K) bool
        self.register_buffer("first", first, persistent=False)  # (G, C): see M.first_keeping
        self.register_buffer("group_of", group_of)  # flat channel -> group
        self.register_buffer("offsets", offsets)  # group -> its first flat channel
        self.register_buffer("ranks", torch.arange(len(group_of)) - offsets[group_of])  # flat
        self.sizes = channels.tolist()

    def group_ranks(self, i: int) -> torch.Tensor:
        """Rank of each channel of group ``i`` (0 = most important)."""
        return self.ranks[self.offsets[i] : self.offsets[i] + self.sizes[i]]

    def probabilities(self) -> torch.Tensor:
        """p (G, K): softmax of each group's logits over its own candidates."""
        logits = torch.cat(list(self.logits))
        padded = torch.full(
            self.candidates.shape, float("-inf"), device=logits.device, dtype=logits.dtype
        ).masked_scatter(self.real_candidate, logits)
        return M.width_probabilities(padded, self.temperature)

    def expected_widths(self) -> torch.Tensor:
        """E_g for every group, differentiable in the logits."""
        return M.expected_width(self.probabilities(), self.candidates)

    def hard_widths(self) -> torch.Tensor:
        """H_g for every group (straight-through gradient to E_g)."""
        return self.hard_widths_of(self.expected_widths())

    def hard_widths_of(self, expected: torch.Tensor) -> torch.Tensor:
        """H for given expected widths: the SPEC's d * ceil(E / d), or the nearest multiple
        of round_to for the groups it applies to (both straight-through)."""
        ceil = M.hard_width(expected, self.hard_candidates)
        if not self.any_nearest:
            return ceil
        return torch.where(self.nearest, M.nearest_width(expected, self.hard_candidates), ceil)

    def flat_masks(self, mode: str) -> torch.Tensor:
        """The relaxed ("soft") or hard mask of every channel, in the flat channel index."""
        probs = self.probabilities()
        relaxed = M.relaxed_mask_by_index(probs, self.first)  # (G, C) by rank
        if mode == "hard":
            hard = self.hard_widths_of(M.expected_width(probs, self.candidates))
            relaxed = M.hard_mask(relaxed, hard.detach().round())
        return relaxed.flatten()[self.group_of * relaxed.shape[1] + self.ranks]

    def __len__(self) -> int:
        return len(self.logits)


def _hard_widths(group: ChannelGroup, round_to: int | None) -> list[int]:
    """The widths a group's hard network may keep: its candidates, or with ``round_to`` m the
    multiples of m below its full width, and the full width."""
    if round_to is None or group.kind == "heads":
        return list(group.candidates)
    return list(range(round_to, group.channels, round_to)) + [group.channels]


class S2HPruner:
    """Differentiable width search with soft and hard masks over a model's channel groups.

    Args:
        model: the network to prune; it is not modified (masks act through temporary hooks).
        example_inputs: a batch (or tuple of inputs) used to trace the model and count FLOPs.
        target_flops: the budget rho*, a fraction of the full model's FLOPs in (0, 1].
        width_step: channel step d of every group (default: smallest divisor with <= 32 widths).
        round_to: make every kept (hard) width a multiple of this, or the group's full width
            (e.g. 8 or 16 for fast kernels); the search itself keeps the step ``width_step``.
        ignored_layers: modules (or their names) whose output channels are never pruned; the
            classifier is always ignored.
        temperature: tau of p = softmax(u / tau); constant, never annealed.
        separate_hard_bn_stats: keep the hard network's BatchNorm running statistics apart
            from the soft network's (the two see different activations); the exported model
            gets the hard ones. Off for DMP, which never runs the hard network in training.
        sliced_hard: run the hard network on the kept channels only (sliced.py), when every
            layer of the groups allows it; else the masked forward is used.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        target_flops: float = 0.35,
        width_step: int | None = None,
        round_to: int | None = None,
        ignored_layers: Iterable[nn.Module | str] = (),
        temperature: float = 1.0,
        max_candidates: int = 32,
        separate_hard_bn_stats: bool = False,
        sliced_hard: bool = True,
    ):
        if not 0.0 < float(target_flops) <= 1.0:
            raise BudgetError(
                f"target_flops must be a fraction of the full FLOPs in (0, 1], got {target_flops}"
            )
        self.model = model
        self.example_inputs = example_inputs
        self.target_flops = float(target_flops)
        groups, _ = find_groups(model, example_inputs, width_step, ignored_layers, max_candidates)
        self.groups = [g for g in groups if len(g.candidates) > 1]
        if not self.groups:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no prunable channel group (every conv/linear is "
                "ignored, fixed, or has a single candidate width); nothing to search"
            )
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be >= 1 (or None), got {round_to}")
        self.round_to = round_to
        self.search = WidthSearch(self.groups, temperature, round_to)
        self.resources = ResourceModel(model, example_inputs, self.groups)
        self.freeze_ranks = False
        self._modules = dict(model.named_modules())
        self._sites = self._site_index()
        self._importance_index = self._importance_plan()
        self.hard_bn_stats = _copy_bn_stats(model) if separate_hard_bn_stats else None
        self.unsliceable = unsliceable_modules(self.groups, self._modules)
        self._sliced = None if self.unsliceable else SlicedHardForward(self.groups, self._modules)
        self.sliced_hard = sliced_hard and self._sliced is not None
        self.hard_layout: torch.memory_format | None = None  # None: the model's own
        self.hard_nchw_norms = True  # narrow channels_last BatchNorms train in NCHW (sliced.py)
        device = next(model.parameters()).device
        self.to(device)
        self.update_ranks(force=True)
        minimum = self.min_flops_ratio()
        if self.target_flops < minimum:
            raise BudgetError(
                f"target_flops={self.target_flops:g} is below the smallest FLOPs ratio this model "
                f"can reach with its candidate widths ({minimum:.4f}); choose a target >= "
                f"{minimum:.4f} or a smaller width_step (or round_to)"
            )

    # ----------------------------------------------------------------- state
    def to(self, device: torch.device | str) -> S2HPruner:
        self.search.to(device)
        self.resources.to(device)
        self._sites = {k: (idx.to(device), dim) for k, (idx, dim) in self._sites.items()}
        self._importance_index = [(n, i.to(device)) for n, i in self._importance_index]
        self._importance_dest = self._importance_dest.to(device)
        self._producer_count = self._producer_count.to(device)
        if self._sliced is not None:
            self._sliced.to(device)
        if self.hard_bn_stats is not None:
            self.hard_bn_stats = {
                k: {b: t.to(device) for b, t in v.items()} for k, v in self.hard_bn_stats.items()
            }
        return self

    def mask_parameters(self) -> list[nn.Parameter]:
        """The width logits u, one ``nn.Parameter`` per group (give them their own optimizer)."""
        return list(self.search.logits)

    def state_dict(self) -> dict:
        return {
            "search": self.search.state_dict(),
            "freeze_ranks": self.freeze_ranks,
            "hard_bn_stats": self.hard_bn_stats,
            "groups": [(g.name, g.channels, g.candidates) for g in self.groups],
            "round_to": self.round_to,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = [(g.name, g.channels, g.candidates) for g in self.groups]
        theirs = [tuple(x) for x in state["groups"]]
        if [(n, c, list(k)) for n, c, k in theirs] != mine:
            raise ValueError("pruner state belongs to a model with other channel groups")
        if state.get("round_to") != self.round_to:
            raise ValueError(
                f"pruner state was saved with round_to={state.get('round_to')}, this pruner has "
                f"round_to={self.round_to}"
            )
        search = {k: v for k, v in state["search"].items() if k != "keep"}  # pre-0.1.1 table
        self.search.load_state_dict(search)
        self.freeze_ranks = state["freeze_ranks"]
        if state.get("hard_bn_stats") is not None:
            device = self.resources.channels.device
            self.hard_bn_stats = {
                k: {b: t.to(device) for b, t in v.items()}
                for k, v in state["hard_bn_stats"].items()
            }

    # ------------------------------------------------------------ importance
    def _importance_plan(self) -> list[tuple[str, torch.Tensor]]:
        """Which channels of which producer feed which flat group channel, gathered once."""
        sources, dest = [], []
        for gi, g in enumerate(self.groups):
            for piece in g.producers:
                sources.append((piece.module_name, torch.tensor(piece.module_idxs)))
                flat = torch.tensor(piece.root_idxs) + int(self.search.offsets[gi])
                dest.append(flat)
        self._importance_dest = torch.cat(dest)
        self._producer_count = torch.tensor(
            [float(len(g.producers)) for g in self.groups]
        )[self.search.group_of]
        return sources

    @torch.no_grad()
    def update_ranks(self, force: bool = False) -> None:
        """Rank each group's channels by the L1 norm of their producers' weights (rank 0 first).

        Called once per training step; a no-op when ``freeze_ranks`` is set (unless forced).
        """
        if self.freeze_ranks and not force:
            return
        self.search.ranks.copy_(
            M.grouped_ranks(self.importance(), self.search.group_of, self.search.offsets)
        )

    def importance(self) -> torch.Tensor:
        """Per flat group channel: mean over the group's producers of its L1 weight norm."""
        norms: dict[str, torch.Tensor] = {}
        for name, _ in self._importance_index:
            if name not in norms:
                weight = self._modules[name].weight.detach().flatten(1)
                norms[name] = torch.linalg.vector_norm(weight, ord=1, dim=1)
        source = torch.cat([norms[name][index] for name, index in self._importance_index])
        total = torch.zeros_like(self._producer_count, dtype=source.dtype)
        return total.index_add_(0, self._importance_dest, source) / self._producer_count

    # ----------------------------------------------------------------- masks
    def relaxed_masks(self) -> list[torch.Tensor]:
        """w per group, indexed by channel (not rank)."""
        return list(self.search.flat_masks("soft").split(self.search.sizes))

    def hard_masks(self) -> list[torch.Tensor]:
        """m_hat per group, indexed by channel: value 0/1, gradient only through kept channels."""
        return list(self.search.flat_masks("hard").split(self.search.sizes))

    def _site_index(self) -> dict[str, tuple[torch.Tensor, int]]:
        """For every module output a mask acts on: which entry of the concatenated group masks
        (or the trailing constant 1) multiplies each of its channels."""
        offsets = self.search.offsets.tolist()  # first flat channel of each group
        ones_index = len(self.search.group_of)
        sites: dict[str, torch.Tensor] = {}
        for gi, g in enumerate(self.groups):
            for piece in g.mask_sites:
                module = self._modules[piece.module_name]
                size = _out_channels(module)
                index = sites.setdefault(piece.module_name, torch.full((size,), ones_index))
                index[torch.tensor(piece.module_idxs)] = torch.tensor(piece.root_idxs) + offsets[gi]
        return {n: (idx, module_channel_dim(self._modules[n])) for n, idx in sites.items()}

    def flat_masks(self, mode: str) -> torch.Tensor:
        """All groups' masks for ``mode`` ("soft" or "hard") in one vector, plus a trailing 1
        that layers' channels outside any group point to."""
        masks = self.search.flat_masks(mode)
        return torch.cat([masks, torch.ones(1, device=masks.device)])

    @contextlib.contextmanager
    def mode(self, mode: str, sliced: bool | None = None) -> Iterator[None]:
        """Forward the wrapped model inside this context to get the ``mode`` network.

        In "hard" mode, ``sliced`` (default: ``self.sliced_hard``) computes only the kept
        channels; ``sliced=False`` is the masked reference path. Both give the same network.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        if mode == "full":
            yield
            return
        flat = self.flat_masks(mode)
        sliced = self.sliced_hard if sliced is None else sliced
        if sliced and self._sliced is None:
            raise UnsupportedModelError(
                f"no sliced hard forward for this model (layers {self.unsliceable}); "
                "use the masked one"
            )
        swap = mode == "hard" and self.hard_bn_stats is not None
        if swap:
            self._swap_bn_stats()
        try:
            if mode == "hard" and sliced:
                keep = flat.detach() > 0.5
                with self._sliced.apply(
                    keep, flat, self._sites, self.hard_layout, self.hard_nchw_norms
                ):
                    yield
            else:
                handles = []
                for name, (index, dim) in self._sites.items():
                    handles += attach_mask(self._modules[name], flat[index], dim)
                try:
                    yield
                finally:
                    for h in handles:
                        h.remove()
        finally:
            if swap:
                self._swap_bn_stats()

    def tune_hard_layout(
        self, inputs: torch.Tensor, repeats: int = 3
    ) -> torch.memory_format | None:
        """Time the sliced hard network's training pass (forward and backward) in NCHW, in
        channels_last, and in channels_last with narrow BatchNorms left in channels_last too
        (``hard_nchw_norms=False``), and run ``mode("hard")`` in the fastest from now on, as
        ``cudnn.benchmark`` does for conv algorithms. Which is fastest depends on the kept
        widths, the feature map sizes and the kernels (``benchmarks/kernels.py``). All compute
        the same network; weights, gradients, BatchNorm statistics and the RNG are left as
        they were. Returns the chosen layout."""
        if not self.sliced_hard or not torch.is_tensor(inputs) or inputs.dim() != 4:
            return self.hard_layout
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += self.mask_parameters()
        stats = list(self.model.buffers())
        if self.hard_bn_stats is not None:
            stats += [t for v in self.hard_bn_stats.values() for t in v.values()]
        saved = [t.clone() for t in stats]
        cuda = inputs.device.type == "cuda"

        def training_pass() -> float:
            if cuda:
                torch.cuda.synchronize(inputs.device)
            start = time.perf_counter()
            with self.mode("hard"):
                out = self.model(inputs)
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
            if cuda:
                torch.cuda.synchronize(inputs.device)
            return time.perf_counter() - start

        # (layout, narrow BatchNorms in NCHW); the flag only matters for channels_last
        variants = [(torch.contiguous_format, True), (torch.channels_last, True),
                    (torch.channels_last, False)]
        times: dict = {variant: [] for variant in variants}
        previous = (self.hard_layout, self.hard_nchw_norms)
        try:
            with torch.random.fork_rng(devices=[inputs.device] if cuda else []):
                for round_ in range(repeats + 1):  # the first round warms up
                    for variant in variants:  # interleaved: all see the same machine load
                        self.hard_layout, self.hard_nchw_norms = variant
                        elapsed = training_pass()
                        if round_:
                            times[variant].append(elapsed)
        except BaseException:
            self.hard_layout, self.hard_nchw_norms = previous
            raise
        finally:
            with torch.no_grad():
                for tensor, value in zip(stats, saved, strict=True):
                    tensor.copy_(value)
        best = min(variants, key=lambda variant: statistics.median(times[variant]))
        self.hard_layout, self.hard_nchw_norms = best
        return self.hard_layout

    def _swap_bn_stats(self) -> None:
        """Exchange the model's BatchNorm running statistics with the hard network's."""
        for name, stats in self.hard_bn_stats.items():
            buffers = self._modules[name]._buffers  # setattr's checks cost ~20 us a buffer
            for buffer, tensor in stats.items():
                stats[buffer], buffers[buffer] = buffers[buffer], tensor

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

    def flops(self, mode: str = "hard") -> torch.Tensor:
        """FLOPs of the ``mode`` network on the example inputs (soft: differentiable in u)."""
        return self.resources.flops(self.widths(mode))

    def flops_ratio(self, mode: str = "hard") -> torch.Tensor:
        return self.flops(mode) / self.resources.full_flops

    @torch.no_grad()
    def ratio(self, mode: str = "hard") -> float:
        """FLOPs ratio of ``mode`` as a plain number (for logs and checks)."""
        return float(self.flops_ratio(mode))

    def params(self, mode: str = "hard") -> torch.Tensor:
        return self.resources.params(self.widths(mode))

    def min_flops_ratio(self) -> float:
        """FLOPs ratio with every group at its smallest hard width (the smallest candidate,
        rounded to ``round_to``)."""
        smallest = self.search.hard_widths_of(self.search.candidates[:, 0])
        return float(self.resources.flops(smallest) / self.resources.full_flops)

    def kept_widths(self) -> dict[str, int]:
        """Hard width of every group, by group name."""
        widths = self.search.hard_widths().detach().round().long().tolist()
        return {g.name: w for g, w in zip(self.groups, widths, strict=True)}

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
        pruned = copy.deepcopy(self.model)
        if self.hard_bn_stats is not None:
            modules = dict(pruned.named_modules())
            for name, stats in self.hard_bn_stats.items():
                for buffer, tensor in stats.items():
                    setattr(modules[name], buffer, tensor.clone())
        graph = build_graph(pruned, self.example_inputs)
        modules = dict(pruned.named_modules())
        heads = []
        for g, keep in zip(self.groups, self.kept_channels().values(), strict=True):
            remove = sorted(set(range(g.channels)) - set(keep))
            if not remove:
                continue
            if g.kind == "heads":  # outside torch-pruning's groups: transformers.py
                heads.append((modules[g.root_module], keep))
                continue
            root = modules[g.root_module]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            tp_group = graph.get_pruning_group(root, handler, remove)
            tp_group.prune()
        for module, keep in heads:
            prune_heads(module, keep)
        return pruned


def _out_channels(module: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise UnsupportedModelError(f"cannot tell the channel count of {type(module).__name__}")


def _copy_bn_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            stats[name] = {
                b: getattr(module, b).clone()
                for b in ("running_mean", "running_var", "num_batches_tracked")
            }
    return stats

