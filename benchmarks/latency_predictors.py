"""Which predicts a whole network's measured latency better here: the per-layer tables or FLOPs?

Builds the pruner of a ``--target-latency`` run (tables measured or read from the cache, the
model refitted at build as a run does), then for ``--samples`` random networks (every group at
a random width aligned to ``--round-to``) exports the network and records its measured
latency ratio (``LatencyModel.measure_ratio``, the run's own timer), the tables' prediction
and its FLOPs ratio. The analysis asks how well each predictor, refitted on ``k`` measured
networks as a run refits on the few it measures (a line through the full network:
``1 - ratio = slope * (1 - predictor)``), predicts the other networks.

    python -m benchmarks.latency_predictors --model resnet20 \\
        --init benchmarks/cache/resnet20_fmnist_5ep.pt \\
        --json benchmarks/results/latency_predictors.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.files import atomic_write_bytes
from s2hpruner.app.run import build_model_and_pruner


def sample_networks(cfg: RunConfig, samples: int, seed: int, round_to: int) -> list[dict]:
    """Measured ratio, table prediction and FLOPs ratio of random aligned networks."""
    model, pruner, _ = build_model_and_pruner(cfg, dataset_spec(cfg.dataset), "cpu")
    search, rng, rows = pruner.search, random.Random(seed), []
    for _ in range(samples):
        choice = {}
        for name, options in pruner.candidate_widths().items():
            aligned = [w for w in options if w % round_to == 0] or [options[-1]]
            choice[name] = rng.choice(aligned)
        with pruner.at_widths(choice):
            widths = search.hard_widths().detach()
            with torch.no_grad():
                measured = pruner.latency.measure_ratio(model, pruner.export().eval())
            rows.append({"widths": widths.round().int().tolist(), "measured": measured,
                         "tables": float(pruner.latency.ratio(widths)),
                         "flops": pruner.ratio("hard", "flops")})  # fmt: skip
    return rows


def refit_errors(rows: list[dict], k: int, trials: int = 200, seed: int = 0) -> dict:
    """|predicted / measured - 1| of each predictor refitted (slope through the full network)
    on ``k`` random networks, over the others: median and 90th percentile."""
    measured = np.array([r["measured"] for r in rows])
    rng, out = np.random.default_rng(seed), {}
    for name in ("tables", "flops"):
        shrink = 1.0 - np.array([r[name] for r in rows])
        errors = []
        for _ in range(trials):
            order = rng.permutation(len(rows))
            fit, rest = order[:k], order[k:]
            slope = max(float(np.median((1.0 - measured[fit]) / shrink[fit])), 0.0)
            errors += list(np.abs((1.0 - slope * shrink[rest]) / measured[rest] - 1.0))
        out[name] = {"median": float(np.median(errors)), "p90": float(np.percentile(errors, 90))}
    return out


def plot(results: dict, path: Path) -> None:
    """Measured against predicted latency ratio, one panel per model, for both predictors
    (each refitted on all networks: a line through the full network)."""
    from s2hpruner.app.report import plt, save_figure  # pyplot on the Agg backend

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        measured = np.array([r["measured"] for r in run["networks"]])
        for name, color in (("tables", "C0"), ("flops", "C1")):
            shrink = 1.0 - np.array([r[name] for r in run["networks"]])
            slope = float(np.median((1.0 - measured) / shrink))
            predicted = 1.0 - slope * shrink
            error = float(np.median(np.abs(predicted / measured - 1.0)))
            ax.scatter(predicted, measured, color=color, s=14,
                       label=f"{name} (median error {100 * error:.1f}%)")  # fmt: skip
        low, high = float(measured.min()) * 0.9, float(measured.max()) * 1.1
        ax.plot([low, high], [low, high], color="0.5", linewidth=1)
        extra = f" {json.dumps(run['model_kwargs'])}" if run["model_kwargs"] else ""
        ax.set_title(f"{run['model']}{extra}, batch {run['latency_batch']}", fontsize=9)
        ax.set_xlabel("predicted latency ratio (line refitted on all networks)")
        ax.set_ylabel("measured latency ratio")
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs[0]['networks'])} random aligned networks per model: which "
                 "predictor follows the measured latency?")  # fmt: skip
    save_figure(fig, path)


def store_entry(path: Path, entry: dict) -> dict:
    """Put ``entry`` into the JSON at ``path`` in place of the same model's (atomically);
    returns all entries."""
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    mine = (entry["model"], entry["model_kwargs"])
    results["runs"] = [r for r in results["runs"] if (r["model"], r["model_kwargs"]) != mine]
    results["runs"].append(entry)
    atomic_write_bytes(path, json.dumps(results, indent=2).encode())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--model-kwargs", type=json.loads, default={})
    parser.add_argument("--init", default=None)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/latency_predictors.json"))
    args = parser.parse_args()
    cfg = RunConfig(model=args.model, model_kwargs=args.model_kwargs, init=args.init,
                    target_latency=0.5, latency_batch=args.latency_batch,
                    round_to=args.round_to, progress=False, split_seed=0)  # fmt: skip
    rows = sample_networks(cfg, args.samples, args.seed, args.round_to)
    entry = {"model": args.model, "model_kwargs": args.model_kwargs, "init": args.init,
             "latency_batch": args.latency_batch, "threads": torch.get_num_threads(),
             "networks": rows,
             "as_built": {name: float(np.median([abs(r[name] / r["measured"] - 1) for r in rows]))
                          for name in ("tables",)},
             "refit": {k: refit_errors(rows, k) for k in (3, 5, 8)}}  # fmt: skip
    plot(store_entry(args.json, entry), args.json.with_suffix(".png"))
    print(json.dumps({k: entry[k] for k in ("model", "as_built", "refit")}, indent=2))


if __name__ == "__main__":
    main()
