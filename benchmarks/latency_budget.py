"""A latency budget against a FLOPs budget at the same measured latency (issue: --target-latency).

For each model: one S2HPruner run at ``--target-latency`` (batch 64, CPU); then the FLOPs
target that gives the same measured latency is found by calibration (below), and one
S2HPruner run at that FLOPs target, with the same epochs, seed and recipe. Both exported
models' latency ratios are measured side by side on this machine.

Calibration of the FLOPs target: for FLOPs targets f on a grid, the starting widths are
projected onto f (``project_to_budget``, no training), the model is exported and its latency
ratio measured at the latency batch; f is interpolated where that ratio equals the latency
run's measured ratio. It calibrates the proxy (FLOPs) to the goal (latency) on this machine,
as a user without a latency budget would by trial and error, in minutes instead of runs.
Training moves the widths off the projected ones, so when the trained FLOPs run measures more
than 5% off the latency run, a second FLOPs run aims the curve at the latency shifted by that
miss, and the closer of the two is compared (both are kept, ``flops_attempts``).

Equal latency, measured (round 11): the networks are timed again side by side
(``benchmarks.latency_remeasure --side-by-side``), and the FLOPs arm's top-1 is interpolated
at the latency run's latency between the FLOPs runs on either side of it
(``top1_at_latency``). Where none lies on one side, ``--bracket`` trains one more FLOPs run
aimed past it (``bracketing_target``); then time them side by side again.

    python -m benchmarks.latency_budget --models resnet20 mobilenet_v3_small --epochs 2 \\
        --json benchmarks/results/latency_budget.json

Each finished run is stored at once; a rerun skips what the JSON already holds.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from s2hpruner.app.config import LATENCY_PREDICTORS, RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.files import atomic_write_bytes
from s2hpruner.app.run import build_model_and_pruner, prune
from s2hpruner.core.errors import S2HError
from s2hpruner.core.measure import latency_ratio
from s2hpruner.core.trainer import project_to_budget

KEYS = ("top1_hard", "top1_soft", "top1_start_val", "flops_ratio", "params_ratio",
        "latency_ratio", "latency_ratio_predicted", "latency_ratio_predicted_before_check",
        "latency_floor", "latency_calibration", "latency_predictor", "budget_projection_steps",
        "train_seconds",
        "target_flops", "target_latency")  # fmt: skip


def measured_latency_ratio(full: torch.nn.Module, pruned: torch.nn.Module, example, batch: int,
                           rounds: int = 5) -> float:  # fmt: skip
    """pruned / full latency from alternating forwards (``latency_ratio``), channels_last."""
    x = example[:1].expand(batch, *example.shape[1:]).contiguous(memory_format=torch.channels_last)
    pruned = pruned.to(memory_format=torch.channels_last).eval()
    return latency_ratio(full.eval(), pruned, x, repeats=20, rounds=rounds)[0]


def calibrate(model_name: str, latency_ratio: float, batch: int, grid=(0.1, 0.15, 0.2, 0.3,
              0.4, 0.5, 0.6, 0.7, 0.8), init: str | None = None, round_to: int | None = None,
              model_kwargs: dict | None = None) -> tuple[float, list]:  # fmt: skip
    """The FLOPs target whose projected starting widths measure ``latency_ratio``; the grid's
    targets below the model's smallest network are left out."""
    cfg = RunConfig(model=model_name, progress=False, init=init, round_to=round_to,
                    model_kwargs=model_kwargs or {})
    points = []
    for f in grid:
        torch.manual_seed(0)
        cfg.target_flops = f
        try:
            model, pruner, example = build_model_and_pruner(cfg, dataset_spec(cfg.dataset), "cpu")
        except S2HError:  # below the smallest network's FLOPs
            continue
        project_to_budget(pruner, tolerance=0.005)
        points.append((f, measured_latency_ratio(model, pruner.export(), example, batch)))
    return flops_target_for(points, latency_ratio), points


def flops_target_for(points: list, latency_ratio: float) -> float:
    """The FLOPs target at which the calibration curve ``points`` ((target, measured latency
    ratio) pairs) reaches ``latency_ratio``, interpolated (clamped to the grid's ends)."""
    ratios = np.array([r for _, r in points])
    order = np.argsort(ratios)
    targets = np.array([f for f, _ in points])[order]
    return round(float(np.interp(latency_ratio, ratios[order], targets)), 3)


SIDE_BY_SIDE = "latency_ratio_side_by_side"  # set by benchmarks.latency_remeasure


def seed_key(run: dict) -> tuple:
    """What pairs a latency run with its FLOPs runs: model, factory arguments and seed."""
    return run["model"], json.dumps(run.get("model_kwargs", {})), run.get("seed", 0)


