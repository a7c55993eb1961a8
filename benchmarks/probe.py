"""One S2HPruner run of a benchmark profile's recipe with a few settings changed: a probe.

Why: before a setting earns a profile (hours, every method searched alike), one run at the
search seed tells whether it moves the validation top-1 at all. The run is exactly the one
``benchmarks.compare`` would make for (profile, target, seed) with the candidate ``--hyper``,
then ``--set`` changes any RunConfig field. It prints one JSON line (validation and test
top-1, FLOPs, where the search met the budget, the kept widths). Probes are not results:
decide on the validation split, and offer what helps to every method in a profile.

    python -m benchmarks.probe --profile from-trained-width-step-055 --target 0.55 --seed 0 \\
        --hyper '{"lr": 0.03, "freeze_teacher": "none", "freeze": 0.85, "round_to": 4}' \\
        --set '{"mask_lr": 0.1}' --out /tmp/probe
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .compare import PROFILES, RUN_HYPER, RunSpec, prune_record, run_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--target", type=float, required=True, help="FLOPs target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="s2h", help="an S2HPruner-family method")
    parser.add_argument("--hyper", type=json.loads, default={},
                        help="a search candidate of the profile, as JSON")  # fmt: skip
    parser.add_argument("--set", dest="changes", type=json.loads, default={},
                        help="RunConfig fields to change, as JSON")  # fmt: skip
    parser.add_argument("--out", required=True, help="the run's directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    unknown = sorted(set(args.hyper) - set(RUN_HYPER))
    if unknown:
        raise SystemExit(f"--hyper takes {', '.join(RUN_HYPER)}; put {unknown} in --set")
    if (Path(args.out) / "report.json").exists():  # the run below replaces its directory
        raise SystemExit(f"{args.out} holds a finished run; give another --out")
    profile = dataclasses.replace(PROFILES[args.profile], progress=False)
    spec = RunSpec(args.method, args.target, args.seed, "epochs")
    cfg = run_config(profile, spec, profile.epochs, Path(args.out), args.hyper)
    cfg = dataclasses.replace(cfg, **args.changes)
    record = prune_record(cfg, resume=False)
    result = {
        "profile": args.profile, "target": args.target, "seed": args.seed,
        "hyper": args.hyper, "set": args.changes,
        "val_top1": record["val_top1"], "top1_hard": record["top1_hard"],
        "flops_ratio": record["flops_ratio"], "budget_met_step": record.get("budget_met_step"),
        "budget_projection_steps": record.get("budget_projection_steps"),
        "kept_widths": record.get("kept_widths"),
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
