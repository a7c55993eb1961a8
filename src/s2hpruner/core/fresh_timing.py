"""``latency_speedup`` timed in a newly started Python process, so that the timing leaves this
process as it found it.

Why: a CPU timing first holds glibc's freed memory (``measure.hold_freed_cpu_memory``), and
that holds for the rest of the process that timed. Whoever trains afterwards in that process
trains in the held state, where some pruned networks step relatively slower: the unaligned L1
network of resnet20 at 0.35 took 1.03-1.13 full-model steps instead of 0.80-0.86
(MEASUREMENTS.md, round 41). A child process takes the held state with it when it exits.

The child is a plain ``python -m`` subprocess, not a ``multiprocessing`` spawn: spawn imports
the caller's main script again, which re-runs a script without an ``if __name__ ==
"__main__"`` guard. The models travel as a ``torch.save`` file, so the child must be able to
import their classes: from the import path, or from the file of a module that was loaded from
a file under a name the import path does not give (a model given as ``file.py:factory``).
A class defined in ``__main__`` cannot be, and then, as on any failure, the timing falls back
to this process with a warning. Where nothing would be held (not glibc), or this process holds
the allocator already, it runs here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .measure import can_hold_freed_cpu_memory, freed_cpu_memory_held, latency_speedup

TIMEOUT_SECONDS = 3600  # a hung child must not hang the run (and, under torchrun, every rank)


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path, so that the child can import every
    module the models' classes come from (a user's package beside their script, say)."""
    path = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _modules_from_files(*models: nn.Module) -> dict[str, str]:
    """Module name -> file, for the models' classes whose module the import path cannot find
    by its name (loaded from a file by ``importlib``), so that the child loads them alike."""
    found = {}
    for model in models:
        for name in {type(m).__module__ for m in model.modules()}:
            module, top = sys.modules.get(name), name.partition(".")[0]
            file = getattr(module, "__file__", None)
            if (file is None or name in ("__main__", "__mp_main__")
                    or top in sys.builtin_module_names
                    or importlib.machinery.PathFinder.find_spec(top) is not None):  # fmt: skip
                continue
            found[name] = file
    return found


def latency_speedup_in_fresh_process(
    full: nn.Module, pruned: nn.Module, example: torch.Tensor, **kwargs
) -> dict[str, float | list[float]]:
    """``latency_speedup(full, pruned, example, **kwargs)`` measured in a new Python process
    with this process's torch thread count. Falls back to this process, with a warning that
    says why, when the models cannot be saved or the child fails. Runs here directly where
    there is no allocator state to keep out of this process: off glibc, or when this process
    holds it already (a latency budget's run has timed its tables here)."""
    if not can_hold_freed_cpu_memory() or freed_cpu_memory_held():
        return latency_speedup(full, pruned, example, **kwargs)
    try:
        with tempfile.TemporaryDirectory(prefix="s2hpruner-timing-") as tmp:
            job, modules, result = (Path(tmp) / n for n in ("job.pt", "modules.json",
                                                            "result.json"))  # fmt: skip
            modules.write_text(json.dumps(_modules_from_files(full, pruned)))
            torch.save({"full": full, "pruned": pruned, "example": example, "kwargs": kwargs,
                        "threads": torch.get_num_threads()}, job)  # fmt: skip
            child = subprocess.run(
                [sys.executable, "-m", __name__, str(job), str(modules), str(result)],
                env=_child_env(), capture_output=True, text=True, check=False,
                timeout=TIMEOUT_SECONDS)  # fmt: skip
            if child.returncode == 0:
                return json.loads(result.read_text())
            lines = child.stderr.strip().splitlines()
            reason = (f"the timing process failed (exit code {child.returncode}"
                      + (f": {lines[-1]})" if lines else ")"))  # fmt: skip
    # any failure (a model that cannot be saved, a full temp disk, no subprocess, a timeout)
    # leaves the timing to this process: never lose a finished run's report over it
    except Exception as exc:  # noqa: BLE001
        reason = f"it could not run in a new process ({type(exc).__name__}: {exc})"
    warnings.warn(f"latency timed in this process: {reason}. The timing holds glibc's "
                  "allocator for the rest of this process (core.measure."
                  "hold_freed_cpu_memory)", stacklevel=2)  # fmt: skip
    return latency_speedup(full, pruned, example, **kwargs)


def _main(job: str, modules: str, result: str) -> None:
    for name, file in json.loads(Path(modules).read_text()).items():
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    task = torch.load(job, weights_only=False)  # written by this module's parent, above
    torch.set_num_threads(task["threads"])
    speed = latency_speedup(task["full"], task["pruned"], task["example"], **task["kwargs"])
    Path(result).write_text(json.dumps(speed))


if __name__ == "__main__":
    _main(*sys.argv[1:4])
