"""Run a timing in a newly started Python process, so that nothing an earlier run did in the
benchmark's process enters it.

Why: how fast a pruned network trains on CPU depends on the process's history. glibc adapts
its mmap and trim thresholds to what the process freed before, and the library's latency
measurement pins them (``s2hpruner.core.measure.hold_freed_cpu_memory``), which every
S2HPruner run's report did in the run's process until round 42 (it now times in a child,
``s2hpruner.core.fresh_timing``, except in profiles with ``timing_process: same``). After
one S2HPruner run, the same unaligned L1 network of resnet20 at 0.35 priced at 1.03
full-model steps instead of 0.86 in a fresh process (MEASUREMENTS.md, round 41). A benchmark
that timed S2HPruner's step after its run and a baseline's in a fresh process compared two
allocator states. In a spawned child (the ``spawn`` start method: a new interpreter, not a
fork of this one) every timing starts from the same state, the one a user's training process
starts in.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _start_child(threads: int) -> None:
    torch.set_num_threads(threads)  # as many as this process uses, not the child's default


def in_fresh_process(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a newly spawned process with this process's torch thread
    count; its result (or its exception) comes back pickled. ``fn`` must be importable (a
    module-level function) and its arguments picklable."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_start_child,
                             initargs=(torch.get_num_threads(),)) as pool:  # fmt: skip
        return pool.submit(fn, *args, **kwargs).result()