def top1_at_latency(attempts: list[dict], latency: float) -> float | None:
    """The FLOPs arm's top-1 at measured ``latency``: linear in latency between the nearest
    attempt on each side (all timed side by side with the latency run); None unless attempts
    lie on both sides. Comparing the latency run with the one FLOPs run nearest in latency
    is not enough: on MobileNetV3, 0.05 of latency moved top-1 by ~3 points (round 10)."""
    timed = [a for a in attempts if a.get(SIDE_BY_SIDE) is not None]
    below = [a for a in timed if a[SIDE_BY_SIDE] <= latency]
    above = [a for a in timed if a[SIDE_BY_SIDE] >= latency]
    if not below or not above:
        return None
    lo = max(below, key=lambda a: a[SIDE_BY_SIDE])
    hi = min(above, key=lambda a: a[SIDE_BY_SIDE])
    if hi[SIDE_BY_SIDE] == lo[SIDE_BY_SIDE]:
        return (lo["top1_hard"] + hi["top1_hard"]) / 2
    weight = (latency - lo[SIDE_BY_SIDE]) / (hi[SIDE_BY_SIDE] - lo[SIDE_BY_SIDE])
    return lo["top1_hard"] + weight * (hi["top1_hard"] - lo["top1_hard"])


def bracketing_target(attempts: list[dict], latency: float, points: list,
                      margin: float = 0.03) -> float:  # fmt: skip
    """The FLOPs target of the next attempt when every timed attempt lies on one side of
    ``latency``: aim ``margin`` past it, moving the calibration curve by the nearest attempt's
    miss (the curve's shape, the trained network's offset)."""
    timed = [a for a in attempts if a.get(SIDE_BY_SIDE) is not None]
    nearest = min(timed, key=lambda a: abs(a[SIDE_BY_SIDE] - latency))
    aim = latency + (margin if nearest[SIDE_BY_SIDE] < latency else -margin)
    targets, ratios = zip(*sorted(points), strict=True)
    on_curve = float(np.interp(nearest["target_flops"], targets, ratios))
    return flops_target_for(points, on_curve + aim - nearest[SIDE_BY_SIDE])


def run_tag(model: str, model_kwargs: dict, seed: int) -> str:
    """The name of a run's directories: ``<out>/<tag>_latency`` and ``<out>/<tag>_flops``."""
    parts = [model, *(f"{k}-{v}" for k, v in model_kwargs.items())]
    return "_".join(parts + ([f"s{seed}"] if seed else []))


def plot(results: dict, path: Path) -> None:
    """Top-1 against measured latency ratio, one panel per model (and model_kwargs): the
    latency-budgeted runs and the FLOPs runs calibrated to their latency, a line per seed
    joining the pair, and the means."""
    from s2hpruner.app.report import plt, save_figure  # pyplot on the Agg backend

    runs = [r for r in results["runs"] if r.get("top1_hard") is not None]
    panels = sorted({(r["model"], json.dumps(r.get("model_kwargs", {}))) for r in runs})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (model, kwargs) in zip(axes[0], panels, strict=True):
        mine = [r for r in runs if (r["model"], json.dumps(r.get("model_kwargs", {})))
                == (model, kwargs)]  # fmt: skip
        by_seed: dict[int, dict] = {}
        for r in mine:
            by_seed.setdefault(r.get("seed", 0), {})[r["budget"]] = r
        for pair in by_seed.values():
            if len(pair) == 2:
                ax.plot([pair[b]["latency_ratio"] for b in ("latency", "flops")],
                        [pair[b]["top1_hard"] for b in ("latency", "flops")],
                        color="0.8", zorder=1)  # fmt: skip
        for budget, color, label in (("latency", "C0", "latency budget"),
                                     ("flops", "C1", "FLOPs budget, calibrated")):  # fmt: skip
            points = [(r["latency_ratio"], r["top1_hard"]) for r in mine if r["budget"] == budget]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, color=color, label=f"{label} (n={len(points)})", zorder=2)
            ax.scatter([np.mean(xs)], [np.mean(ys)], color=color, marker="*", s=220,
                       edgecolor="k", zorder=3)  # fmt: skip
            fresh = [(r["latency_ratio"], r["latency_ratio_fresh"], r["top1_hard"])
                     for r in mine if r["budget"] == budget and "latency_ratio_fresh" in r]
            for i, (x, fx, y) in enumerate(fresh):  # benchmarks.latency_remeasure
                ax.plot([x, fx], [y, y], ":", color=color, linewidth=1, zorder=1)
                ax.scatter([fx], [y], facecolors="none", edgecolors=color, zorder=2,
                           label="same model, timed in a fresh process" if i == 0 else None)
        target = mine[0].get("target_latency") or 0.5
        ax.axvline(target, color="0.5", linestyle="--", linewidth=1)
        extra = "" if kwargs == "{}" else f" {kwargs}"
        ax.set_title(f"{model}{extra}", fontsize=9)
        ax.set_xlabel("latency ratio (exported / full), timed by the run")
        ax.set_ylabel("test top-1 of the exported model (%)")
        ax.legend(fontsize=8)
    fig.suptitle("At equal measured latency: latency budget vs FLOPs budget (star: mean)")
    save_figure(fig, path)


