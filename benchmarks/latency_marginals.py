"""What each group's width costs on this device: measured, by the tables and by FLOPs.

A latency budget steers the search by each group's *marginal* cost: how much latency a
narrower group saves. If the tables over-price a group against what the whole network
really saves, the search cuts that group harder than its accuracy is worth. For every group
in turn, this narrows that group alone to about ``--fraction`` of its channels (the nearest
candidate, aligned to ``--round-to``; every other group full), exports the network, and
measures its latency ratio against the full one (``LatencyModel.measure_ratio``, alternating
forwards), ``--passes`` times in shuffled order (median). Beside it: the saving the tables
predict (uncorrected, as built) and the FLOPs saving. ``--around REPORT`` narrows each group
by one step from a run's kept widths instead (where that run's search ended); with
``--wider`` it widens each by one step (a negative saving: what the wider group costs).

    python -m benchmarks.latency_marginals --model mobilenet_v3_small \\
        --model-kwargs '{"cifar_stem": true}' --json benchmarks/results/latency_marginals.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from benchmarks.latency_predictors import store_entry
from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.run import build_model_and_pruner


def group_marginals(cfg: RunConfig, fraction: float, round_to: int, passes: int,
                    seed: int = 0, around: dict[str, int] | None = None,
                    wider: bool = False) -> list[dict]:  # fmt: skip
    """Per group: width kept, measured / tables / FLOPs saving of narrowing it alone.

    ``around`` (group name -> width, e.g. a run's ``kept_widths``): instead of from the full
    network, narrow each group by one aligned step from these widths (the search's operating
    point, where a conv's cost also depends on its neighbours' widths). ``wider``: step each
    group one aligned step wider instead (its saving is then negative: what widening costs),
    which reaches the groups the search left at their narrowest."""
    if wider and around is None:
        raise ValueError("wider steps are taken from a run's widths: give `around` too")
    model, pruner, _ = build_model_and_pruner(cfg, dataset_spec(cfg.dataset), "cpu")
    search, latency = pruner.search, pruner.latency
    choices = list(pruner.candidate_widths().values())
    base = [len(c) - 1 if around is None else c.index(around[grp.name])
            for c, grp in zip(choices, pruner.groups, strict=True)]  # fmt: skip
    rows = []
    for g, group in enumerate(pruner.groups):
        widths, start = choices[g], choices[g][base[g]]
        aligned = [k for k, w in enumerate(widths)
                   if w % round_to == 0 and (w > start if wider else w < start)]  # fmt: skip
        if not aligned:
            continue
        step = round_to if wider else -round_to
        aim = fraction * group.channels if around is None else start + step
        pick = min(aligned, key=lambda k: abs(widths[k] - aim))
        rows.append({"group": group.name, "channels": group.channels, "from": start,
                     "kept": widths[pick], "index": g, "pick": pick,
                     "measured": []})  # fmt: skip

    def network(picks: list[int]) -> tuple[float, torch.Tensor]:
        """Measured latency ratio and hard widths of the network at these candidates."""
        widths = {grp.name: choices[g][k]
                  for g, (grp, k) in enumerate(zip(pruner.groups, picks, strict=True))}  # fmt: skip
        with pruner.at_widths(widths), torch.no_grad():
            ratio = latency.measure_ratio(model, pruner.export().eval())
            return ratio, search.hard_widths().detach()

    order = list(range(len(rows)))
    for p in range(passes):
        random.Random(seed + p).shuffle(order)
        ratio, w0 = network(base) if around is not None else (1.0, None)
        for r in order:
            row = rows[r]
            picks = list(base)
            picks[row["index"]] = row["pick"]
            measured, w = network(picks)
            row["measured"].append(ratio - measured)
            row["hard_width"] = int(w[row["index"]].round())
            for name in ("tables", "flops"):
                before = 1.0 if w0 is None else float(latency.feature(w0, name))
                row[name] = before - float(latency.feature(w, name))
    for row in rows:
        row["measured_saving"] = statistics.median(row["measured"])
    return rows


def plot(results: dict, path: Path) -> None:
    """Per group, the saving of narrowing it alone: measured, by the tables, by FLOPs."""
    import numpy as np

    from s2hpruner.app.report import plt, save_figure  # pyplot on the Agg backend

    runs = results["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.8 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        rows = run["groups"]
        x = np.arange(len(rows))
        for k, (name, key, color) in enumerate((("measured", "measured_saving", "0.3"),
                                                 ("tables (as built)", "tables", "C0"),
                                                 ("FLOPs", "flops", "C1"))):  # fmt: skip
            ax.bar(x + (k - 1) * 0.27, [r[key] for r in rows], 0.27, color=color, label=name)
        ax.set_xticks(x, [f"{r['group']} ({r.get('from', r['channels'])}->{r['kept']})"
                          for r in rows],
                      rotation=70, ha="right", fontsize=7)  # fmt: skip
        ax.set_ylabel("latency saved (fraction of the full model)")
        extra = f" {json.dumps(run['model_kwargs'])}" if run["model_kwargs"] else ""
        how = (f"to ~{run['fraction']:g} of its channels, all others full"
               if not run.get("around") else f"by one step from the widths of {run['around']}")
        verb = "widened" if run.get("wider") else "narrowed"
        ax.set_title(f"{run['model']}{extra}, batch {run['latency_batch']}: one group {verb} "
                     f"{how}", fontsize=9)  # fmt: skip
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--model-kwargs", type=json.loads, default={})
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--around", type=Path, default=None,
                        help="a run's report.json: narrow each group by one step from its "
                             "kept widths instead of from the full network")  # fmt: skip
    parser.add_argument("--wider", action="store_true",
                        help="with --around: widen each group by one step instead")
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/latency_marginals.json"))
    args = parser.parse_args()
    cfg = RunConfig(model=args.model, model_kwargs=args.model_kwargs, target_latency=0.5,
                    latency_batch=args.latency_batch, round_to=args.round_to, progress=False,
                    split_seed=0)  # fmt: skip
    around = json.loads(args.around.read_text())["kept_widths"] if args.around else None
    rows = group_marginals(cfg, args.fraction, args.round_to, args.passes, around=around,
                           wider=args.wider)  # fmt: skip
    entry = {"model": args.model, "model_kwargs": args.model_kwargs, "fraction": args.fraction,
             "around": str(args.around) if args.around else None, "wider": args.wider,
             "latency_batch": args.latency_batch, "threads": torch.get_num_threads(),
             "groups": rows}  # fmt: skip
    plot(store_entry(args.json, entry), args.json.with_suffix(".png"))
    print(f"{'group':40s} {'kept':>9s} {'measured':>8s} {'tables':>7s} {'flops':>7s}")
    for r in rows:
        print(f"{r['group'][:40]:40s} {r['kept']:4d}/{r['channels']:<4d} "
              f"{r['measured_saving']:8.3f} {r['tables']:7.3f} {r['flops']:7.3f}")


if __name__ == "__main__":
    main()
