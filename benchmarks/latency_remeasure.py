"""Time the exported models of a ``benchmarks.latency_budget`` JSON again, each in a fresh
Python process, as a deployment would run them.

The ratios a run measures in its own process (the feedback during the search, the report's
``latency_ratio``) are taken after training, in a process that has allocated and freed
gigabytes. In a fresh process the same two networks timed 10-40% differently
(``MEASUREMENTS.md``, round 7), until every CPU timing held glibc's freed memory
(``core.measure.hold_freed_cpu_memory``, round 8). This script checks that the two agree: it
records, per run, the ratio measured in
``--processes`` fresh processes (``latency_ratio_fresh``: their median, and every value),
beside the in-run one, and redraws the picture.

    python -m benchmarks.latency_remeasure benchmarks/results/latency_budget_from_trained.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def worker(model: str, kwargs: str, init: str | None, exported: str, batch: int) -> None:
    """Print the latency ratio of ``exported`` against the full model (median of 3)."""
    import torch

    from benchmarks.latency_budget import measured_latency_ratio
    from s2hpruner.app.config import RunConfig
    from s2hpruner.app.data import dataset_spec
    from s2hpruner.app.run import build_model

    spec = dataset_spec("fashion-mnist")
    cfg = RunConfig(model=model, model_kwargs=json.loads(kwargs), init=init, progress=False)
    full = build_model(cfg, spec, torch.device("cpu"))
    example = torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size)
    pruned = torch.load(exported, weights_only=False)
    ratios = [measured_latency_ratio(full, pruned, example, batch) for _ in range(3)]
    print(json.dumps(float(np.median(ratios))))


def run_dir(root: Path, run: dict) -> Path:
    """The run directory ``benchmarks.latency_budget`` wrote this run to."""
    if "out" in run:  # a FLOPs run chosen from several attempts records its own
        return Path(run["out"])
    from benchmarks.latency_budget import run_tag

    tag = run_tag(run["model"], run.get("model_kwargs", {}), run.get("seed", 0))
    return root / f"{tag}_{run['budget']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs/latency_budget"),
                        help="the --out of benchmarks.latency_budget")  # fmt: skip
    parser.add_argument("--init", action="append", default=[], metavar="MODEL=PATH",
                        help="the weights the runs of MODEL started from (the full model)")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, kwargs, init, exported = args.worker
        worker(model, kwargs, init or None, exported, args.latency_batch)
        return
    from benchmarks.latency_budget import plot
    from s2hpruner.app.files import atomic_write_bytes

    inits = dict(item.split("=", 1) for item in args.init)
    results = json.loads(args.json.read_text())
    for run in results["runs"]:
        exported = run_dir(args.runs, run) / "model_pruned.pt"
        if "top1_hard" not in run or not exported.exists():
            continue
        command = [sys.executable, "-m", "benchmarks.latency_remeasure", str(args.json),
                   "--latency-batch", str(args.latency_batch), "--worker", run["model"],
                   json.dumps(run.get("model_kwargs", {})), inits.get(run["model"], ""),
                   str(exported)]  # fmt: skip
        values = []
        for _ in range(args.processes):
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            values.append(json.loads(done.stdout.strip().splitlines()[-1]))
        run["latency_ratio_fresh"] = float(np.median(values))
        run["latency_ratio_fresh_values"] = values
        print(run["model"], run["budget"], run.get("seed", 0), "in run",
              round(run["latency_ratio"], 3), "fresh", [round(v, 3) for v in values])
        atomic_write_bytes(args.json, json.dumps(results, indent=2).encode())
    plot(results, args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
