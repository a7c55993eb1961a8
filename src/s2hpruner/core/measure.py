"""Latency measurement: medians over repeated timings after warm-up, never a single run."""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import sys
import time

import torch
from torch import nn

from .modes import evaluating

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h
_allocator_held = False


def hold_freed_cpu_memory() -> bool:
    """Keep freed memory in glibc's heap (no trimming, no per-tensor mmap), once per process.

    Why: glibc adapts its mmap and trim thresholds to what the process freed before, so
    whether an activation costs fresh page faults depends on the process's history. A
    pruned/full latency ratio then moved by up to 40% between processes (MEASUREMENTS.md,
    round 7). Held, every forward after warm-up reuses heap memory, as in a long-running
    server, and the ratio no longer depends on history. The cost: the process keeps its
    peak CPU memory. A no-op (False) off glibc; returns True once memory is held."""
    global _allocator_held
    if _allocator_held:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    big = 2**31 - 1
    _allocator_held = bool(mallopt(_M_MMAP_THRESHOLD, 2**30) and mallopt(_M_TRIM_THRESHOLD, big))
    return _allocator_held


def can_hold_freed_cpu_memory() -> bool:
    """Would ``hold_freed_cpu_memory`` hold anything here (glibc's mallopt)? Nothing is held."""
    return _mallopt() is not None


def freed_cpu_memory_held() -> bool:
    """Has this process held its freed memory (``hold_freed_cpu_memory``) already?"""
    return _allocator_held


def _mallopt():
    """glibc's ``mallopt``, or None (not Linux, or a libc without it, such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _seconds(model: nn.Module, x: torch.Tensor) -> float:
    """Wall seconds of one forward of ``x`` (on CUDA, until the device is done)."""
    start = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)  # the timed device, not the current one
    return time.perf_counter() - start


@torch.no_grad()
def median_latency(
    model: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5
) -> float:
    """Median seconds of one eval-mode forward of ``example``. On CPU the allocator is held
    first (``hold_freed_cpu_memory``), so that a timing does not depend on the process's past."""
    if not example.is_cuda:
        hold_freed_cpu_memory()
    with evaluating(model):
        for _ in range(warmup):
            _seconds(model, example)
        times = [_seconds(model, example) for _ in range(repeats)]
    return statistics.median(times)


# the layouts a conv weight of each rank can be in (the first: PyTorch's default)
_LAYOUTS = {4: (torch.contiguous_format, torch.channels_last),
            5: (torch.contiguous_format, torch.channels_last_3d)}  # fmt: skip
# a memory format by its str(), as states save it
MEMORY_FORMATS = {str(f): f for f in (torch.contiguous_format, torch.channels_last,
                                      torch.channels_last_3d)}  # fmt: skip


def _strides(shape: torch.Size, memory_format: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=memory_format).stride()


def layout_of(weight: torch.Tensor) -> torch.memory_format | None:
    """The layout a conv weight's strides spell exactly, or None when they spell neither or
    both (an (O, 1, 1, 1) weight). ``is_contiguous`` cannot tell: it ignores the strides of
    size-1 dimensions, so a depthwise, a 1x1 or a one-input-channel weight reads as contiguous
    in both layouts, while oneDNN picks its kernel by the strides themselves."""
    layouts = _LAYOUTS.get(weight.dim())
    if layouts is None:
        return None
    spelled = [f for f in layouts if weight.stride() == _strides(weight.shape, f)]
    return spelled[0] if len(spelled) == 1 else None


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """Inputs in the memory format of the model's 4-D weights (no layout conversions): that of
    the first whose strides tell (:func:`layout_of`), else NCHW."""
    for p in model.parameters():
        if p.dim() == 4 and (layout := layout_of(p)) is not None:
            return layout
    return torch.contiguous_format


def in_memory_format(model: nn.Module, memory_format: torch.memory_format) -> bool:
    """Has every conv weight of ``model`` the strides of ``memory_format`` (4-D weights for
    channels_last, 5-D for channels_last_3d, both for NCHW)?"""
    ranks = [r for r, layouts in _LAYOUTS.items() if memory_format in layouts]
    return all(p.stride() == _strides(p.shape, memory_format)
               for p in model.parameters() if p.dim() in ranks)  # fmt: skip


def same_memory_format(model: nn.Module, reference: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in ``reference``'s memory format (for fair timing)."""
    return model.to(memory_format=memory_format_of(reference))


@torch.no_grad()
def latency_ratio(
    full: nn.Module, pruned: nn.Module, x: torch.Tensor, repeats: int, rounds: int = 5
) -> tuple[float, list[float], float, float]:
    """pruned / full latency on ``x``. The two networks' forwards alternate (full, pruned,
    pruned, full, ...) and each adjacent pair gives a ratio; the result is the median of the
    ``repeats * rounds`` pair ratios.

    Why: a shared host's speed drifts within a second (other tenants, frequency scaling).
    Timing each network in a block of its own let that drift into the ratio: one pair of
    resnet20s measured 0.36-0.54 from round to round, 0.45-0.53 as a median of 5 rounds;
    alternating, 0.45-0.47 (MEASUREMENTS.md, round 9). Returns (ratio, the median ratio of
    each round of ``repeats`` pairs, full s, pruned s), the seconds being medians too. On
    CPU the allocator is held first (``hold_freed_cpu_memory``)."""
    if not x.is_cuda:
        hold_freed_cpu_memory()
    full_times, pruned_times = [], []
    with evaluating(full, pruned):
        for _ in range(5):  # warm-up
            _seconds(full, x)
            _seconds(pruned, x)
        for i in range(max(1, repeats) * max(1, rounds)):
            if i % 2:  # alternate which goes first, so neither always runs in the other's wake
                pruned_times.append(_seconds(pruned, x))
                full_times.append(_seconds(full, x))
            else:
                full_times.append(_seconds(full, x))
                pruned_times.append(_seconds(pruned, x))
    pairs = [p / f for f, p in zip(full_times, pruned_times, strict=True)]
    per_round = max(1, repeats)
    rounds_ratios = [statistics.median(pairs[i:i + per_round])
                     for i in range(0, len(pairs), per_round)]  # fmt: skip
    return (statistics.median(pairs), rounds_ratios, statistics.median(full_times),
            statistics.median(pruned_times))  # fmt: skip


def latency_speedup(
    full: nn.Module,
    pruned: nn.Module,
    example: torch.Tensor,
    repeats: int = 30,
    batch_sizes: tuple[int, ...] = (1, 64),
    rounds: int = 5,
) -> dict[str, float | list[float]]:
    """Full-model latency over pruned-model latency, per batch size, from alternating
    forwards (``latency_ratio``). The per-round values are returned too (``b64_rounds``), so
    the spread is visible. The pruned model is put in the full model's memory format first."""
    pruned = same_memory_format(pruned, full)
    out: dict[str, float | list[float]] = {}
    layout = memory_format_of(full)
    for b in batch_sizes:
        x = example[:1].expand(b, *example.shape[1:]).contiguous(memory_format=layout)
        reps = repeats if b == 1 else max(5, repeats // 3)
        ratio, ratios, full_s, pruned_s = latency_ratio(full, pruned, x, reps, rounds)
        out[f"b{b}"] = 1.0 / ratio
        out[f"b{b}_rounds"] = [1.0 / r for r in ratios]
        out[f"b{b}_full_seconds"] = full_s
        out[f"b{b}_pruned_seconds"] = pruned_s
    return out
