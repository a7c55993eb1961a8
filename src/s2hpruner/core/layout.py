"""CPU memory-layout tuning of the sliced hard pass (and of the pruned network trained after
the freeze) (opt-in: it picks a code path by timing).

Which memory format trains the sliced hard network fastest depends on the kept widths, the
feature map sizes and the kernels (``benchmarks/kernels.py``). All layouts compute the same
network, but not bit for bit, so a run that tunes is not reproducible bit for bit: the
application calls this only when asked (``hard_layout: auto``), like ``cudnn.benchmark``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .measure import memory_format_of
from .pruner import S2HPruner


def tune_hard_layout(
    pruner: S2HPruner, inputs: torch.Tensor, repeats: int = 3
) -> torch.memory_format | None:
    """Time the sliced hard network's training pass (forward and backward) in NCHW, in
    channels_last, and in channels_last with narrow BatchNorms left in channels_last too
    (``hard_nchw_norms=False``), and run ``mode("hard")`` in the fastest from now on, as
    ``cudnn.benchmark`` does for conv algorithms. Which is fastest depends on the kept
    widths, the feature map sizes and the kernels (``benchmarks/kernels.py``). All compute
    the same network; weights, gradients, BatchNorm statistics and the RNG are left as
    they were. Returns the chosen layout."""
    if not pruner.sliced_hard or not torch.is_tensor(inputs) or inputs.dim() != 4:
        return pruner.hard_layout
    params = [p for p in pruner.model.parameters() if p.requires_grad]
    params += pruner.mask_parameters()
    stats = list(pruner.model.buffers())
    if pruner.hard_stats is not None:
        stats += list(pruner.hard_stats.buffers())

    def use(variant) -> None:
        pruner.hard_layout, pruner.hard_nchw_norms = variant

    def training_pass() -> None:
        with pruner.mode("hard"):
            out = pruner.model(inputs)
        torch.autograd.grad(out.float().sum(), params, allow_unused=True)

    # (layout, narrow BatchNorms in NCHW); the flag only matters for channels_last
    variants = [(torch.contiguous_format, True), (torch.channels_last, True),
                (torch.channels_last, False)]
    previous = (pruner.hard_layout, pruner.hard_nchw_norms)
    try:
        times = _time_variants(variants, use, training_pass, stats, inputs.device, repeats)
    except BaseException:
        pruner.hard_layout, pruner.hard_nchw_norms = previous
        raise
    best = min(variants, key=lambda variant: statistics.median(times[variant]))
    pruner.hard_layout, pruner.hard_nchw_norms = best
    return pruner.hard_layout


def tune_module_layout(
    module: nn.Module,
    inputs: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    repeats: int = 3,
) -> torch.memory_format:
    """Time ``module``'s training pass (forward, backward) in NCHW and in channels_last and
    return the faster (for the pruned network a run trains once its widths freeze), the
    module left in the layout it had. ``forward(x)``: the output tensor of the module on
    ``x`` (default ``module(x)``; e.g. its logits under autocast). Its weights' values,
    BatchNorm statistics and the RNG are left as they were."""
    forward = forward or module
    params = [p for p in module.parameters() if p.requires_grad]

    current = {}

    def use(layout: torch.memory_format) -> None:
        module.to(memory_format=layout)
        current["inputs"] = inputs.contiguous(memory_format=layout)

    def training_pass() -> None:
        out = forward(current["inputs"])
        torch.autograd.grad(out.float().sum(), params, allow_unused=True)

    layouts = (torch.contiguous_format, torch.channels_last)
    before = memory_format_of(module)  # read off the strides: a grey stem reads as both
    try:
        times = _time_variants(layouts, use, training_pass, list(module.buffers()),
                               inputs.device, repeats)  # fmt: skip
    finally:
        module.to(memory_format=before)
    return min(layouts, key=lambda layout: statistics.median(times[layout]))


def _time_variants(variants, use, training_pass, stats: list[torch.Tensor],
                   device: torch.device, repeats: int) -> dict:  # fmt: skip
    """Seconds of ``training_pass()`` after ``use(variant)`` (untimed) for each variant,
    ``repeats`` rounds after one warm-up round, interleaved so that all see the same machine
    load; ``stats`` (BatchNorm statistics) and the RNG are left as they were."""
    saved = [t.clone() for t in stats]
    cuda = device.type == "cuda"
    times: dict = {variant: [] for variant in variants}
    try:
        with torch.random.fork_rng(devices=[device] if cuda else []):
            for round_ in range(repeats + 1):  # the first round warms up
                for variant in variants:
                    use(variant)
                    if cuda:
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    training_pass()
                    if cuda:
                        torch.cuda.synchronize(device)
                    if round_:
                        times[variant].append(time.perf_counter() - start)
    finally:
        with torch.no_grad():
            for tensor, value in zip(stats, saved, strict=True):
                tensor.copy_(value)
    return times