def plot_equal_latency(results: dict, path: Path) -> None:
    """Top-1 against the latency ratio timed side by side, one panel per model: per seed, the
    FLOPs runs as a line (what a FLOPs budget buys at each latency), the latency run as a dot,
    and the FLOPs line read at the dot's latency (open diamond) that it is compared with."""
    from s2hpruner.app.report import plt, save_figure  # pyplot on the Agg backend

    latency_runs = [r for r in results["runs"]
                    if r["budget"] == "latency" and r.get(SIDE_BY_SIDE) is not None]  # fmt: skip
    panels = sorted({(r["model"], json.dumps(r.get("model_kwargs", {}))) for r in latency_runs})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (model, kwargs) in zip(axes[0], panels, strict=True):
        for r in latency_runs:
            if (r["model"], json.dumps(r.get("model_kwargs", {}))) != (model, kwargs):
                continue
            seed = r.get("seed", 0)
            flops = next((f for f in results["runs"]
                          if f["budget"] == "flops" and seed_key(f) == seed_key(r)), {})
            timed = sorted((a[SIDE_BY_SIDE], a["top1_hard"])
                           for a in flops.get("flops_attempts", [])
                           if a.get(SIDE_BY_SIDE) is not None)  # fmt: skip
            color = f"C{seed}"
            if timed:
                ax.plot(*zip(*timed, strict=True), "s--", color=color, alpha=0.5, markersize=4,
                        label=f"seed {seed}: FLOPs-budget runs")  # fmt: skip
            ax.scatter([r[SIDE_BY_SIDE]], [r["top1_hard"]], color=color, s=60, zorder=3,
                       label=f"seed {seed}: latency-budget run")  # fmt: skip
            at = flops.get("top1_hard_at_equal_latency")
            if at is not None:
                ax.scatter([r[SIDE_BY_SIDE]], [at], marker="D", facecolors="none",
                           edgecolors=color, s=60, zorder=3)  # fmt: skip
                ax.plot([r[SIDE_BY_SIDE]] * 2, [at, r["top1_hard"]], color=color, linewidth=2)
        ax.axvline(0.5, color="0.5", linestyle=":", linewidth=1)
        extra = "" if kwargs == "{}" else f" {kwargs}"
        ax.set_title(f"{model}{extra}", fontsize=9)
        ax.set_xlabel("latency ratio (exported / full), timed in turns")
        ax.set_ylabel("test top-1 of the exported model (%)")
        ax.legend(fontsize=7)
    fig.suptitle("Latency budget vs FLOPs budget at equal measured latency "
                 "(diamond: FLOPs runs interpolated)", fontsize=10)  # fmt: skip
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenet_v3_small"])
    parser.add_argument("--target-latency", type=float, default=0.5)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--init", default=None,
                        help="start every run from these weights (e.g. the pretrain cache)")
    parser.add_argument("--lr", type=float, default=None, help="weight LR (default: the run's)")
    parser.add_argument("--freeze", type=float, default=None, help="frozen-width fraction")
    parser.add_argument("--round-to", type=int, default=None,
                        help="hard widths in multiples of this (both runs and the calibration)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='model factory arguments as JSON, e.g. \'{"cifar_stem": true}\'')
    parser.add_argument("--bracket", action="store_true",
                        help="add a FLOPs run where the FLOPs runs, timed side by side, do not "
                             "lie on both sides of the latency run (see top1_at_latency)")
    parser.add_argument("--latency-predictor", default="auto", choices=LATENCY_PREDICTORS,
                        help="the latency runs' --latency-predictor")
    parser.add_argument("--flops-runs-from", type=Path, default=None,
                        help="another JSON of this benchmark (same checkpoint, recipe and "
                             "device): reuse its FLOPs runs of these models and seeds")
    parser.add_argument("--out", default="runs/latency_budget")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/latency_budget.json"))
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
    if args.flops_runs_from:  # their networks are timed again beside the new latency runs
        for run in json.loads(args.flops_runs_from.read_text())["runs"]:
            if (run["budget"] == "flops" and run["model"] in args.models
                    and run.get("seed", 0) == args.seed and run.get("model_kwargs", {}) ==
                    args.model_kwargs):  # fmt: skip
                stale = (SIDE_BY_SIDE, f"{SIDE_BY_SIDE}_values", "equal_latency",
                         "top1_hard_at_equal_latency")  # fmt: skip
                for record in [run, *run.get("flops_attempts", [])]:
                    for field in stale:
                        record.pop(field, None)
                run["copied_from"] = str(args.flops_runs_from)
                if not any(r["budget"] == "flops" and r["model"] == run["model"]
                           and r.get("seed", 0) == args.seed for r in results["runs"]):
                    results["runs"].append(run)
    results["machine"] = {"cpu": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__}
    kwargs = args.model_kwargs

    def key(run: dict) -> tuple:
        return run["model"], run["budget"], run.get("seed", 0), str(run.get("model_kwargs", {}))

    done = {key(r) for r in results["runs"]}

    def save():
        atomic_write_bytes(args.json, json.dumps(results, indent=2).encode())

    for name in args.models:
        common = dict(model=name, epochs=args.epochs, latency_batch=args.latency_batch,
                      progress=False, overwrite=True, init=args.init, seed=args.seed,
                      model_kwargs=kwargs,
                      # from a checkpoint, every seed holds out the images the checkpoint did
                      split_seed=0 if args.init else None)  # fmt: skip
        common.update({k: v for k, v in (("lr", args.lr), ("freeze", args.freeze),
                                         ("round_to", args.round_to)) if v})  # fmt: skip
        tag = run_tag(name, kwargs, args.seed)
        run = {"model": name, "seed": args.seed, **({"model_kwargs": kwargs} if kwargs else {})}
        if key({**run, "budget": "latency"}) not in done:
            try:
                report = prune(RunConfig(**common, target_latency=args.target_latency,
                                         latency_predictor=args.latency_predictor,
                                         out=f"{args.out}/{tag}_latency"))  # fmt: skip
            except S2HError as exc:  # e.g. a target below the measured floor: say so
                report = {"infeasible": str(exc), "target_latency": args.target_latency}
            entry = {**run, "budget": "latency"}
            results["runs"].append({**entry, **report} if "infeasible" in report
                                   else {**entry, **{k: report.get(k) for k in KEYS}})  # fmt: skip
            save()
        lat = next(r for r in results["runs"] if key(r) == key({**run, "budget": "latency"}))
        if "infeasible" in lat:
            continue
        full, _, example = build_model_and_pruner(
            RunConfig(model=name, progress=False, init=args.init, model_kwargs=kwargs),
            dataset_spec("fashion-mnist"), "cpu")  # fmt: skip

        def attempt(target: float, number: int, common=common, tag=tag, full=full,
                    example=example) -> dict:  # fmt: skip
            """One FLOPs run at ``target`` and its exported model's measured latency ratio."""
            out = f"{args.out}/{tag}_flops" + (f"_{number}" if number > 1 else "")
            report = prune(RunConfig(**common, target_flops=target, out=out))
            exported = torch.load(f"{out}/model_pruned.pt", weights_only=False)
            # the FLOPs run's measured latency, at the same batch, like with like
            ratio = measured_latency_ratio(full, exported, example, args.latency_batch)
            return {**{k: report.get(k) for k in KEYS}, "latency_ratio": ratio, "out": out}

        flops = next((r for r in results["runs"] if key(r) == key({**run, "budget": "flops"})),
                     None)  # fmt: skip
        if flops is None:
            target, points = calibrate(name, lat["latency_ratio"], args.latency_batch,
                                       init=args.init, round_to=args.round_to,
                                       model_kwargs=kwargs)  # fmt: skip
            attempts = []
            for number in (1, 2):
                attempts.append(attempt(target, number))
                miss = attempts[-1]["latency_ratio"] - lat["latency_ratio"]
                if abs(miss) <= 0.05 * lat["latency_ratio"] or number == 2:
                    break
                # training moved the widths off the projected ones: aim the calibration
                # curve (projected widths) at the latency shifted by the trained run's miss
                retarget = flops_target_for(points, lat["latency_ratio"] - miss)
                if retarget == target:  # at the end of the grid: nothing else to try
                    break
                target = retarget
            best = min(attempts, key=lambda a: abs(a["latency_ratio"] - lat["latency_ratio"]))
            results["runs"].append({**run, "budget": "flops", "calibration": points, **best,
                                    "flops_attempts": attempts})  # fmt: skip
            save()
        elif args.bracket:
            if lat.get(SIDE_BY_SIDE) is None:
                raise SystemExit(f"--bracket needs the runs timed side by side first: python -m "
                                 f"benchmarks.latency_remeasure {args.json} --side-by-side")
            attempts = flops["flops_attempts"]
            if top1_at_latency(attempts, lat[SIDE_BY_SIDE]) is None:
                target = bracketing_target(attempts, lat[SIDE_BY_SIDE], flops["calibration"])
                attempts.append(attempt(target, len(attempts) + 1))
                save()
                print(f"{tag}: FLOPs attempt at {target} added; time it with "
                      f"benchmarks.latency_remeasure --side-by-side")
    plot(results, args.json.with_suffix(".png"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
