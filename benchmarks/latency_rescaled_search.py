"""Diagnostic (tried in round 16, not kept): a latency run whose per-group latency gradients
are rescaled to the measured marginal costs.

``benchmarks.latency_marginals --around REPORT`` (and ``--wider``) measures what one aligned
step of each group costs in the whole exported network, where a run's search ended, beside
what the tables predict. This reruns a latency run (its ``config.yaml``, another seed and
output) with each group's gradient of the latency model multiplied by measured / predicted
(central difference where both steps were measured). The value of the latency model, and so
the budget, is unchanged (straight-through); only the prices the search sees move. The patch
lives in this process only, for the one run.

    python -m benchmarks.latency_rescaled_search runs/latency_budget_intel/resnet20_latency \\
        --narrower benchmarks/results/latency_marginals_around.json \\
        --wider benchmarks/results/latency_marginals_around_wider.json \\
        --seed 1 --out runs/rescaled/resnet20_s1_latency
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

from s2hpruner.app.config import RunConfig
from s2hpruner.app.run import prune
from s2hpruner.core.pruner import S2HPruner
from s2hpruner.core.resources.latency import LatencyModel


def measured_over_predicted(narrower: Path, wider: Path, model: str) -> dict[str, float]:
    """Per group: measured / tables marginal cost, over both steps where both were taken."""

    def rows(path: Path) -> dict[str, dict]:
        run = next(r for r in json.loads(path.read_text())["runs"] if r["model"] == model)
        return {row["group"]: row for row in run["groups"]}

    down, up = rows(narrower), rows(wider)
    scale = {}
    for group in down.keys() | up.keys():
        pairs = [(r["measured_saving"], r["tables"]) for r in (down.get(group),) if r]
        pairs += [(-r["measured_saving"], -r["tables"]) for r in (up.get(group),) if r]
        scale[group] = sum(m for m, _ in pairs) / sum(t for _, t in pairs)
    return scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the latency run to repeat (its config.yaml)")
    parser.add_argument("--narrower", type=Path, required=True)
    parser.add_argument("--wider", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = RunConfig.from_yaml(args.run / "config.yaml", seed=args.seed, out=str(args.out))
    scale = measured_over_predicted(args.narrower, args.wider, cfg.model)
    print("gradient scale per group:", {k: round(v, 2) for k, v in sorted(scale.items())})
    cost, build = LatencyModel.cost, S2HPruner.__init__

    def pruner_with_scale(self: S2HPruner, *args, **kwargs) -> None:
        build(self, *args, **kwargs)  # the latency model knows widths, the pruner group names
        if self.latency is not None:
            self.latency.group_scale = torch.tensor([scale[g.name] for g in self.groups])

    def rescaled_cost(self: LatencyModel, widths: torch.Tensor) -> torch.Tensor:
        s = getattr(self, "group_scale", None)  # (none yet while the pruner builds)
        if s is not None:
            widths = widths + (s.to(widths) - 1) * (widths - widths.detach())  # value unchanged
        return cost(self, widths)

    with (mock.patch.object(S2HPruner, "__init__", pruner_with_scale),
          mock.patch.object(LatencyModel, "cost", rescaled_cost)):  # fmt: skip
        report = prune(cfg)
    print(json.dumps({k: report[k] for k in ("top1_hard", "flops_ratio", "latency_ratio",
                                             "kept_widths")}))  # fmt: skip


if __name__ == "__main__":
    main()
