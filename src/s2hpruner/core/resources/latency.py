"""Latency resource (HALP-style): per-layer tables measured on the target device.

What is timed: every conv/linear call whose input or output width depends on a group, rebuilt
as a fresh layer of the same type, kernel, stride, padding, dilation, bias (depthwise: in ==
out; a grouped conv keeps its groups, both widths multiples of them) followed by the BatchNorm
that directly consumes its output, if any, in eval mode under no_grad, at the run's batch
size, the call's real input shape and the given memory format.
Each cell of a grid of (input width, output width) is the median over ``rounds`` rounds (the
whole grid in turn, so one noisy moment hits one round of many cells, not one cell) of a
median over ``repeats`` timings after warm-up. Calls with the same signature share one table.

Prediction: the in/out widths of each call follow ResourceModel's rule ``fixed + counts @
(widths / channels)``, looked up by bilinear interpolation (linear extrapolation outside the
grid), so the value is exact at grid points. Tables keep the raw medians (alignment effects are
real), but a noisy non-monotone table would reward growing a width; the gradient is therefore
taken from a monotone version (mean of the upper and lower monotone envelopes, equal to the raw
table when that is monotone) by a straight-through sum. Latency is a staircase in the width
(kernels handle 8 or 16 channels at once), so the slope at a width is the whole jump or
nothing; the pruner therefore has the gradient taken as the secant over the step its kept
widths move by (``price_steps``, e.g. ``round_to``): what a step of the search really saves.

    cost(w) = offset + correction * feature(w)
    feature(w) = uncorrected(w) / uncorrected(full)     (or a proxy such as FLOPs, below)
    uncorrected(w) = tables(w) + fixed * act(w) / act(full)
    fixed = max(measured_full - tables(full), 0)

``fixed`` is the work outside the table layers (ReLUs, residual adds, pooling, unpruned layers,
attention matmuls); it is mostly elementwise on activations, so it is scaled by act(w), the
table layers' output elements (on a 2-core CPU, a constant fixed part over-predicted a
half-width ResNet-20 by 35%, this rule by ~6%). Before any network is measured, ``offset`` is
0 and ``correction = measured_full``. Tables of layers timed alone can miss how a whole
narrow network behaves (per-call overheads, cache effects), so ``fit`` refits offset and
correction on whole exported networks measured against the full one; the pruner measures
them before and during the search and when the widths freeze (measured feedback). Always
``cost(full) == measured_full``. The pruner also offers the FLOPs ratio as a proxy feature,
and ``fit`` keeps whichever feature predicts the measured networks better (leave-one-out).
On a 2-core CPU (``benchmarks.latency_predictors``, 30 random networks per model), the tables
as built predict resnet20 within 3.2% (median) and MobileNetV3 within 2.7%; refitted on 3
networks, tables and FLOPs tie on resnet20 (3.3%) and the tables win on MobileNetV3
(depthwise: 2.3% against 5.6%). (Measured before round 34, when the exported networks of
these greyscale models were timed in NCHW against a channels_last model: ``measure.layout_of``.)
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import distributed as D
from ..index import is_depthwise, width_counts
from ..kinds.grouped import is_grouped
from ..measure import (
    MEMORY_FORMATS,
    hold_freed_cpu_memory,
    in_memory_format,
    latency_ratio,
    median_latency,
    memory_format_of,
)
from ..modes import evaluating
from ..structure import ChannelGroup

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_ALIGN = 8  # channels a CPU/GPU kernel handles at once (AVX2 fp32 lanes, tensor-core tiles)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _as_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """``device`` (default: the model's), with an explicit CUDA index so that it compares."""
    device = torch.device(device) if device is not None else _device_of(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _formatted(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    try:
        return t.contiguous(memory_format=fmt)
    except RuntimeError:  # channels_last on a tensor that is not 4-D
        return t.contiguous()


def _time_cell(cell: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one cell (tests replace this to make tables deterministic)."""
    return median_latency(cell, x, repeats, warmup=2)


def _placed(model: nn.Module, example_inputs: torch.Tensor, batch_size: int,
            device: torch.device | str | None, memory_format: torch.memory_format | None,
            ) -> tuple[nn.Module, torch.Tensor]:  # fmt: skip
    """``model`` on ``device`` in ``memory_format`` (copied only if it must change) and a
    batch of ``batch_size`` copies of the first example in that place and layout."""
    device = _as_device(device, model)
    fmt = memory_format or memory_format_of(model)
    if device != _device_of(model) or not in_memory_format(model, fmt):
        model = copy.deepcopy(model).to(device=device, memory_format=fmt)
    x = example_inputs[:1].expand(batch_size, *example_inputs.shape[1:]).to(device)
    return model, _formatted(x, fmt)


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, batch_size: int,
                    device: torch.device | str | None = None, repeats: int = 20,
                    memory_format: torch.memory_format | None = None) -> float:
    """Median seconds of one eval-mode forward of ``batch_size`` copies of the first example
    (no_grad, after warm-up); the model is copied only if it must change device or layout."""
    model, x = _placed(model, example_inputs, batch_size, device, memory_format)
    return median_latency(model, x, repeats)


def _read_json(path: Path) -> dict:
    """The cache's content; a missing or corrupt file is an empty cache (it is re-measured)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def device_name(device: torch.device) -> str:
    """GPU name, or CPU model name: part of the cache key."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _record_calls(model: nn.Module, example_inputs: torch.Tensor):
    """[(layer, input shape, BatchNorm consuming the output or None, output positions)] for
    every conv/linear call (positions: output elements per channel)."""
    calls: list[list] = []
    outputs: dict[int, tuple[int, torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):

            def pre(mod, args, name=name):
                calls.append([name, tuple(args[0].shape), None, 0])

            def post(mod, args, out):
                outputs[id(out)] = (len(calls) - 1, out)  # keep `out` alive: ids stay unique
                calls[-1][3] = out.numel() // out.shape[-1 if isinstance(mod, nn.Linear) else 1]

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):

            def bn_pre(mod, args):
                if id(args[0]) in outputs:
                    calls[outputs[id(args[0])][0]][2] = mod

            handles.append(module.register_forward_pre_hook(bn_pre))
    try:
        with evaluating(model), torch.no_grad():
            model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _axis(fixed: float, counts, groups: Sequence[ChannelGroup], points: int) -> list[int]:
    """Grid of one width axis, from the smallest-candidate width to full, on reachable widths
    (multiples of the group's step when the axis follows one group).

    Kernels process ``_ALIGN`` channels at a time, so latency is a staircase in the width. When
    the step is finer than that, about half the points are aligned widths and the other half
    the next width after each, so interpolation sees the jump instead of smoothing it."""
    frac = [c / g.channels for c, g in zip(counts, groups, strict=True)]
    full = round(fixed + sum(counts))
    if not any(counts):
        return [full]
    smallest = sum(f * min(g.candidates) for f, g in zip(frac, groups, strict=True))
    low = max(1, round(fixed + smallest))
    used = [i for i, c in enumerate(counts) if c]
    step = frac[used[0]] * groups[used[0]].step if len(used) == 1 and fixed == 0 else 1
    step = int(step) if float(step).is_integer() and step >= 1 else 1
    staircase = step < _ALIGN and points >= 4
    align = math.lcm(step, _ALIGN) if staircase else step
    raw = torch.linspace(low, full, points // 2 + 1 if staircase else max(points, 2)).tolist()
    anchors = {round(v / align) * align for v in raw} - {0}
    grid = {low, full} | {a + step for a in anchors if staircase} | anchors
    return sorted(v for v in grid if low <= v <= full)


def _signature(name: str, module: nn.Module, bn: nn.Module | None, shape: tuple, counts,
               groups: Sequence[ChannelGroup], grid_points: int):
    """What a call's timing depends on (its table's key, grids included), and its width rule
    ``([in_fixed, out_fixed], in_counts, out_counts)``; depthwise convs have one axis, a
    grouped conv's grids hold multiples of its groups (the widths it can be pruned to)."""
    linear = isinstance(module, nn.Linear)
    full_in = module.in_features if linear else module.in_channels
    full_out = module.out_features if linear else module.out_channels
    depthwise = is_depthwise(module)
    ins = [0.0] * len(groups) if depthwise else counts[0]
    fixed = [0.0 if depthwise else full_in - sum(ins), full_out - sum(counts[1])]
    # a grouped conv runs conv group by conv group: its staircase is in the width per group
    g = module.groups if is_grouped(module) else 1
    grids = [[full_out] if depthwise else _axis(fixed[0] / g, [c / g for c in ins], groups,
                                                  grid_points),
             _axis(fixed[1] / g, [c / g for c in counts[1]], groups, grid_points)]
    grids = [[v * g for v in grid] for grid in grids]
    sig = {"layer": type(module).__name__, "input": list(shape), "in": full_in, "out": full_out,
           "bias": module.bias is not None, "bn": bn is not None, "depthwise": depthwise,
           "grids": grids, "dtype": str(module.weight.dtype)}
    if g > 1:  # (the key of every other layer stays as it was: caches hold)
        sig["groups"] = g
    if not linear:
        sig.update(kernel=module.kernel_size, stride=module.stride, padding=module.padding,
                   dilation=module.dilation, padding_mode=module.padding_mode)
    return sig, (fixed, ins, counts[1])


def _cell(module: nn.Module, bn: nn.Module | None, cin: int, cout: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        layer: nn.Module = nn.Linear(cin, cout, module.bias is not None)
    else:
        conv = next(c for c in _LAYERS if isinstance(module, c))
        layer = conv(
            cin, cout, module.kernel_size, module.stride, module.padding, module.dilation,
            groups=module.groups if is_grouped(module) else cout if is_depthwise(module) else 1,
            bias=module.bias is not None,
            padding_mode=module.padding_mode)
    if bn is None:
        return layer
    dims = 1 if isinstance(module, nn.Linear) else len(module.kernel_size)
    return nn.Sequential(layer, _BN[dims](cout, affine=bn.affine))


def _interp(grid: torch.Tensor, x: torch.Tensor):
    """Segment indices and fractions of ``x`` in ``grid`` (linear extrapolation outside)."""
    if grid.numel() == 1:
        zero = torch.zeros_like(x, dtype=torch.long)
        return zero, zero, torch.zeros_like(x)
    i = (torch.searchsorted(grid, x.detach().contiguous(), right=True) - 1).clamp(0, len(grid) - 2)
    return i, i + 1, (x - grid[i]) / (grid[i + 1] - grid[i])


def bilinear(in_grid, out_grid, table, ins: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    """``table`` (..., len(in_grid), len(out_grid)) interpolated at (ins[k], outs[k])."""
    i0, i1, t = _interp(in_grid, ins)
    j0, j1, u = _interp(out_grid, outs)
    return ((1 - t) * (1 - u) * table[..., i0, j0] + (1 - t) * u * table[..., i0, j1]
            + t * (1 - u) * table[..., i1, j0] + t * u * table[..., i1, j1])


def monotone(table: torch.Tensor) -> torch.Tensor:
    """Mean of the upper (cummax) and lower (reverse cummin) envelopes, non-decreasing in
    both axes; equal to ``table`` when that already is."""
    upper = table.cummax(0).values.cummax(1).values
    lower = table.flip(0, 1).cummin(0).values.cummin(1).values.flip(0, 1)
    return (upper + lower) / 2


def _median_slope(points: list[dict], predictor: str) -> float:
    """The line's slope through measured networks: median of (1 - ratio) / shrink."""
    return statistics.median((1.0 - p["measured"]) / p["shrink"][predictor] for p in points)


def _leave_one_out_error(points: list[dict], predictor: str) -> float:
    """Median |predicted / measured - 1| of each network by the line through the others."""
    errors = []
    for i, p in enumerate(points):
        slope = max(_median_slope(points[:i] + points[i + 1 :], predictor), 0.0)
        errors.append(abs((1.0 - slope * p["shrink"][predictor]) / p["measured"] - 1.0))
    return statistics.median(errors)


class LatencyModel(nn.Module):
    """Latency of the pruned network as a function of the group widths, from per-layer tables
    measured on the target device (HALP-style)."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor,
                 groups: Sequence[ChannelGroup], batch_size: int = 64,
                 device: torch.device | str | None = None, grid_points: int = 8,
                 repeats: int = 7, cache: str | Path | None = None,
                 memory_format: torch.memory_format | None = None, progress: bool = False,
                 rounds: int = 3, predictor: str = "auto", measure: bool = True):
        """``measure=False`` times nothing: the tables and timings stay empty until
        ``load_state_dict`` brings them (a resumed, exported or evaluated run, or a rank of
        torchrun taking rank 0's), so the cost function is the one the run searched with."""
        super().__init__()
        self.measured = measure  # False until a state with the timings is loaded
        self.device = _as_device(device, model)
        self.memory_format = memory_format or memory_format_of(model)
        self.batch_size, self.repeats = batch_size, repeats
        self.example = example_inputs[:1].detach().cpu().clone()
        modules, rows = dict(model.named_modules()), width_counts(groups)
        sigs: dict[str, dict] = {}
        entries: list[tuple] = []  # per call: (key, fixed, in_counts, out_counts, positions)
        self.call_names: list[str] = []  # the layer of each timed call, in call order
        scale = batch_size / example_inputs.shape[0]
        for name, shape, bn, positions in _record_calls(model, example_inputs):
            module, counts = modules[name], rows.get(name)
            if counts is None or not any(counts[0] + counts[1]):
                continue  # no width of this call depends on a group: part of the fixed cost
            sig, widths = _signature(name, module, bn, shape, counts, groups, grid_points)
            sig["input"][0] = max(1, round(shape[0] * scale))
            sig["device"] = str(self.device)
            key = json.dumps(sig, sort_keys=True, default=str)
            sigs.setdefault(key, {"sig": sig, "module": module, "bn": bn})
            entries.append((key, *widths, positions * scale))
            self.call_names.append(name)
        self.signatures = list(sigs)
        self.cache_path, self.cache_key = self._cache_location(cache)
        if measure:  # cells draw weights and inputs (on a cold cache only): the run's random
            # streams must not depend on that
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                tables = self._tables(sigs, rounds, progress)
        else:
            tables = {key: [[0.0] * len(spec["sig"]["grids"][1])] * len(spec["sig"]["grids"][0])
                      for key, spec in sigs.items()}  # fmt: skip
        self.is_monotone: list[bool] = []  # per table: raw medians already monotone?
        for k, key in enumerate(self.signatures):
            raw = torch.tensor(tables[key], dtype=torch.float64)
            smooth = monotone(raw)
            self.is_monotone.append(bool(torch.equal(raw, smooth)))
            self.register_buffer(f"table_{k}", torch.stack([raw, smooth]))
            for a, axis in enumerate(("in", "out")):
                grid = torch.tensor(sigs[key]["sig"]["grids"][a], dtype=torch.float64)
                self.register_buffer(f"{axis}_grid_{k}", grid)
            rows_k = [e for e, entry in enumerate(entries) if entry[0] == key]
            self.register_buffer(f"entries_{k}", torch.tensor(rows_k, dtype=torch.long))

        def tensor(values, width: int) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float64).reshape(len(entries), width)

        self.register_buffer("fixed", tensor([e[1] for e in entries], 2))
        self.register_buffer("positions", tensor([e[4] for e in entries], 1)[:, 0])
        self.register_buffer("in_counts", tensor([e[2] for e in entries], len(groups)))
        self.register_buffer("out_counts", tensor([e[3] for e in entries], len(groups)))
        self.register_buffer("channels", torch.tensor([float(g.channels) for g in groups],
                                                      dtype=torch.float64))
        self.register_buffer("steps", None, persistent=False)  # see price_steps
        self.measured_full = measure_latency(
            model, example_inputs, batch_size, self.device, repeats * rounds, self.memory_format
        ) if measure else 1.0  # fmt: skip
        tables_full = float(self.table_sum(self.channels))
        self.activations_full = float(self.activations(self.channels)) or 1.0
        self.fixed_part = max(self.measured_full - tables_full, 0.0)
        self.raw_full = tables_full + self.fixed_part  # uncorrected(full)
        self.correction = self.measured_full  # seconds per unit of the predictor
        self.offset = 0.0  # seconds; set by fit()
        # "auto": fit() chooses the feature on measured networks; else this one, always
        self.predictor_choice = predictor
        # the feature in use: "tables" or a proxy's name (which must be added before any cost)
        self.predictor = "tables" if predictor == "auto" else predictor
        self.proxies: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.points: list[dict] = []  # measured networks: measured ratio, shrink per predictor
        self.full = self.measured_full  # cost(full): every predictor is 1 at full widths

    _SCALARS = ("measured_full", "fixed_part", "raw_full", "correction", "offset",
                "activations_full", "full")  # fmt: skip

    def add_proxy(self, name: str, ratio: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Offer ``fit`` another predictor of the whole network's latency: ``ratio(widths)``,
        a cost relative to the full network (1 at full widths), differentiable in the widths,
        e.g. the FLOPs ratio. Why: layers timed alone can miss how they run together, and a
        device may then follow such a proxy more closely than the tables; ``fit`` keeps
        whichever predicts the measured networks better (``benchmarks.latency_predictors``
        compares them on a device)."""
        self.proxies[name] = ratio

    def predictors(self) -> list[str]:
        """The features ``fit`` chooses from: the tables, then every proxy."""
        return ["tables", *self.proxies]

    def get_extra_state(self) -> dict:
        """The whole-model timing with the tables, and the layout they were timed in: a
        resumed run keeps its cost function, and times its refits as the run did."""
        return {**{name: getattr(self, name) for name in self._SCALARS}, "points": self.points,
                "predictor": self.predictor,
                "memory_format": str(self.memory_format)}  # fmt: skip

    def set_extra_state(self, state: dict) -> None:
        if "measured_full" in state:  # (the tables' buffers are loaded before this)
            self.measured = True
            self.is_monotone = [bool(torch.equal(*getattr(self, f"table_{k}")))
                                for k in range(len(self.signatures))]  # fmt: skip
        for name in self._SCALARS:
            if name in state:
                setattr(self, name, float(state[name]))
        if "raw_full" not in state and "correction" in state:
            # a checkpoint from before the proxies: correction was per uncorrected second
            self.raw_full = float(self.table_sum(self.channels)) + self.fixed_part
            self.correction *= self.raw_full
        if "points" in state:  # (a broadcast of the scalars alone keeps them)
            self.points = [p if isinstance(p, dict) else  # [shrink, measured]: tables only
                           {"measured": p[1], "shrink": {"tables": p[0]}}
                           for p in state["points"]]  # fmt: skip
        self.predictor = state.get("predictor", self.predictor)
        # absent in older checkpoints; a model since moved to another layout is still timed
        # in the one the tables and points were measured in
        self.memory_format = MEMORY_FORMATS.get(state.get("memory_format"), self.memory_format)

    def _cache_location(self, cache: str | Path | None) -> tuple[Path, str]:
        folder = os.environ.get("S2HPRUNER_CACHE") or Path.home() / ".cache/s2hpruner/latency"
        path = Path(cache) if cache is not None else Path(folder) / "latency.json"
        key = {"device": device_name(self.device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "batch": self.batch_size,
               "memory_format": str(self.memory_format),
               "cpu_memory_held": self.device.type == "cpu" and hold_freed_cpu_memory()}
        return path, json.dumps(key, sort_keys=True)

    def _tables(self, sigs: dict[str, dict], rounds: int, progress: bool) -> dict[str, list]:
        """Tables of all signatures: cached ones read, the others measured and cached."""
        stored = _read_json(self.cache_path)
        tables = dict(stored.get(self.cache_key, {}))
        todo = [key for key in sigs if key not in tables]
        if progress and todo:
            from tqdm import tqdm

            todo = tqdm(todo, desc="latency tables", unit="layer")
        for key in todo:
            tables[key] = self._measure(sigs[key], rounds)
        if len(tables) > len(stored.get(self.cache_key, {})):
            self._write_cache(tables)
        return {key: tables[key] for key in sigs}

    @torch.no_grad()
    def _measure(self, spec: dict, rounds: int) -> list[list[float]]:
        sig, module, bn = spec["sig"], spec["module"], spec["bn"]
        in_grid, out_grid = sig["grids"]
        dtype = module.weight.dtype
        times: dict[tuple[int, int], list[float]] = {}
        for _ in range(max(1, rounds)):
            for cin in in_grid:
                for cout in out_grid:
                    c_in = cout if sig["depthwise"] else cin
                    cell = _cell(module, bn, c_in, cout).to(self.device, dtype).eval()
                    cell = cell.to(memory_format=self.memory_format)
                    shape = list(sig["input"])
                    shape[-1 if isinstance(module, nn.Linear) else 1] = c_in
                    x = torch.randn(shape, device=self.device, dtype=dtype)
                    x = _formatted(x, self.memory_format)
                    times.setdefault((cin, cout), []).append(_time_cell(cell, x, self.repeats))
        return [[statistics.median(times[i, o]) for o in out_grid] for i in in_grid]

    def _write_cache(self, tables: dict[str, list]) -> None:
        """Merge into the file as it is now, written atomically (tempfile + os.replace). A
        cache that cannot be written costs a re-measurement next time, not the run."""
        tmp = None
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            data = _read_json(self.cache_path)
            data.setdefault(self.cache_key, {}).update(tables)
            fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the usual file mode
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            warnings.warn(f"latency tables not cached at {self.cache_path}: {exc}", stacklevel=2)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def _widths(self, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In and out widths of every call (..., calls) at group widths (..., groups)."""
        frac = widths.to(self.channels.device, torch.float64) / self.channels
        return (self.fixed[:, 0] + frac @ self.in_counts.T,
                self.fixed[:, 1] + frac @ self.out_counts.T)  # fmt: skip

    def activations(self, widths: torch.Tensor) -> torch.Tensor:
        """Output elements of the table layers: what the untimed elementwise work scales with."""
        return (self._widths(widths)[1] * self.positions).sum()

    def price_steps(self, steps: Sequence[float] | None) -> None:
        """Price each group's width by the step its kept width moves by (``steps[g]``
        channels, e.g. ``round_to``), not by the tables' slope at that width.

        Why: measured latency is a staircase in the width (kernels handle 8 or 16 channels at
        once). At a width on a stair's edge the slope is the whole jump, charged to a single
        channel; in the middle of a stair it is 0. A search led by that slope cuts groups that
        sit on an edge far harder than a step saves, and never cuts the others. The gradient
        is then the secant of the monotone tables over one step either side (one-sided at the
        narrowest and the full width); the cost's value is unchanged. ``None``: the slope."""
        self.steps = None if steps is None else torch.tensor(
            [float(s) for s in steps], dtype=torch.float64, device=self.channels.device
        )

    def _calls(self, widths: torch.Tensor) -> torch.Tensor:
        """(raw, monotone) table value of every call at group widths (..., groups): shape
        (2, ..., calls)."""
        ins, outs = self._widths(widths)
        values = ins.new_zeros((2, *ins.shape))
        for k in range(len(self.signatures)):
            rows = getattr(self, f"entries_{k}")
            grids = getattr(self, f"in_grid_{k}"), getattr(self, f"out_grid_{k}")
            values[..., rows] = bilinear(*grids, getattr(self, f"table_{k}"), ins[..., rows],
                                         outs[..., rows])  # fmt: skip
        return values

    def _table_sums(self, widths: torch.Tensor) -> torch.Tensor:
        """(raw, monotone) sums of the interpolated tables at group widths: (2, ...)."""
        return self._calls(widths).sum(-1)

    @torch.no_grad()
    def call_costs(self, widths: torch.Tensor) -> dict[str, float]:
        """Seconds of each timed call by the tables at the widths, by layer name (a layer
        called twice sums): to check the tables against the calls inside a whole network."""
        costs: dict[str, float] = {}
        for name, value in zip(self.call_names, self._calls(widths)[0].tolist(), strict=True):
            costs[name] = costs.get(name, 0.0) + value
        return costs

    def table_sum(self, widths: torch.Tensor) -> torch.Tensor:
        """Sum of the interpolated tables (seconds): value from the raw tables, gradient from
        their monotone versions (their slope, or their secant over ``price_steps``)."""
        if self.steps is None or not widths.requires_grad:
            raw, smooth = self._table_sums(widths)
            return smooth + (raw - smooth).detach()
        w = widths.detach().to(self.channels.device, torch.float64)
        low = torch.minimum((w - self.steps).clamp(min=self.steps), w)
        high = torch.maximum(torch.minimum(w + self.steps, self.channels), w)
        n, diagonal = len(w), torch.arange(len(w))
        points = w.expand(2 * n + 1, n).clone()  # the widths, each group a step down, up
        points[1 + diagonal, diagonal] = low
        points[1 + n + diagonal, diagonal] = high
        with torch.no_grad():  # one batched lookup for the value and every secant
            raw, smooth = self._table_sums(points)
        price = (smooth[1 + n :] - smooth[1 : 1 + n]) / (high - low).clamp(min=1e-9)
        moved = widths.to(price.dtype) - w  # 0 in value; its gradient is 1 per group
        return raw[0] + (price * moved).sum()

    def cost(self, widths: torch.Tensor) -> torch.Tensor:
        """Predicted seconds per batch at the given group widths, differentiable in them."""
        return self.offset + self.correction * self.feature(widths)

    def feature(self, widths: torch.Tensor, predictor: str | None = None) -> torch.Tensor:
        """A predictor of the whole network's cost, 1 at full widths: the tables (with the
        untimed part) or a proxy (``add_proxy``)."""
        predictor = predictor or self.predictor
        if predictor == "tables":
            return self.table_cost(widths) / self.raw_full
        return self.proxies[predictor](widths.to(self.channels.device, torch.float64))

    def table_cost(self, widths: torch.Tensor) -> torch.Tensor:
        """Seconds by the tables as built (``uncorrected`` above), whatever the predictor:
        where a width is slower than a wider one (alignment), only the tables know it."""
        fixed = self.fixed_part * self.activations(widths) / self.activations_full
        return self.table_sum(widths) + fixed

    @torch.no_grad()
    def measure_ratio(self, full_model: nn.Module, pruned_model: nn.Module,
                      rounds: int = 5) -> float:  # fmt: skip
        """Measured latency of ``pruned_model`` over ``full_model`` at the table's batch,
        device and layout: the median ratio of ``rounds * repeats`` alternating forwards
        (``core.measure.latency_ratio``: the machine's drift cancels within a pair). Under
        torchrun rank 0 measures and every rank gets its number."""
        ratio = 0.0
        if D.is_main():
            place = (self.example, self.batch_size, self.device, self.memory_format)
            full, x = _placed(full_model, *place)
            pruned, _ = _placed(pruned_model, *place)
            ratio = latency_ratio(full, pruned, x, self.repeats, rounds)[0]
        return D.broadcast_floats([ratio])[0]

    @torch.no_grad()
    def calibrate(self, full_model: nn.Module, pruned_model: nn.Module, widths: torch.Tensor,
                  rounds: int = 5) -> dict[str, float]:  # fmt: skip
        """Measure ``pruned_model`` (the network exported at ``widths``) against
        ``full_model`` and refit the cost through that point (:meth:`fit`)."""
        result = self.fit(widths, self.measure_ratio(full_model, pruned_model, rounds))
        # every rank keeps rank 0's line: each rank timed its own tables, so their fits and
        # even their choice of feature could differ a little
        names = self.predictors()
        index, self.offset, self.correction, self.full = D.broadcast_floats(
            [names.index(self.predictor), self.offset, self.correction, self.full])
        self.predictor = names[int(index)]
        return result

    @torch.no_grad()
    def fit(self, widths: torch.Tensor, measured_ratio: float) -> dict[str, float]:
        """Add a measured network (``measured_ratio`` at ``widths``) and refit the line
        ``ratio = 1 - slope * (1 - feature(w))`` through the full network, ``slope`` being the
        median over all measured networks (a noisy timing moves a median little). In seconds:
        ``cost = offset + correction * feature``.

        Why: layers timed alone add up to the whole network at full width, but a narrow
        network can keep costs that do not shrink with the widths (per-layer dispatch, memory
        traffic of the fixed layers), or lose some (cache effects). The pruner adds a
        point before the search, during it and when the widths freeze, so the line is fitted
        where the search is. The slope is kept positive (narrower is never slower) and below
        the value that would make the smallest network free.

        The feature is the tables, or a proxy (``add_proxy``) once it predicts the measured
        networks better: from three networks on, each predictor's line is fitted without
        each network in turn and judged on it (leave-one-out), and the smaller median error
        wins (ties: the tables). A ``predictor`` fixed at construction is always kept."""
        widths = widths.to(self.channels.device, torch.float64)
        names = self.predictors()
        shrink = {name: 1.0 - float(self.feature(widths, name)) for name in names}
        predicted_before = float(self.cost(widths)) / self.full
        if shrink["tables"] > 0.01:  # a network measurably narrower than the full one
            self.points.append({"measured": float(measured_ratio), "shrink": shrink})
        usable = {name: [p for p in self.points if p["shrink"].get(name, 0.0) > 0.01]
                  for name in names}  # fmt: skip
        if self.predictor_choice == "auto" and len(self.points) >= 3:
            errors = {name: _leave_one_out_error(usable[name], name) for name in names
                      if len(usable[name]) == len(self.points)}  # fmt: skip
            self.predictor = min(errors, key=lambda n: (errors[n], n != "tables"))
        points = usable[self.predictor]
        if points:
            ones = torch.ones_like(self.channels)
            floor = 1.0 - float(self.feature(ones))
            slope = _median_slope(points, self.predictor)
            slope = min(max(slope, 0.05), 0.95 / max(floor, 1e-9))
            self.offset = self.measured_full * (1.0 - slope)
            self.correction = slope * self.measured_full
        self.full = float(self.cost(self.channels))
        return {"measured_ratio": measured_ratio, "predicted_ratio_before": predicted_before,
                "predicted_ratio_after": float(self.cost(widths)) / self.full,
                "offset": self.offset, "correction": self.correction,
                "points": len(self.points), "predictor": self.predictor}  # fmt: skip

    def ratio(self, widths: torch.Tensor) -> torch.Tensor:
        """Latency relative to the full model (1 at full widths)."""
        return self.cost(widths) / self.full

    @torch.no_grad()
    def validate(self, pruned_model: nn.Module, widths: torch.Tensor) -> dict[str, float]:
        """Measured vs predicted latency of an exported model at the widths it was cut to."""
        measured = measure_latency(pruned_model, self.example, self.batch_size, self.device,
                                   self.repeats * 3, self.memory_format)
        predicted = float(self.cost(widths))
        return {"measured": measured, "predicted": predicted, "error": predicted / measured - 1,
                "full": self.full, "measured_full": self.measured_full}
