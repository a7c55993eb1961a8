"""``latency_speedup`` timed in a newly started Python process, so that the timing leaves this
process as it found it.

Why: a CPU timing first holds glibc's freed memory (``measure.hold_freed_cpu_memory``), and
that holds for the rest of the process that timed. Whoever trains afterwards in that process
trains in the held state, where some pruned networks step relatively slower: the unaligned L1
network of resnet20 at 0.35 took 1.03-1.13 full-model steps instead of 0.80-0.86
(MEASUREMENTS.md, round 41). A child process takes the held state with it when it exits.

The child is a plain ``python -m`` subprocess, not a ``multiprocessing`` spawn: spawn imports
the caller's main script again, which re-runs a script without an ``if __name__ ==
"__main__"`` guard. The models travel as a ``torch.save`` file, so their classes must be
importable; one defined in ``__main__`` is not, and then the timing falls back to this process
with a warning.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .measure import latency_speedup


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path, so that the child can import every
    module the models' classes come from (a user's package beside their script, say)."""
    path = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def latency_speedup_in_fresh_process(
    full: nn.Module, pruned: nn.Module, example: torch.Tensor, **kwargs
) -> dict[str, float | list[float]]:
    """``latency_speedup(full, pruned, example, **kwargs)`` measured in a new Python process
    with this process's torch thread count. Falls back to this process, with a warning that
    says why, when the models cannot be saved or the child cannot load them."""
    with tempfile.TemporaryDirectory(prefix="s2hpruner-timing-") as tmp:
        job, result = Path(tmp) / "job.pt", Path(tmp) / "result.json"
        try:
            torch.save({"full": full, "pruned": pruned, "example": example, "kwargs": kwargs,
                        "threads": torch.get_num_threads()}, job)  # fmt: skip
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            reason = f"the models cannot be saved ({type(exc).__name__}: {exc})"
        else:
            child = subprocess.run(
                [sys.executable, "-m", __name__, str(job), str(result)],
                env=_child_env(), capture_output=True, text=True, check=False)  # fmt: skip
            if child.returncode == 0:
                return json.loads(result.read_text())
            lines = child.stderr.strip().splitlines()
            reason = f"the timing process failed ({lines[-1] if lines else child.returncode})"
    warnings.warn(f"latency timed in this process: {reason}. The timing holds glibc's "
                  "allocator for the rest of this process (core.measure."
                  "hold_freed_cpu_memory)", stacklevel=2)  # fmt: skip
    return latency_speedup(full, pruned, example, **kwargs)


def _main(job: str, result: str) -> None:
    spec = torch.load(job, weights_only=False)  # written by this module's parent, above
    torch.set_num_threads(spec["threads"])
    speed = latency_speedup(spec["full"], spec["pruned"], spec["example"], **spec["kwargs"])
    Path(result).write_text(json.dumps(speed))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
