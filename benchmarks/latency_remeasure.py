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

With ``--side-by-side``, the exported models of one model and seed (the latency run and its
FLOPs runs) are timed in one fresh process, in turns, ``--turns`` times each
(``latency_ratio_side_by_side``: the median, and every value). Timed minutes or processes
apart, one MobileNetV3 measured 0.48 and then 0.52 (MEASUREMENTS.md, round 10); timed in
turns, the arms of a comparison see the same machine.

    python -m benchmarks.latency_remeasure benchmarks/results/latency_budget_from_trained.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def time_in_turns(model: str, kwargs: str, init: str | None, exported: list[str], batch: int,
                  turns: int) -> list[list[float]]:  # fmt: skip
    """Per exported model, ``turns`` latency ratios against the full model; the models take
    turns (in alternating order), so they see the same machine."""
    import torch

    from benchmarks.latency_budget import measured_latency_ratio
    from s2hpruner.app.config import RunConfig
    from s2hpruner.app.data import dataset_spec
    from s2hpruner.app.run import build_model

    spec = dataset_spec("fashion-mnist")
    cfg = RunConfig(model=model, model_kwargs=json.loads(kwargs), init=init, progress=False)
    full = build_model(cfg, spec, torch.device("cpu"))
    example = torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size)
    pruned = [torch.load(path, weights_only=False) for path in exported]
    values = [[] for _ in pruned]
    for turn in range(turns):
        order = range(len(pruned)) if turn % 2 == 0 else reversed(range(len(pruned)))
        for i in order:
            values[i].append(measured_latency_ratio(full, pruned[i], example, batch))
    return values


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
    parser.add_argument("--side-by-side", action="store_true",
                        help="time the runs of one model and seed in turns, in one process")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=None,
                        help="time only these models' runs (default: every model in the JSON)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--worker-side-by-side", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, kwargs, init, exported = args.worker  # median of 3 ratios
        ratios = time_in_turns(model, kwargs, init or None, [exported], args.latency_batch, 3)[0]
        print(json.dumps(float(np.median(ratios))))
        return
    if args.worker_side_by_side:
        model, kwargs, init, *exported = args.worker_side_by_side
        print(json.dumps(time_in_turns(model, kwargs, init or None, exported, args.latency_batch,
                                       args.turns)))  # fmt: skip
        return
    from benchmarks.latency_budget import plot, plot_equal_latency
    from s2hpruner.app.files import atomic_write_bytes

    inits = dict(item.split("=", 1) for item in args.init)
    results = json.loads(args.json.read_text())
    if args.side_by_side:
        side_by_side(args, results, inits)
        plot(results, args.json.with_suffix(".png"))
        plot_equal_latency(results, args.json.with_name(f"{args.json.stem}_equal_latency.png"))
        return
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


def side_by_side(args: argparse.Namespace, results: dict, inits: dict) -> None:
    """``latency_ratio_side_by_side`` of every finished run and FLOPs attempt, a model and
    seed's networks timed in turns in one fresh process; then each FLOPs run's top-1 at the
    latency run's latency (``top1_hard_at_equal_latency``, interpolated between attempts)."""
    from benchmarks.latency_budget import SIDE_BY_SIDE, seed_key, top1_at_latency
    from s2hpruner.app.files import atomic_write_bytes

    groups: dict[tuple, dict[str, list[dict]]] = {}
    only = getattr(args, "models", None)
    for run in results["runs"]:
        if "top1_hard" not in run or only and run["model"] not in only:
            continue
        key = seed_key(run)
        # a FLOPs run is a copy of one of its attempts: time each network once, by path
        for record in [run, *run.get("flops_attempts", [])]:
            exported = run_dir(args.runs, record) / "model_pruned.pt"
            if exported.exists():
                groups.setdefault(key, {}).setdefault(str(exported), []).append(record)
    for (model, kwargs, seed), networks in groups.items():
        command = [sys.executable, "-m", "benchmarks.latency_remeasure", str(args.json),
                   "--latency-batch", str(args.latency_batch), "--turns", str(args.turns),
                   "--worker-side-by-side", model, kwargs, inits.get(model, ""),
                   *networks]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        values = json.loads(done.stdout.strip().splitlines()[-1])
        for (path, records), vals in zip(networks.items(), values, strict=True):
            for record in records:
                record[SIDE_BY_SIDE] = float(np.median(vals))
                record[f"{SIDE_BY_SIDE}_values"] = vals
            print(model, seed, Path(path).parent.name, "in run",
                  round(records[0]["latency_ratio"], 3), "side by side",
                  [round(v, 3) for v in vals])
        atomic_write_bytes(args.json, json.dumps(results, indent=2).encode())
    for run in results["runs"]:
        latency = next((r for r in results["runs"]
                        if r["budget"] == "latency" and seed_key(r) == seed_key(run)), None)
        if run["budget"] == "flops" and latency and latency.get(SIDE_BY_SIDE) is not None:
            run["equal_latency"] = latency[SIDE_BY_SIDE]
            run["top1_hard_at_equal_latency"] = top1_at_latency(
                run.get("flops_attempts", [run]), latency[SIDE_BY_SIDE])
            print(run["model"], run.get("seed", 0), "FLOPs top-1 at the latency run's latency",
                  run["top1_hard_at_equal_latency"], "latency run", latency["top1_hard"])
    atomic_write_bytes(args.json, json.dumps(results, indent=2).encode())


if __name__ == "__main__":
    main()
